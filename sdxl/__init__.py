"""Minimal pure-PyTorch Stable Diffusion XL."""
