"""Descriptor strings: ``<name>[@<domain>]/<version>[;<key>=<value>]*``.

A descriptor is everything a reader needs to rebuild one transform, so it is recorded per
item in the checkpoint metadata.  Parameters are sorted and percent-encoded so one transform
configuration has exactly one spelling.  Parsing is strict: a reader meets these strings in
untrusted files.  This module must not import torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import quote, unquote

from .errors import DescriptorError

_NAME = r"[A-Za-z][A-Za-z0-9_.\-]*"
# fullmatch everywhere: "$" would also accept a trailing newline
_NAME_RE = re.compile(rf"{_NAME}(?:@{_NAME})?")
_KEY_RE = re.compile(r"[a-z][a-z0-9_\-]*")
_VERSION_RE = re.compile(r"0|[1-9][0-9]{0,8}")
_SAFE = "-_.~+*"
MAX_DESCRIPTOR_LEN = 4096


@dataclass(frozen=True)
class Descriptor:
    """A parsed descriptor: transform name (with domain), integer version, parameters."""

    name: str
    version: int
    params: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise DescriptorError(f"invalid transform name {self.name!r}")
        if not isinstance(self.version, int) or self.version < 0:
            raise DescriptorError(f"invalid version {self.version!r} for {self.name!r}")
        for key, value in self.params.items():
            if not _KEY_RE.fullmatch(key):
                raise DescriptorError(f"invalid parameter name {key!r} for {self.name!r}")
            if not isinstance(value, str):
                raise DescriptorError(f"parameter {key!r} of {self.name!r} must be a string")
        object.__setattr__(self, "params", dict(sorted(self.params.items())))

    @property
    def domain(self) -> str | None:
        return self.name.partition("@")[2] or None

    def format(self) -> str:
        text = f"{self.name}/{self.version}"
        for key, value in self.params.items():
            text += f";{key}={quote(value, safe=_SAFE)}"
        return text

    def __str__(self) -> str:
        return self.format()


def parse(text: object) -> Descriptor:
    """Parse a descriptor string strictly; any deviation is a ``DescriptorError``."""
    if not isinstance(text, str):
        raise DescriptorError(f"descriptor must be a string, got {type(text).__name__}")
    if len(text) > MAX_DESCRIPTOR_LEN:
        raise DescriptorError(f"descriptor longer than {MAX_DESCRIPTOR_LEN} characters")
    head, *pairs = text.split(";")
    name, sep, version = head.partition("/")
    if not sep or not _NAME_RE.fullmatch(name):
        raise DescriptorError(f"malformed descriptor {text!r}: expected '<name>[@<domain>]/<version>'")
    if not _VERSION_RE.fullmatch(version):
        raise DescriptorError(f"malformed descriptor {text!r}: version must be a non-negative integer")
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _KEY_RE.fullmatch(key):
            raise DescriptorError(f"malformed parameter {pair!r} in descriptor {text!r}")
        if key in params:
            raise DescriptorError(f"duplicate parameter {key!r} in descriptor {text!r}")
        if any(c not in _SAFE and not c.isalnum() and c != "%" for c in value) or not value.isascii():
            raise DescriptorError(f"parameter {key!r} in {text!r} is not percent-encoded")
        try:
            params[key] = unquote(value, errors="strict")
        except UnicodeDecodeError as exc:
            raise DescriptorError(f"parameter {key!r} in {text!r} is not valid UTF-8") from exc
    desc = Descriptor(name, int(version), params)
    if desc.format() != text:
        raise DescriptorError(f"descriptor {text!r} is not in canonical form (expected {desc.format()!r})")
    return desc


def format_descriptor(name: str, version: int, params: Mapping[str, str] | None = None) -> str:
    return Descriptor(name, version, dict(params or {})).format()
