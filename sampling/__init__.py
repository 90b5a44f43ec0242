"""Text -> images: generate(), the COCO writer and multi-device workers."""
from .pipeline import generate

__all__ = ["generate"]
