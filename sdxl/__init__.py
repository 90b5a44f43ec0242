"""Minimal pure-PyTorch Stable Diffusion XL: `sdxl.load_model(path)` returns the bundle (.unet .vae .text)."""


def __getattr__(name: str):
    # Lazy, so `import sdxl.samplers` does not pay for importing transformers.
    if name in ("load_model", "SDXL"):
        from . import model
        return getattr(model, name)
    if name == "load_controlnet":
        from . import controlnet
        return controlnet.load_controlnet
    raise AttributeError(f"module 'sdxl' has no attribute {name!r}")


__all__ = ["SDXL", "load_controlnet", "load_model"]
