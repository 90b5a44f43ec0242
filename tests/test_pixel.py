"""Pixel-space SDXL: patch codec, body initialisation, JiT objective, sampling, the three training stages,
post-hoc EMA, and the built-in demo."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import sdxl
import train_sdxl
from sampling.pixel import generate_pixel
from sdxl.patch_codec import (DEMO, PIXEL_PRESETS, PixelUNet, is_pixel_folder, load_pixel_model, patchify,
                              pixel_config_from_latent, pixel_from_latent, unpatchify)
from sdxl.samplers import flow_sigmas
from training import pixel, post_hoc_ema
from training.demo_data import (COLOURS, Combo, colour_adherence, draw, held_out_combos, shape_colour,
                                train_combos)
from training.loop import build_optimizer


@pytest.fixture(scope="module")
def latent():
    return sdxl.load_model("tiny", seed=3)


@pytest.fixture(scope="module")
def latent_folder(latent, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher") / "tiny"
    latent.save_pretrained(folder)
    return folder


# ---- codec ----------------------------------------------------------------------------------------------------

def test_patchify_layout_and_round_trip():
    x = torch.randn(2, 3, 32, 48)
    p = patchify(x, 16)
    assert p.shape == (2, 3 * 256, 2, 3)
    # Oracle: position (i, j) holds the 16x16 patch at rows 16i.., columns 16j.., channel-major.
    assert torch.equal(p[1, :, 1, 2], x[1, :, 16:32, 32:48].reshape(-1))
    assert torch.equal(unpatchify(p, 16), x)
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        patchify(torch.randn(1, 3, 40, 32), 16)


def test_sdxl_base_shapes_on_meta():
    """At 1024 px: patch 16 enters level 1 with 64x64x320 and leaves with 64x64x640; patch 32 enters level 2."""
    base = sdxl.config.SDXL_BASE
    for res, (P, size, c_in, c_out) in {64: (16, 64, 320, 640), 32: (32, 32, 640, 1280)}.items():
        cfg = pixel_config_from_latent(base.unet, base.text_encoder, base.text_encoder_2, res)
        assert (cfg.patch_size, cfg.entry_channels, cfg.exit_channels) == (P, c_in, c_out)
        with torch.device("meta"):
            unet = PixelUNet(cfg)
            x = torch.zeros(1, 3, 1024, 1024)
            h = unet.encoder(x)
            assert h.shape == (1, c_in, size, size)
            temb = unet.embed(torch.zeros(1), torch.zeros(1, 1280), torch.zeros(1, 6), 1, x.device)
            out = unet.body(h, temb, torch.zeros(1, 77, 2048))
            assert out.shape == (1, c_out, size, size)
            assert unet.decoder(out).shape == (1, 3, 1024, 1024)


def test_pixel_unet_any_multiple_and_bad_size(latent):
    model = pixel_from_latent(latent, 64)
    ctx, pooled = latent.text.encode(["a"])
    y = model.unet(torch.randn(1, 3, 96, 64), 500.0, ctx, pooled, torch.zeros(1, 6))
    assert y.shape == (1, 3, 96, 64)
    with pytest.raises(ValueError, match="not a multiple of 32"):  # patch 16 x the body's one downsampling
        model.unet(torch.randn(1, 3, 80, 64), 500.0, ctx, pooled, torch.zeros(1, 6))


def test_body_initialises_from_latent_and_matches_its_hidden_states(latent):
    """The body's keys are the latent UNet's; run from the latent UNet's level-1 entry tensor it reproduces the
    latent UNet's level-1 up-path output (hooks on the latent UNet are the oracle)."""
    model = pixel_from_latent(latent, 64)
    lsd = latent.unet.state_dict()
    body = [n for n in model.unet.state_dict() if not n.startswith(("encoder.", "decoder."))]
    assert len(body) > 50
    for n in body:
        assert torch.equal(model.unet.state_dict()[n], lsd[n]), n
    dropped = set(lsd) - set(body)
    assert all(k.startswith(("conv_in", "conv_out", "conv_norm_out", "down_blocks.0.", "up_blocks.2.",
                             "up_blocks.1.upsamplers")) for k in dropped)

    got = {}
    u = latent.unet
    h1 = u.down_blocks[0].downsamplers[0].register_forward_hook(lambda m, a, o: got.__setitem__("entry", o))
    h2 = u.up_blocks[1].upsamplers[0].register_forward_pre_hook(lambda m, a: got.__setitem__("exit", a[0]))
    torch.manual_seed(0)
    x, ctx, pooled, ids = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64), torch.randn(2, 32), torch.rand(2, 6)
    t = torch.tensor([10.0, 700.0])
    u(x, t, ctx, pooled, ids)
    h1.remove(), h2.remove()
    out = model.unet.body(got["entry"], model.unet.embed(t, pooled, ids, 2, x.device), ctx)
    torch.testing.assert_close(out, got["exit"], atol=1e-5, rtol=1e-5)


# ---- objective and sampling -----------------------------------------------------------------------------------

def test_velocity_loss_by_hand():
    x = torch.tensor([[[[1.0, -1.0]]], [[[0.5, 0.0]]]])  # (2, 1, 1, 2)
    e = torch.tensor([[[[0.0, 2.0]]], [[[1.0, -1.0]]]])
    t = torch.tensor([0.5, 0.99])
    z = pixel.jit_noise(x, e, t, noise_scale=2.0)
    # z = t x + (1 - t) 2 e
    assert torch.allclose(z, torch.tensor([[[[0.5, 1.5]]], [[[0.495 + 0.02, -0.02]]]]))
    x_pred = torch.tensor([[[[0.0, 0.0]]], [[[0.5, 1.0]]]])
    loss = pixel.velocity_loss(x_pred, x, z, t, t_eps=0.05)
    # sample 0: 1 - t = 0.5; v - v_pred = (x - x_pred) / 0.5 = (2, -2) -> mean 4
    # sample 1: 1 - t = 0.01 < 0.05 -> / 0.05; x - x_pred = (0, -1) -> (0, -20) -> mean 200
    torch.testing.assert_close(loss, torch.tensor([4.0, 200.0]))


def _net_only(model, prompt, H, W, noise, steps, heun=False):
    """Hand-written flow Euler / Heun over the x0-predicting net, no guidance: the oracle for generate_pixel."""
    ctx, pooled = model.text.encode([prompt])
    ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=torch.float32)
    net = lambda x, s: model.unet(x, 1000 * s, ctx, pooled, ids)  # noqa: E731
    s = flow_sigmas(steps).sigmas
    x = noise * model.config.noise_scale
    for i in range(steps):
        d = (x - net(x, s[i])) / s[i]
        x_next = x + d * (s[i + 1] - s[i])
        if heun and s[i + 1] > 0:
            d2 = (x_next - net(x_next, s[i + 1])) / s[i + 1]
            x_next = x + (d + d2) / 2 * (s[i + 1] - s[i])
        x = x_next
    return x


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_generate_pixel_is_flow_sampling_of_the_x0_net(latent, sampler):
    torch.manual_seed(1)
    model = pixel_from_latent(latent, 64).eval()
    noise = torch.randn(1, 3, 64, 64)
    got = generate_pixel(model, "a cat", height=64, width=64, steps=4, guidance_scale=1.0, sampler=sampler,
                         latents=noise, output_type="pt")
    want = _net_only(model, "a cat", 64, 64, noise, 4, heun=sampler == "heun")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="does not apply to a pixel model"):
        generate_pixel(model, "a", height=64, width=64, sampler="dpmpp_2m")
    with pytest.raises(ValueError, match="multiples of 32"):
        generate_pixel(model, "a", height=48, width=64)


def test_generate_pixel_seeds_and_guidance_interval(latent):
    model = pixel_from_latent(latent, 64).eval()
    kw = dict(height=32, width=32, steps=3, guidance_scale=4.0, sampler="euler", output_type="pt")
    # Image i's noise comes from its own generator seeded with seed + i.
    both = generate_pixel(model, ["a", "b"], seed=5, **kw)
    noise = torch.cat([torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    assert torch.equal(both, generate_pixel(model, ["a", "b"], latents=noise, **kw))
    one = generate_pixel(model, ["b"], seed=6, **kw)
    # An interval that excludes every step equals no guidance at all.
    off = generate_pixel(model, ["b"], seed=6, guidance_interval=(2000, 3000), **kw)
    plain = generate_pixel(model, ["b"], seed=6, **{**kw, "guidance_scale": 1.0})
    torch.testing.assert_close(off, plain)
    assert not torch.allclose(one, plain)


def test_save_load_round_trip(latent, latent_folder, tmp_path):
    model = pixel_from_latent(latent, 64)
    model.save_pretrained(tmp_path / "px")
    assert is_pixel_folder(tmp_path / "px") and not is_pixel_folder(latent_folder)
    back = load_pixel_model(tmp_path / "px")
    assert back.config == model.config
    for (n, a), (m, b) in zip(model.unet.state_dict().items(), back.unet.state_dict().items()):
        assert n == m and torch.equal(a, b)
    noise = torch.randn(1, 3, 32, 32)
    a = generate_pixel(model, "x", height=32, width=32, steps=2, latents=noise, output_type="pt")
    b = generate_pixel(back, "x", height=32, width=32, steps=2, latents=noise, output_type="pt")
    torch.testing.assert_close(a, b)


# ---- training stages ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i, combo in enumerate(train_combos()[:4]):
        Image.fromarray(draw(combo, 64, rng)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(combo.caption)
    return root


def _unet_state(folder):
    return load_pixel_model(folder).unet.state_dict()


def _spy_on_training(monkeypatch) -> dict:
    """Record what training.pixel.main builds: the model, the optimizer, and every parameter just before and just
    after the optimizer's first step."""
    seen: dict = {}
    load_pixel = pixel.load_pixel

    def load(*args, **kwargs):
        seen["model"] = load_pixel(*args, **kwargs)
        return seen["model"]

    def first_step(key):
        def hook(opt, *_):
            if key not in seen:
                seen[key] = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
        return hook

    def optimizer(*args, **kwargs):
        opt = seen["optimizer"] = build_optimizer(*args, **kwargs)
        opt.register_step_pre_hook(first_step("before"))
        opt.register_step_post_hook(first_step("after"))
        return opt

    monkeypatch.setattr(pixel, "load_pixel", load)
    monkeypatch.setattr(pixel, "build_optimizer", optimizer)
    return seen


def _check_body_and_codec_rates(seen: dict, codec_lr: float, body_lr: float) -> None:
    """A full-stage run: the optimizer holds two groups, the codec (encoder + decoder) at `codec_lr` and the body
    (every other UNet parameter) at `body_lr`, and its first step moved each group's weights by that rate.
    Oracle for the moves: AdamW's first step without weight decay is exactly lr * g / (|g| + eps) per element
    (m and v bias-corrected are g and g^2), so |delta| = lr wherever |g| >> eps, and never more."""
    names = {id(p): n for n, p in seen["model"].unet.named_parameters()}
    groups = seen["optimizer"].param_groups
    codec = sorted(n for n in names.values() if n.startswith(("encoder.", "decoder.")))
    body = sorted(n for n in names.values() if not n.startswith(("encoder.", "decoder.")))
    assert len(body) > 50 and len(codec) > 5
    assert [(g["name"], g["lr"], sorted(names[id(p)] for p in g["params"])) for g in groups] == [
        ("codec", codec_lr, codec), ("body", body_lr, body)]
    for before, after, name, lr in zip(seen["before"], seen["after"], ("codec", "body"), (codec_lr, body_lr)):
        delta = torch.cat([(b - a).abs().flatten() for a, b in zip(before, after)]) / lr
        # 2e-3: fp32 rounding of w + delta for |w| <= 1 is at most 6e-8, 6e-4 of a step of 1e-4 (measured: max
        # 1 + 1.7e-4, median 1 - 4.3e-4, the median below 1 from the elements whose |g| is near eps).
        assert delta.max() < 1 + 2e-3 and abs(delta.median() - 1) < 2e-3, (name, delta.max(), delta.median())


def test_three_stages_run(latent_folder, data_dir, tmp_path, monkeypatch):
    common = ["--model_type", "pixel", "--data_dir", str(data_dir), "--image_size", "64", "--bucket_step", "32",
              "--batch_size", "2", "--max_steps", "2", "--precision", "fp32", "--num_workers", "0",
              "--learning_rate", "1e-3"]
    # (1) distil the encoder from the latent teacher; body and decoder stay
    pixel_from_latent(sdxl.load_model(str(latent_folder)), 64).save_pretrained(tmp_path / "s0")
    assert train_sdxl.main(common + ["--pretrained_model", str(tmp_path / "s0"), "--teacher_checkpoint",
                                     str(latent_folder), "--train_encoder", "encoder",
                                     "--output_dir", str(tmp_path / "s1")]) == 0
    start = _unet_state(tmp_path / "s0")
    s1 = _unet_state(tmp_path / "s1" / "final")
    assert not torch.equal(s1["encoder.conv_in.weight"], start["encoder.conv_in.weight"])
    assert all(torch.equal(s1[k], start[k]) for k in s1 if not k.startswith("encoder."))
    # (2) codec on the pixel objective, body frozen
    assert train_sdxl.main(common + ["--pretrained_model", str(tmp_path / "s1" / "final"), "--lr_sdxl_unet_body",
                                     "0", "--output_dir", str(tmp_path / "s2")]) == 0
    s2 = _unet_state(tmp_path / "s2" / "final")
    assert not torch.equal(s2["decoder.conv_out.weight"], s1["decoder.conv_out.weight"])
    assert all(torch.equal(s2[k], s1[k]) for k in s2 if not k.startswith(("encoder.", "decoder.")))
    # (3) everything, the body at its own rate (without weight decay, so that the first step's size is the rate);
    # metrics, config and EMA snapshots written
    seen = _spy_on_training(monkeypatch)
    assert train_sdxl.main(common + ["--pretrained_model", str(tmp_path / "s2" / "final"), "--lr_sdxl_unet_body",
                                     "1e-4", "--weight_decay", "0", "--output_dir", str(tmp_path / "s3")]) == 0
    _check_body_and_codec_rates(seen, codec_lr=1e-3, body_lr=1e-4)
    s3 = _unet_state(tmp_path / "s3" / "final")
    assert not torch.equal(s3["mid_block.resnets.0.conv1.weight"], s2["mid_block.resnets.0.conv1.weight"])
    lines = (tmp_path / "s3" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert json.loads((tmp_path / "s3" / "config.json").read_text())["lr_sdxl_unet_body"] == 1e-4
    assert len(post_hoc_ema.list_snapshots(tmp_path / "s3" / "ema_snapshots")) == 4  # steps 1, 2 x two stds


def test_resume_continues_exactly(latent_folder, data_dir, tmp_path):
    """2 steps, a checkpoint, --resume latest to step 3 == 3 steps in one go (weights, optimizer, power EMAs)."""
    common = ["--model_type", "pixel", "--data_dir", str(data_dir), "--image_size", "64", "--bucket_step", "32",
              "--batch_size", "2", "--precision", "fp32", "--num_workers", "0", "--learning_rate", "1e-3",
              "--pretrained_model", str(latent_folder)]
    assert train_sdxl.main(common + ["--max_steps", "3", "--output_dir", str(tmp_path / "a")]) == 0
    assert train_sdxl.main(common + ["--max_steps", "2", "--save_interval_steps", "2",
                                     "--output_dir", str(tmp_path / "b")]) == 0
    assert train_sdxl.main(common + ["--max_steps", "3", "--resume", "latest", "--output_dir", str(tmp_path / "b")]) == 0
    a, b = _unet_state(tmp_path / "a" / "final"), _unet_state(tmp_path / "b" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea = load_file(str(tmp_path / "a" / "ema_snapshots" / "step_000003_std0.050.safetensors"))
    eb = load_file(str(tmp_path / "b" / "ema_snapshots" / "step_000003_std0.050.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_bad_inputs_exit_2(latent, latent_folder, data_dir, tmp_path, capsys):
    common = ["--model_type", "pixel", "--data_dir", str(data_dir), "--bucket_step", "32", "--max_steps", "1",
              "--precision", "fp32", "--num_workers", "0", "--pretrained_model", str(latent_folder)]
    pixel_from_latent(latent, 64).save_pretrained(tmp_path / "px")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "junk.safetensors"))
    for extra, message in (
            (["--image_size", "80", "--bucket_step", "16"], "--image_size 80 is not a multiple of 32"),
            (["--image_size", "64", "--teacher_checkpoint", str(tmp_path / "px")], "is a pixel model"),
            (["--image_size", "64", "--teacher_checkpoint", str(tmp_path / "junk.safetensors")], "not a latent SDXL")):
        assert train_sdxl.main(common + extra + ["--output_dir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


# ---- post-hoc EMA ---------------------------------------------------------------------------------------------

def test_std_exp_inverse_and_known_values():
    # EDM2's reference lengths: gamma 16.97 <-> sigma_rel 0.05, gamma 6.94 <-> 0.10.
    assert abs(post_hoc_ema.std_to_exp(0.05) - 16.97) < 0.01 and abs(post_hoc_ema.std_to_exp(0.10) - 6.94) < 0.01
    for g in (0.5, 3.0, 20.0):
        assert abs(post_hoc_ema.std_to_exp(post_hoc_ema.exp_to_std(g)) - g) < 1e-9


def _trajectory(T: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    steps = torch.arange(1, T + 1, dtype=torch.float64)[:, None]
    walk = torch.randn(T, 3, generator=g, dtype=torch.float64).cumsum(0)
    return torch.sin(steps / 150 + torch.arange(3)) + 0.02 * walk


def test_post_hoc_ema_reconstruction(tmp_path):
    """Snapshots of the std 0.05 / 0.10 power EMAs of a known trajectory every 100 steps; the reconstruction for a
    stored profile is that snapshot exactly, and for std 0.07 it matches the 0.07 power EMA run directly."""
    T = 2000
    theta = _trajectory(T)
    p = torch.nn.Parameter(theta[0].float().clone())
    ema = post_hoc_ema.PowerEMA([("w", p)], (0.05, 0.10), "cpu")
    direct = post_hoc_ema.PowerEMA([("w", p)], (0.07,), "cpu")
    for step in range(1, T + 1):
        p.data.copy_(theta[step - 1])
        ema.update(step), direct.update(step)
        if step % 100 == 0:
            ema.save_snapshots(tmp_path, step)
    snap = load_file(str(tmp_path / "step_001500_std0.100.safetensors"))["w"]
    weights, mix = post_hoc_ema.reconstruct(tmp_path, 0.10, 1500)
    torch.testing.assert_close(weights["w"], snap, atol=1e-5, rtol=1e-5)
    assert max(mix.values()) == pytest.approx(1.0, abs=1e-6)
    weights, _ = post_hoc_ema.reconstruct(tmp_path, 0.07)
    err = (weights["w"] - direct.shadows[0]["w"]).abs().max().item()
    spread = (ema.shadows[0]["w"] - ema.shadows[1]["w"]).abs().max().item()
    assert err < 0.05 * spread, (err, spread)
    # the command line
    assert post_hoc_ema.main(["--snapshots", str(tmp_path), "--target_std", "0.07", "--out",
                              str(tmp_path / "out" / "w.safetensors")]) == 0
    torch.testing.assert_close(load_file(str(tmp_path / "out" / "w.safetensors"))["w"], weights["w"])
    assert post_hoc_ema.main(["--snapshots", str(tmp_path / "none"), "--target_std", "0.07", "--out",
                              str(tmp_path / "x.safetensors")]) == 2


# ---- the demo -------------------------------------------------------------------------------------------------

def test_demo_data_and_score():
    held, train = held_out_combos(), train_combos()
    assert len(held) == 12 and len(train) == 42 and not set(held) & set(train)
    for colour in COLOURS:  # every colour is trained with every shape and background
        assert {c.shape for c in train if c.colour == colour} == {"circle", "square", "triangle"}
        assert {c.background for c in train if c.colour == colour} == {"white", "black", "gray"}
    rng = np.random.default_rng(0)
    combos = held * 2
    images = [draw(c, 64, rng) for c in combos]
    assert colour_adherence(images, combos) == 1.0
    wrong = [Combo("blue" if c.colour != "blue" else "red", c.shape, c.background) for c in combos]
    assert colour_adherence(images, wrong) == 0.0
    assert shape_colour(np.full((64, 64, 3), 255, np.uint8), "white") is None


@pytest.mark.slow  # the whole 1000-step demo (minutes); CI runs it, `-m 'not slow'` skips it locally
def test_demo_learns_colours(tmp_path, capsys):
    """A shortened demo (fewer steps) through the real entry point: the held-out colour adherence is far above
    chance (1/6), and the outputs load with sdxl.load_model's pixel path."""
    rc = train_sdxl.main(["--demo", "--output_dir", str(tmp_path), "--max_steps", "1000", "--sample_steps", "8",
                          "--sample_sampler", "euler"])
    assert rc == 0
    out = capsys.readouterr().out
    score = float(out.split("prompt adherence")[1].split(":")[1].split()[0])
    print(f"demo test adherence: {score:.3f}")
    assert score >= 0.5, out
    assert (tmp_path / "samples.png").is_file() and is_pixel_folder(tmp_path / "final")
    model = load_pixel_model(tmp_path / "final")
    assert model.config == DEMO and "pixel-demo" in PIXEL_PRESETS


def test_nonfinite_steps_stop_pixel_training(tmp_path, monkeypatch, capsys):
    """The pixel trainer follows the latent one: ten non-finite steps in a row save and exit 1."""
    import train_sdxl
    from training import pixel
    real = pixel.pixel_loss
    monkeypatch.setattr(pixel, "pixel_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    out = tmp_path / "run"
    code = train_sdxl.main(["--demo", "--output_dir", str(out), "--max_steps", "30", "--batch_size", "2",
                            "--num_workers", "0"])
    assert code == 1
    assert "10 non-finite steps in a row" in capsys.readouterr().err
    assert (out / "checkpoints" / "step_000010").is_dir() and not (out / "final").exists()
