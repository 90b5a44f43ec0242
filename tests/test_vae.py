"""The VAE against diffusers' AutoencoderKL, plus slicing, tiling, fp16 upcasting and loading."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
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


def test_scaled_latents_match_reference():
    """encode_latents / decode_latents against diffusers' AutoencoderKL and the scaling its pipelines apply, with
    the reference's own config values: (posterior mean - shift_factor) * scaling_factor, and its inverse."""
    ref, ours = make_pair(VAEConfig(**{**CFG.__dict__, "scaling_factor": 0.3611, "shift_factor": 0.1159}))
    sf, shift = ref.config.scaling_factor, ref.config.shift_factor
    x = torch.rand(3, 3, 48, 32) * 2 - 1
    z = torch.randn(3, 4, 6, 5)
    with torch.no_grad():
        latents = ours.encode_latents(x)
        assert latents.dtype == torch.float32
        assert rel_err((ref.encode(x).latent_dist.mean - shift) * sf, latents) <= 1e-5
        with inputs_of(ours.decoder.conv_in) as dec_in:
            images = ours.decode_latents(z)
        assert rel_err(ref.decode(z / sf + shift).sample, images) <= 1e-5
        assert [t.shape for t in dec_in] == [(1, 4, 6, 5)] * 3  # one image at a time
        assert ours.to(torch.bfloat16).encode_latents(x).dtype == torch.float32


def test_full_config_names_and_shapes():
    with torch.device("meta"):
        ref = RefVAE(**diffusers_kwargs(SDXL_BASE.vae.to_diffusers()))
        ours = AutoencoderKL(SDXL_BASE.vae)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863


@contextmanager
def inputs_of(module: torch.nn.Module):
    """Record the first positional input of every call to `module` while the block runs."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        yield seen
    finally:
        handle.remove()


def test_sliced_equals_plain():
    """Slicing runs the encoder and decoder once per image with batch 1, and changes no result."""
    _, vae = make_pair()
    z = torch.randn(3, 4, 6, 6)
    x = torch.rand(3, 3, 48, 32) * 2 - 1
    with torch.no_grad():
        plain, plain_mean = vae.decode(z), vae.encode(x).mean
        vae.use_slicing = True
        with inputs_of(vae.decoder.conv_in) as dec_in, inputs_of(vae.decoder.up_blocks[0]) as up_in:
            sliced = vae.decode(z)
        with inputs_of(vae.encoder.conv_in) as enc_in:
            sliced_mean = vae.encode(x).mean
    assert [t.shape for t in dec_in] == [(1, 4, 6, 6)] * 3 and [t.shape for t in up_in] == [(1, 64, 6, 6)] * 3
    assert [t.shape for t in enc_in] == [(1, 3, 48, 32)] * 3
    assert all(torch.equal(seen, x[i:i + 1]) for i, seen in enumerate(enc_in))  # image i, in order
    assert rel_err(plain, sliced) <= 1e-5  # batch size changes conv algorithms, not results
    assert rel_err(plain_mean, sliced_mean) <= 1e-5


def _drop_groupnorm(vae: AutoencoderKL):
    """Make the decoder's up path purely local, so tiling has an exact oracle: the untiled decode."""
    for name, m in list(vae.decoder.up_blocks.named_modules()):
        if isinstance(m, torch.nn.GroupNorm):
            parent = vae.decoder.up_blocks.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], torch.nn.Identity())
    vae.decoder.conv_norm_out = torch.nn.Identity()


def _ramp_profile(n: int, start: int, size: int, overlap: int, before: bool, after: bool) -> torch.Tensor:
    """One tile's blend weight along one axis, written out from sdxl/vae.py's documented layout: 0 outside the
    tile, 1 inside, rising linearly k / (overlap + 1), k = 1..overlap, over an overlap shared with the previous
    tile and falling the same way into the next one. In a layout whose tiles overlap by exactly `overlap`,
    neighbouring ramps sum to 1."""
    p = torch.zeros(n)
    p[start:start + size] = 1
    ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    if before:
        p[start:start + overlap] = ramp
    if after:
        p[start + size - overlap:start + size] = ramp.flip(0)
    return p


def _blend_by_hand(fn, x: torch.Tensor, ys, xs, tile: int, scale: float, overlap_out: int, out_ch: int):
    """Run `fn` on the tiles x[..., y:y+tile, x0:x0+tile] (tile grid ys x xs given by the caller) and blend them
    with `_ramp_profile` weights. Also returns the tiles' outputs for the caller's own checks."""
    H, W = int(x.shape[2] * scale), int(x.shape[3] * scale)
    sy, sx = int(min(tile, x.shape[2]) * scale), int(min(tile, x.shape[3]) * scale)  # a tile may be the whole side
    out = torch.zeros(x.shape[0], out_ch, H, W)
    total = torch.zeros(H, W)
    tiles = {}
    for i, y in enumerate(ys):
        for j, x0 in enumerate(xs):
            part = fn(x[:, :, y:y + tile, x0:x0 + tile])
            assert part.shape[-2:] == (sy, sx)
            tiles[y, x0] = part
            wy = _ramp_profile(H, int(y * scale), sy, overlap_out, i > 0, i < len(ys) - 1)
            wx = _ramp_profile(W, int(x0 * scale), sx, overlap_out, j > 0, j < len(xs) - 1)
            w = wy[:, None] * wx[None, :]
            out += F.pad(part, (int(x0 * scale), W - int(x0 * scale) - sx, int(y * scale), H - int(y * scale) - sy)) * w
            total += w
    assert torch.allclose(total, torch.ones(H, W), atol=1e-6)  # an exact-overlap layout: weights sum to 1
    return out, tiles


def test_tiled_decode_exact_away_from_seams_without_norms():
    """Oracles: the untiled decode away from the seams (with the norms removed the up path is local, so a pixel
    far enough from a tile border sees the same inputs); tiles decoded and blended by hand everywhere."""
    _, vae = make_pair()
    _drop_groupnorm(vae)
    # 512 x 64 px: 192 px (24 latent) tiles, 32 px (4 latent) overlap, stride 20 latent, one tile column: latent
    # rows 0..23, 20..43, 40..63. Output rows 160..191 and 320..351 are the seams.
    z = torch.randn(1, 4, 64, 8)
    with torch.no_grad():
        plain = vae.decode(z)
        vae.use_tiling, vae.tile_size, vae.tile_overlap = True, 192, 32
        with inputs_of(vae.decoder.up_blocks[0]) as tile_inputs:
            tiled = vae.decode(z)
        h = vae.decoder.head(vae.post_quant_conv(z))  # the untiled low-resolution half
        hand, tiles = _blend_by_hand(vae.decoder.up, h, [0, 20, 40], [0], 24, 8, 4 * 8, 3)
    assert tiled.shape == plain.shape == (1, 3, 512, 64)
    # The up path ran once per tile, on exactly the tiles of the layout above.
    assert [t.shape for t in tile_inputs] == [(1, 64, 24, 8)] * 3
    for y in (0, 20, 40):
        assert any(torch.equal(t, h[:, :, y:y + 24]) for t in tile_inputs), y
    # The up path's receptive field is ~8.5 latent px (measured), so pixels more than 9 latent px from their
    # tile's inner borders match the untiled decode exactly: latent rows < 15, 29..34 and >= 49 (1 px margin).
    away = torch.cat([torch.arange(0, 14 * 8), torch.arange(30 * 8, 34 * 8), torch.arange(50 * 8, 64 * 8)])
    assert rel_err(plain[:, :, away], tiled[:, :, away]) <= 1e-5
    # Everywhere, seams included, the linear blend written out above (same fp32 ops: measured 0.0, 4 seeds).
    assert rel_err(hand, tiled) <= 1e-6
    # The blend is not vacuous: in a seam the two tiles disagree (0.56..0.71 measured, 4 seeds), so a hard seam
    # or a plain average of the tiles would fail the check above.
    assert rel_err(tiles[0, 0][:, :, 160:192], tiles[20, 0][:, :, :32]) > 0.05


def test_tiled_decode_close_with_norms():
    """With GroupNorm (statistics per tile) tiling is approximate. Oracles: tiles decoded and blended by hand
    (exact), the untiled decode (close, and measurably different in the seams: tiling did run)."""
    _, vae = make_pair()
    # 128 px (16 latent) tiles, 32 px (4 latent) overlap, stride 12: a 2 x 2 grid on a 28 x 28 latent.
    z = torch.randn(1, 4, 28, 28)
    with torch.no_grad():
        plain = vae.decode(z)
        vae.use_tiling, vae.tile_size, vae.tile_overlap = True, 128, 32
        with inputs_of(vae.decoder.up_blocks[0]) as tile_inputs:
            tiled = vae.decode(z)
        h = vae.decoder.head(vae.post_quant_conv(z))
        hand, _ = _blend_by_hand(vae.decoder.up, h, [0, 12], [0, 12], 16, 8, 4 * 8, 3)
    assert tiled.shape == plain.shape == (1, 3, 224, 224)
    assert [t.shape for t in tile_inputs] == [(1, 64, 16, 16)] * 4
    for y in (0, 12):
        for x0 in (0, 12):
            assert any(torch.equal(t, h[:, :, y:y + 16, x0:x0 + 16]) for t in tile_inputs), (y, x0)
    assert rel_err(hand, tiled) <= 1e-6  # same fp32 ops: measured 4e-8..7e-8 (4 seeds)
    # Close to the untiled decode, as the attention half runs untiled; small tiles and random weights exaggerate
    # the spread of per-tile statistics: mean error 17%..21% of the mean magnitude measured (3 seeds).
    assert (plain - tiled).abs().mean() < 0.3 * plain.abs().mean()
    # ... but not identical, in the seams (output rows and columns 96..127) too: 0.22..0.39 measured.
    seam = slice(96, 128)
    assert rel_err(plain[:, :, seam], tiled[:, :, seam]) > 0.01
    assert rel_err(plain[:, :, :, seam], tiled[:, :, :, seam]) > 0.01


def test_tiled_encode_close():
    """The encoder's full-resolution half, tiled: checked as the decoder's (hand-blended tiles exact, the untiled
    encode close but different)."""
    _, vae = make_pair()
    # 128 px tiles, 32 px overlap, stride 96 px: a 2 x 2 grid on 224 x 224 px; each tile -> 16 x 16 latent.
    x = torch.rand(1, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        plain = vae.encode(x).mean
        vae.use_tiling, vae.tile_size, vae.tile_overlap = True, 128, 32
        with inputs_of(vae.encoder.conv_in) as tile_inputs:
            tiled = vae.encode(x).mean
        h, _ = _blend_by_hand(vae.encoder.down, x, [0, 96], [0, 96], 128, 1 / 8, 4, 64)
        hand = vae.quant_conv(vae.encoder.head(h)).chunk(2, dim=1)[0]
    assert tiled.shape == plain.shape == (1, 4, 28, 28)
    assert [t.shape for t in tile_inputs] == [(1, 3, 128, 128)] * 4
    for y in (0, 96):
        for x0 in (0, 96):
            assert any(torch.equal(t, x[:, :, y:y + 128, x0:x0 + 128]) for t in tile_inputs), (y, x0)
    assert rel_err(hand, tiled) <= 1e-6  # measured 2.6e-7..3.5e-7 (4 seeds)
    assert (plain - tiled).abs().mean() < 0.2 * plain.abs().mean()  # measured 10%..13% (3 seeds)
    assert rel_err(plain, tiled) > 0.01  # measured 0.15..0.33: GroupNorm statistics are per tile


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
