"""Text -> images: generate(), the COCO writer and multi-device workers."""


def __getattr__(name: str):
    # Lazy, so `generate.py --help` and its argument checks do not wait for torch.
    if name == "generate":
        from .pipeline import generate
        return generate
    raise AttributeError(f"module 'sampling' has no attribute {name!r}")


__all__ = ["generate"]
