"""The VAE against diffusers' AutoencoderKL, plus slicing, tiling, fp16 upcasting and loading."""
from __future__ import annotations

import pytest
import torch
from conftest import diffusers_kwargs, rel_err
from diffusers import AutoencoderKL as RefVAE
from safetensors.torch import save_file

from sdxl.config import SDXL_BASE, TINY, VAEConfig
from sdxl.vae import AutoencoderKL, load_vae
from sdxl.weights import CheckpointError

CFG = TINY.vae


def make_pair(cfg: VAEConfig = CFG):
    ref = RefVAE(**diffusers_kwargs(cfg.to_diffusers())).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_encode_decode_match_reference():
    ref, ours = make_pair()
    x = torch.rand(2, 3, 48, 80) * 2 - 1
    z = torch.randn(2, 4, 7, 5)
    with torch.no_grad():
        pa, pb = ref.encode(x).latent_dist, ours.encode(x)
        assert rel_err(pa.mean, pb.mean) <= 1e-5
        assert rel_err(pa.std, pb.std) <= 1e-5
        assert torch.equal(pb.mode(), pb.mean)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert rel_err(pa.sample(generator=g1), pb.sample(g2)) <= 1e-5
        assert rel_err(ref.decode(z).sample, ours.decode(z)) <= 1e-5


def test_full_config_names_and_shapes():
    with torch.device("meta"):
        ref = RefVAE(**diffusers_kwargs(SDXL_BASE.vae.to_diffusers()))
        ours = AutoencoderKL(SDXL_BASE.vae)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863


def test_sliced_equals_plain():
    _, vae = make_pair()
    z = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        plain = vae.decode(z)
        vae.use_slicing = True
        assert rel_err(plain, vae.decode(z)) <= 1e-5  # batch size changes conv algorithms, not results


def _drop_groupnorm(vae: AutoencoderKL):
    """Make the decoder's up path purely local, so tiling has an exact oracle: the untiled decode."""
    for name, m in list(vae.decoder.up_blocks.named_modules()):
        if isinstance(m, torch.nn.GroupNorm):
            parent = vae.decoder.up_blocks.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], torch.nn.Identity())
    vae.decoder.conv_norm_out = torch.nn.Identity()


def test_tiled_decode_exact_away_from_seams_without_norms():
    _, vae = make_pair()
    _drop_groupnorm(vae)
    z = torch.randn(1, 4, 112, 56)  # 896 x 448 px: two 512 px tiles, overlapping on latent rows 48..63
    with torch.no_grad():
        plain = vae.decode(z)
        vae.use_tiling, vae.tile_size, vae.tile_overlap = True, 512, 128
        tiled = vae.decode(z)
    assert tiled.shape == plain.shape
    # Away from the seam each pixel comes from one tile, 16 latent px (more than the up path's receptive
    # field) from that tile's inner border: exact. In the seam the two tiles' outputs are blended.
    away = torch.cat([torch.arange(0, 48 * 8), torch.arange(64 * 8, 112 * 8)])
    assert rel_err(plain[:, :, away], tiled[:, :, away]) <= 1e-5
    assert rel_err(plain, tiled) <= 0.05


def test_tiled_decode_close_with_norms():
    _, vae = make_pair()
    z = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        plain = vae.decode(z)
        vae.use_tiling, vae.tile_size, vae.tile_overlap = True, 256, 64
        tiled = vae.decode(z)
    # GroupNorm statistics are per tile, so this is approximate (as in every tiled VAE); the global
    # attention half runs untiled. Random weights exaggerate the per-tile statistics spread.
    assert (plain - tiled).abs().mean() < 0.15 * plain.abs().mean()


def test_tiled_encode_close():
    _, vae = make_pair()
    x = torch.rand(1, 3, 512, 384) * 2 - 1
    with torch.no_grad():
        plain = vae.encode(x).mean
        vae.use_tiling, vae.tile_size, vae.tile_overlap = True, 256, 128
        tiled = vae.encode(x).mean
    assert tiled.shape == plain.shape == (1, 4, 64, 48)
    assert (plain - tiled).abs().mean() < 0.15 * plain.abs().mean()


def test_fp16_upcasts_unless_fp16_safe():
    _, vae = make_pair()
    z = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        ref32 = vae.decode(z)
        vae.half()
        out = vae.decode(z)
    assert vae.dtype == torch.float32 and out.dtype == torch.float32  # upcast: the published VAE overflows in fp16
    assert rel_err(ref32, out) <= 1e-2  # weights were rounded to fp16 once
    safe = AutoencoderKL(VAEConfig(**{**CFG.__dict__, "force_upcast": False})).half().eval()
    with torch.no_grad():
        assert safe.decode(z).dtype == torch.float16


def test_load_vae_folder_and_file(tmp_path):
    ref, _ = make_pair()
    ref.save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae")
    assert vae.config == CFG
    z = torch.randn(1, 4, 5, 6)
    with torch.no_grad():
        assert rel_err(ref.decode(z).sample, vae.decode(z)) <= 1e-5
    save_file(ref.state_dict(), str(tmp_path / "vae.safetensors"))
    vae2 = load_vae(tmp_path / "vae.safetensors", config=CFG, dtype=torch.bfloat16)
    assert vae2.dtype == torch.bfloat16


def test_load_vae_bad_input(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_vae(tmp_path / "missing")
    (tmp_path / "vae").mkdir()
    with pytest.raises(CheckpointError, match="config.json: missing file"):
        load_vae(tmp_path / "vae")
    bad = tmp_path / "truncated.safetensors"
    ref, _ = make_pair()
    save_file(ref.state_dict(), str(bad))
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.safetensors: not a readable safetensors file"):
        load_vae(bad, config=CFG)
    sd = ref.state_dict()
    sd.pop("decoder.conv_out.bias")
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="missing key 'decoder.conv_out.bias'"):
        load_vae(tmp_path / "partial.safetensors", config=CFG)
