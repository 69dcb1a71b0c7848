"""Which transforms apply to which item.

``transforms=`` takes a plain list (every item gets the same chain) or ``Rule`` objects that
pick a chain per item by fqn glob, dtype and size.  Whatever is chosen is recorded in that
item's descriptors, so a reader needs no rules.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import torch

from .errors import ConfigError
from .transform import ItemInfo, Transform, transform_name

TransformSpec = Union[str, Transform, Any]


@dataclass(frozen=True)
class Rule:
    """Apply ``transforms`` to items matching every given condition; first match wins.

    ``match`` is an fqn glob (``"optim.state.*"``), ``dtypes`` a set of torch dtypes,
    ``min_bytes``/``max_bytes`` bound the item's raw size.  ``transforms=[]`` means "store raw".
    """

    transforms: Sequence[TransformSpec]
    match: str = "*"
    dtypes: Sequence[torch.dtype] | None = None
    min_bytes: int = 0
    max_bytes: int | None = None
    tensors_only: bool = False
    _chain: tuple[Transform, ...] = field(default=(), compare=False, repr=False)

    def matches(self, item: ItemInfo) -> bool:
        if not fnmatch.fnmatchcase(item.fqn, self.match):
            return False
        if self.tensors_only and not item.is_tensor:
            return False
        if self.dtypes is not None and item.dtype not in self.dtypes:
            return False
        if item.nbytes < self.min_bytes:
            return False
        return self.max_bytes is None or item.nbytes <= self.max_bytes


class TransformRules:
    """An ordered list of rules, each with its chain already built."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules

    def chain_for(self, item: ItemInfo) -> tuple[Transform, ...]:
        for rule in self.rules:
            if rule.matches(item):
                return rule._chain
        return ()

    def any_active(self) -> bool:
        return any(rule._chain for rule in self.rules)

    def transforms(self) -> list[Transform]:
        return [t for rule in self.rules for t in rule._chain]

    def torch_compatible(self) -> "TransformRules":
        """The same rules with each transform replaced by what stock torch can read."""
        from .transform import TorchStreamTransform

        out = []
        for rule in self.rules:
            if len(rule._chain) > 1:
                raise ConfigError(
                    "compat mode writes what stock torch reads, and stock torch 2.13 decodes chains of "
                    "more than one transform in the wrong order; use one transform or drop compat"
                )
            chain = []
            for t in rule._chain:
                ext = t.torch_compatible()
                if ext is None:
                    raise ConfigError(f"{t.get_descriptor()} has no form stock torch can read; drop it or drop compat")
                chain.append(TorchStreamTransform(ext))
            out.append(_build(rule, tuple(chain)))
        return TransformRules(out)

    def manifest_key(self) -> tuple[str, str, bytes] | None:
        """(transform name, key id, key) to HMAC the manifest with, offered by a keyed
        transform (one with ``manifest_key()``, e.g. encryption), or None."""
        for t in self.transforms():
            offer = getattr(t, "manifest_key", None)
            if callable(offer):
                key_id, key = offer()
                return transform_name(t), str(key_id), bytes(key)
        return None


def _build(rule: Rule, chain: tuple[Transform, ...]) -> Rule:
    return Rule(rule.transforms, rule.match, rule.dtypes, rule.min_bytes, rule.max_bytes, rule.tensors_only, chain)


def build_chain(specs: Sequence[TransformSpec]) -> tuple[Transform, ...]:
    from .plugins import as_transform, host

    chain = []
    for spec in specs:
        chain.append(host().create(spec) if isinstance(spec, str) else as_transform(spec))
    names = [transform_name(t) for t in chain]
    if len(set(names)) != len(names):
        raise ConfigError(f"a transform appears twice in one chain: {names}")
    return tuple(chain)


def resolve_transforms(spec: Sequence[Any] | None) -> TransformRules:
    """Normalise ``transforms=``: None/[] → no transforms; a list of transforms → one rule;
    a list of ``Rule`` → those rules (a final catch-all is not implied)."""
    if not spec:
        return TransformRules([])
    if isinstance(spec, (str, Transform)):
        spec = [spec]
    if all(isinstance(s, Rule) for s in spec):
        return TransformRules([_build(r, build_chain(r.transforms)) for r in spec])
    if any(isinstance(s, Rule) for s in spec):
        raise ConfigError("transforms= takes either transforms or Rule objects, not a mix")
    return TransformRules([_build(Rule(list(spec)), build_chain(spec))])
