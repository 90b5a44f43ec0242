"""generate() beyond text: img2img, inpainting (4- and 9-channel UNets), the refiner and prompt emphasis, against
diffusers' StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline / denoising_end + denoising_start on
the tiny preset with the same weights. The init latents the reference gets are made by its own image processor and
VAE (the posterior mean), so our image loading and encoding are checked too; the noise comes from per-image
generators seeded as generate()'s seeds."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import diffusers_kwargs
from diffusers import (StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from PIL import Image, ImageDraw
from test_generate import main_in_process, pixels, png_text_chunks, snapshot
from test_pipeline import PROMPTS, SCHEDULERS, models  # noqa: F401  (the shared tiny model and its reference)

import sdxl
from sampling import generate
from sampling.pipeline import image_noise, load_images
from sdxl.config import TINY, UNetConfig
from sdxl.model import SDXL, _single_file_config, build_model
from sdxl.prompts import parse_emphasis
from sdxl.unet import UNet

H, W, STEPS, SEEDS = 64, 48, 7, [3, 4]
KW = dict(height=H, width=W, steps=STEPS, guidance_scale=5.0, seed=SEEDS)


def pictures(n: int = 2, size=(W, H)) -> list[Image.Image]:
    """Smooth shapes on a gradient: images a VAE reconstructs, unlike noise."""
    out = []
    for i in range(n):
        grad = np.linspace(0, 255, size[0])[None, :, None] * np.ones((size[1], 1, 1)) * [[[1, 0.5, 0.2 + 0.3 * i]]]
        im = Image.fromarray(grad.astype(np.uint8))
        ImageDraw.Draw(im).ellipse([6 + 4 * i, 10, size[0] - 8, size[1] - 12], fill=(200, 40 * i, 90))
        out.append(im)
    return out


def masks(n: int = 2, size=(W, H)) -> list[Image.Image]:
    """White (repaint) rectangles covering about the upper-left third, in grey levels either side of 0.5."""
    out = []
    for i in range(n):
        m = Image.new("L", size, 0)
        ImageDraw.Draw(m).rectangle([0, 0, size[0] // 2 + 8 * i, size[1] // 2], fill=255 - 100 * i)
        out.append(m)
    return out


def ref_latents(pipe, images, masks_=None) -> torch.Tensor:
    """The reference's own preprocessing and VAE posterior mean (times the scaling factor); with masks, the latents
    of the image with the mask region blacked out, as its inpaint pipeline makes them."""
    x = pipe.image_processor.preprocess(images, height=H, width=W).float()
    if masks_ is not None:
        x = x * (pipe.mask_processor.preprocess(masks_, height=H, width=W) < 0.5)
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def gens(seeds=SEEDS) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]  # image_noise's draws


def as_np(pt: torch.Tensor) -> np.ndarray:
    return (pt.permute(0, 2, 3, 1).numpy() / 2 + 0.5).clip(0, 1)


def scheduler(pipe, sampler: str):
    cls, kw = SCHEDULERS[sampler]
    return cls.from_config(pipe.published_scheduler_config, **kw)


def tiny_refiner(folder, seed: int, **unet) -> tuple:
    """A tiny model with bigG only and another UNet config, saved; (ours loaded back, the folder)."""
    cfg = TINY.replace(unet=dataclasses.replace(TINY.unet, **unet), text_encoder=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        build_model(cfg).save_pretrained(folder)
    return sdxl.load_model(folder), folder


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    """A tiny refiner (bigG only, 5 time ids with the aesthetic score, its own VAE) and its diffusers pipeline."""
    model, folder = tiny_refiner(tmp_path_factory.mktemp("refiner"), 7, cross_attention_dim=32, num_time_ids=5)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.published_scheduler_config = dict(pipe.scheduler.config)
    assert model.config.unet.num_time_ids == 5 and pipe.config.requires_aesthetics_score
    pipe.folder = folder
    return model, pipe


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_img2img_matches_reference(models, sampler):
    model, pipe = models
    ref_pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe, scheduler=scheduler(pipe, sampler))
    images = pictures(size=(2 * W - 8, 2 * H + 8))  # resized (Lanczos) to the output size, as the reference does
    ref = ref_pipe(PROMPTS, image=ref_latents(ref_pipe, images), strength=0.6, num_inference_steps=STEPS,
                   guidance_scale=5.0, generator=gens(), output_type="np").images
    ours = as_np(generate(model, PROMPTS, init_image=images, strength=0.6, sampler=sampler, output_type="pt", **KW))
    assert np.abs(ours - ref).max() <= 1 / 255
    if sampler != "euler":
        return
    # The image matters (the comparison is not of two pure-noise runs), and so does the noise: `latents` is it.
    plain = as_np(generate(model, PROMPTS, sampler=sampler, output_type="pt", **KW))
    other = generate(model, PROMPTS, init_image=images, strength=0.6, sampler=sampler, output_type="pt",
                     latents=image_noise([8, 9], (4, H // 8, W // 8)), **{**KW, "seed": 0})
    assert np.abs(ours - plain).mean() > 0.02 and np.abs(ours - as_np(other)).mean() > 0.005


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_karras"])
def test_inpaint_matches_reference(models, sampler):
    """A 4-channel model: the known region blended back after every step, as the reference inpaint pipeline (DDIM:
    its last level is sigma_min, not 0; DPM-Solver: multistep)."""
    model, pipe = models
    ref_pipe = StableDiffusionXLInpaintPipeline.from_pipe(pipe, scheduler=scheduler(pipe, sampler))
    images, ms = pictures(), masks()
    ref = ref_pipe(PROMPTS, image=ref_latents(ref_pipe, images), mask_image=ms, strength=0.6, height=H, width=W,
                   num_inference_steps=STEPS, guidance_scale=5.0, generator=gens(), output_type="np").images
    ours = generate(model, PROMPTS, init_image=images, mask_image=ms, strength=0.6, sampler=sampler,
                    output_type="latent", **KW)
    assert np.abs(as_np(model.decode(ours)) - ref).max() <= 1 / 255
    # Outside the mask the latents are the init image's exactly, so the decoded pixels there are its VAE round trip
    # (up to what the decoder mixes across the image: GroupNorm statistics, the mid-block attention).
    keep = torch.nn.functional.interpolate(torch.stack([torch.from_numpy(np.asarray(m) < 128) for m in ms])[:, None]
                                           .float(), size=(H // 8, W // 8))
    x0 = model.encode(load_images(images, 2, H, W))
    assert torch.equal(ours * keep, x0 * keep) and (ours - x0).abs().amax(dim=(1, 2, 3)).min() > 0.1


def test_inpainting_unet_9_channels_matches_reference(models):
    """The published inpainting layout: mask and masked-image latents as extra input channels, no blending; from
    pure noise at strength 1. A diffusers config and a single file's header (no metadata) give in_channels 9."""
    base, pipe = models
    cfg = TINY.replace(unet=dataclasses.replace(TINY.unet, in_channels=9))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = SDXL(cfg, UNet(cfg.unet).eval(), base.vae, base.text)  # the text towers and VAE of the fixture
    theirs = UNet2DConditionModel(**diffusers_kwargs(cfg.unet.to_diffusers()))
    theirs.load_state_dict(model.unet.state_dict())
    ref_pipe = StableDiffusionXLInpaintPipeline.from_pipe(pipe, unet=theirs, scheduler=scheduler(pipe, "euler"))
    assert model.space(H, W) == (4, H // 8, W // 8)
    images, ms = pictures(), masks()
    ref = ref_pipe(PROMPTS, image=ref_latents(ref_pipe, images), mask_image=ms, masked_image_latents=ref_latents(
        ref_pipe, images, ms), strength=1.0, height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0,
        generator=gens(), output_type="np").images
    ours = generate(model, PROMPTS, init_image=images, mask_image=ms, strength=1.0, output_type="pt", **KW)
    assert np.abs(as_np(ours) - ref).max() <= 1 / 255
    unmasked = generate(model, PROMPTS, init_image=images, mask_image=[Image.new("L", (W, H), 0)] * 2,
                        strength=1.0, output_type="pt", **KW)
    assert (ours - unmasked).abs().mean() > 0.01  # the mask channels are read
    assert UNetConfig.from_diffusers(cfg.unet.to_diffusers()).in_channels == 9  # what a unet/ folder gives
    header = {k: torch.empty(v.shape, device="meta") for k, v in model.original_state_dict().items()}
    assert _single_file_config(Path("x.safetensors"), header, {}).unet.in_channels == 9
    with pytest.raises(ValueError, match="needs init_image and mask_image"):
        generate(model, PROMPTS, init_image=images, **KW)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_karras"])
def test_refiner_ensemble_matches_denoising_end_and_start(models, refiner, sampler):
    model, pipe = models
    ref_model, ref_pipe = refiner
    base = StableDiffusionXLPipeline.from_pipe(pipe, scheduler=scheduler(pipe, sampler))
    ref_pipe.scheduler = scheduler(ref_pipe, sampler)
    noise = image_noise(SEEDS, (4, H // 8, W // 8))
    mid = base(PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0, latents=noise.clone(),
               denoising_end=0.8, output_type="latent").images
    ref = ref_pipe(PROMPTS, image=mid, num_inference_steps=STEPS, denoising_start=0.8, guidance_scale=5.0,
                   aesthetic_score=7.0, output_type="np").images
    ours = generate(model, PROMPTS, refiner=ref_model, refiner_switch=0.8, sampler=sampler, aesthetic_score=7.0,
                    output_type="pt", **KW)
    assert np.abs(as_np(ours) - ref).max() <= 1 / 255
    alone = generate(model, PROMPTS, sampler=sampler, output_type="latent", **KW)
    assert (ref_model.encode(ours) - alone).abs().mean() > 0.05  # the refiner did something
    with pytest.raises(ValueError, match="not a refiner model"):
        generate(model, PROMPTS, refiner=model, **KW)


def test_refiner_alone_img2img_matches_reference(refiner):
    ref_model, ref_pipe = refiner
    ref_pipe.scheduler = scheduler(ref_pipe, "euler")
    images = pictures()
    ref = ref_pipe(PROMPTS, image=ref_latents(ref_pipe, images), strength=0.3, num_inference_steps=STEPS,
                   guidance_scale=5.0, negative_aesthetic_score=2.0, generator=gens(), output_type="np").images
    ours = generate(ref_model, PROMPTS, init_image=images, strength=0.3, negative_aesthetic_score=2.0,
                    output_type="pt", **KW)
    assert np.abs(as_np(ours) - ref).max() <= 1 / 255


def test_emphasis_parser_against_a1111_examples():
    """The examples in A1111's modules/prompt_parser.py docstring."""
    cases = {
        "normal text": [("normal text", 1.0)],
        "an (important) word": [("an ", 1.0), ("important", 1.1), (" word", 1.0)],
        "(unbalanced": [("unbalanced", 1.1)],
        "\\(literal\\]": [("(literal]", 1.0)],
        "(unnecessary)(parens)": [("unnecessaryparens", 1.1)],
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
            ("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
            (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)],
        "a BREAK b": [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)],
        "[x] (y: 1.5 )": [("x", 1 / 1.1), (" ", 1.0), ("y", 1.5)],
    }
    for text, want in cases.items():
        got = parse_emphasis(text)
        assert [s for s, _ in got] == [s for s, _ in want], text
        assert np.allclose([w for _, w in got], [w for _, w in want], rtol=1e-12), text


def test_weighted_encoding_by_hand(models):
    """Token ids and weights built by hand with transformers' tokenizer (BREAK pads the chunk), the towers run on
    them, each hidden state scaled and each chunk's mean restored: what encode(weighting=True) must give."""
    model, _ = models
    text = model.text
    prompt = "a (red:1.5) circle, [[blue]] BREAK on white"
    ctx, pooled = text.encode([prompt], weighting=True)
    rows, ws = [], []
    for chunk in [[("a", 1.0), ("red", 1.5), ("circle,", 1.0), ("blue", 1 / 1.21)], [("on white", 1.0)]]:
        ids, w = [], []
        for s, wt in chunk:
            t = text.tokenizer_2(s, add_special_tokens=False)["input_ids"]
            ids, w = ids + t, w + [wt] * len(t)
        rows.append(ids)
        ws.append([1.0] + w + [1.0] * (76 - len(w)))
    want_ctx = []
    for enc, tok in ((text.text_encoder, text.tokenizer), (text.text_encoder_2, text.tokenizer_2)):
        ids = torch.tensor([[tok.bos_token_id, *r, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(r))
                            for r in rows])
        out = enc(ids, output_hidden_states=True)
        z = out.hidden_states[-2]
        zw = z * torch.tensor(ws)[..., None]
        want_ctx.append((zw * (z.mean(dim=(1, 2), keepdim=True) / zw.mean(dim=(1, 2), keepdim=True))).reshape(
            1, 154, -1))
        if enc is text.text_encoder_2:
            want_pooled = out.text_embeds[:1]
    assert torch.allclose(ctx, torch.cat(want_ctx, -1), atol=1e-6, rtol=1e-5)
    assert torch.allclose(pooled, want_pooled, atol=1e-6)
    # (word:1.0) is the plain prompt exactly; off by default, brackets are text.
    plain = text.encode(["a red circle"])
    assert all(torch.equal(a, b) for a, b in zip(text.encode(["a (red:1.0) circle"], weighting=True), plain))
    assert not torch.equal(text.encode(["a (red:1.0) circle"])[0], plain[0])


def test_prompt_weighting_in_generate_matches_reference_embeddings(models):
    """generate(prompt_weighting=True) samples what the reference samples from the same weighted embeddings."""
    model, pipe = models
    prompts, negative = ["a (red:1.4) circle BREAK [white] background", "(blue) square"], "(blurry:1.2)"
    ctx, pooled, neg_ctx, neg_pooled = model.text.encode_pair(prompts, negative, weighting=True)
    noise = image_noise(SEEDS, (4, H // 8, W // 8))
    pipe.scheduler = scheduler(pipe, "euler")
    ref = pipe(prompt_embeds=ctx, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_ctx,
               negative_pooled_prompt_embeds=neg_pooled, height=H, width=W, num_inference_steps=3, guidance_scale=5.0,
               latents=noise.clone(), output_type="np").images
    kw = {**KW, "steps": 3}
    ours = generate(model, prompts, negative, prompt_weighting=True, output_type="pt", **kw)
    assert np.abs(as_np(ours) - ref).max() <= 1 / 255
    literal = generate(model, prompts, negative, output_type="pt", **kw)
    assert (ours - literal).abs().mean() > 1e-3


def test_pixel_model_img2img_and_inpaint():
    """A pixel model noises its init image on its flow scale, (1 - s) x0 + s * noise_scale * noise (diffusers'
    FlowMatchEulerDiscreteScheduler.scale_noise), and inpainting keeps the unmasked pixels exactly."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    model = sdxl.load_model("pixel-demo")
    x0, noise = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    scaled = sdxl.load_model("pixel-demo")
    scaled.config = scaled.config.replace(noise_scale=2.0)  # JiT's noise at 512 px
    want = FlowMatchEulerDiscreteScheduler().scale_noise(x0, torch.tensor([400.0]), 2.0 * noise)
    assert torch.allclose(scaled.noised(x0, noise, 0.4), want, atol=1e-6)
    image, mask = pictures(1, (64, 64))[0], masks(1, (64, 64))[0]
    out = generate(model, PROMPTS[:1], height=64, width=64, steps=4, init_image=image, mask_image=mask, strength=0.75)
    keep = np.asarray(mask) < 128
    assert np.array_equal(np.asarray(out[0])[keep], np.asarray(image)[keep])
    assert np.abs(np.asarray(out[0]).astype(int) - np.asarray(image))[~keep].mean() > 1


def test_bad_arguments(models):
    model, _ = models
    images = pictures()
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        generate(model, PROMPTS, init_image=images, strength=0, **KW)
    with pytest.raises(ValueError, match="runs no step"):
        generate(model, PROMPTS, init_image=images, strength=0.1, **KW)
    with pytest.raises(ValueError, match="mask_image 0 is 40x64, its init_image 48x64"):
        generate(model, PROMPTS, init_image=images, mask_image=masks(2, (40, 64)), **KW)
    with pytest.raises(ValueError, match="mask_image needs init_image"):
        generate(model, PROMPTS, mask_image=masks(), **KW)
    with pytest.raises(ValueError, match="3 image"):
        generate(model, PROMPTS, init_image=pictures(3), **KW)


def cli(out, *args) -> tuple[int, str, str]:
    return main_in_process(["--pretrained_model", "tiny", "--height", str(H), "--width", str(W), "--steps", "4",
                            "--seed", "3", "--num-gpus", "1", "--output-dir", str(out), *map(str, args)])


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    for sub, ims in (("inits", pictures()), ("masks", masks()), ("one", pictures(1)), ("small", masks(2, (40, H)))):
        (d / sub).mkdir()
        for i, im in enumerate(ims):
            im.save(d / sub / f"{i}.png")
    (d / "prompts.txt").write_text("a (red:1.3) circle BREAK white\n[blue] square\n")
    return d


def test_cli_img2img_inpaint_refiner_emphasis(cli_inputs, refiner, tmp_path):
    """generate.py with every new flag makes what generate() makes, records the flags in each PNG's parameters,
    resumes, and refuses to mix settings in one folder."""
    d, out = cli_inputs, tmp_path / "out"
    args = ["--prompt-file", d / "prompts.txt", "--batch-size", "2", "--init-image", d / "inits", "--mask-image",
            d / "masks", "--strength", "0.75", "--refiner", refiner[1].folder, "--refiner-switch", "0.6",
            "--aesthetic-score", "7", "--prompt-weighting"]
    rc, _, err = cli(out, *args)
    assert rc == 0, err[-3000:]
    prompts = ["a (red:1.3) circle BREAK white", "[blue] square"]
    want = generate(sdxl.load_model("tiny"), prompts, init_image=[Image.open(d / "inits" / f"{i}.png") for i in (0, 1)],
                    mask_image=[Image.open(d / "masks" / f"{i}.png") for i in (0, 1)], strength=0.75,
                    refiner=sdxl.load_model(refiner[1].folder), refiner_switch=0.6, aesthetic_score=7.0,
                    prompt_weighting=True, **{**KW, "steps": 4})
    for i in (0, 1):
        path = out / "images" / f"{i + 1:012d}.png"
        assert np.array_equal(pixels(path), np.asarray(want[i])), i
        assert png_text_chunks(path)["parameters"][1] == (
            f"{prompts[i]}\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: {3 + i}, Size: {W}x{H}, Model: tiny, "
            f"Denoising strength: 0.75, Init image: {i}.png, Mask: {i}.png, Refiner: {refiner[1].folder.name}, "
            "Refiner switch at: 0.6, Aesthetic score: 7, Negative aesthetic score: 2.5, Emphasis: Original")
    before = snapshot(out / "images")
    rc, stdout, _ = cli(out, *args)
    assert rc == 0 and "2 images (2 already done)" in stdout and snapshot(out / "images") == before
    before = snapshot(out)
    rc, _, err = cli(out, *args[:-3], "--strength", "0.5")
    assert rc == 2 and "made with other settings" in err and snapshot(out) == before


def test_cli_bad_input_is_one_line_and_exit_2(cli_inputs, tmp_path):
    d = cli_inputs
    base = ["--prompt-file", d / "prompts.txt", "--init-image", d / "inits"]
    cases = {
        "the mask is 40x64, its init image": ["--mask-image", d / "small"],
        "--strength must be in (0, 1], got 1.5": ["--strength", "1.5"],
        "1 images for 2 prompts (add --cycle": ["--init-image", d / "one"],
        "tiny: not a refiner model": ["--refiner", "tiny"],  # a base as the refiner: found when loading
        "--mask-image needs --init-image": ["--init-image", "", "--mask-image", d / "masks"],
    }
    for phrase, extra in cases.items():
        rc, _, err = cli(tmp_path / "out", *base, *extra)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and phrase in lines[0], (phrase, err[-2000:])
        assert not list(tmp_path.rglob("*.png"))
    rc, _, err = cli(tmp_path / "cycled", *base, "--init-image", d / "one", "--cycle", "--strength", "0.5")
    assert rc == 0, err[-2000:]
    assert "Init image: 0.png" in png_text_chunks(tmp_path / "cycled" / "images" / "000000000002.png")["parameters"][1]
