"""The template's own tests: dcpx's conformance kit, plus a real save/load round trip.

The kit (``dcpx.testing.TransformConformance``) checks descriptors, strict parsing, chunk
and stream round trips, chaining, thread safety and the entry point.  Keep the subclass
when you rename the plugin; add tests of your transform's own behaviour below it.
"""

import torch

import dcpx
from dcpx.testing import TransformConformance
from dcpx_template import TemplateTransform


class TestTemplateConformance(TransformConformance):
    # Builds the transform under test; give it whatever configuration it needs (keys, levels).
    # Several configurations: variants = {"fast": lambda: ..., "small": lambda: ...}
    transform_factory = staticmethod(lambda: TemplateTransform())
    # The name under [project.entry-points.dcpx] in pyproject.toml.
    entry_point = "template"


def test_round_trip(tmp_path):
    state = {"w": torch.randn(64, 33), "step": 7}
    dcpx.save(state, tmp_path, transforms=[TemplateTransform()], chunk_size=1024)
    out = {"w": torch.zeros(64, 33), "step": 0}
    dcpx.load(out, tmp_path)
    assert torch.equal(out["w"], state["w"]) and out["step"] == 7
