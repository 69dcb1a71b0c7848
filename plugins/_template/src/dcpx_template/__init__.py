"""A minimal dcpx plugin: one transform, registered through the ``dcpx`` entry point."""

from .plugin import TemplateTransform

__all__ = ["TemplateTransform"]
