"""The template's own test: a real save/load round trip through dcpx."""

import torch

import dcpx
from dcpx_template import TemplateTransform


def test_round_trip(tmp_path):
    state = {"w": torch.randn(64, 33), "step": 7}
    dcpx.save(state, tmp_path, transforms=[TemplateTransform()], chunk_size=1024)
    out = {"w": torch.zeros(64, 33), "step": 0}
    dcpx.load(out, tmp_path)
    assert torch.equal(out["w"], state["w"]) and out["step"] == 7
