"""generate() with ControlNets against diffusers' StableDiffusionXLControlNetPipeline on the tiny model (the same
weights, latents and control images: the reference's own control image processor resizes them), one net or two,
with a scale and a guidance window; generate.py --controlnet / --control-image; bad input."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline
from PIL import Image
from test_controlnet import make_pair
from test_generate import main_in_process, pixels, png_text_chunks

import sdxl
from sampling import generate
from sdxl.config import TINY
from sdxl.controlnet import ControlNet, ControlNetConfig

PROMPTS = ["a red circle on a white background", "a blue square, photo"]
H, W, STEPS = 64, 48, 5


def noise_image(seed: int, size=(56, 40)) -> Image.Image:
    """A random RGB picture of another size than the output: the resize (Lanczos) is part of what is compared."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


KW = dict(height=H, width=W, steps=STEPS, guidance_scale=5.0)


def as_np(pt: torch.Tensor) -> np.ndarray:
    return (pt.permute(0, 2, 3, 1).numpy() / 2 + 0.5).clip(0, 1)


def strong(pair):
    """The conditioning image's path as strong as the latents' (jitter alone leaves it 10x weaker), so that how
    the image is read and resized shows in the output."""
    with torch.no_grad():
        for net in pair:
            net.controlnet_cond_embedding.conv_out.weight.mul_(10)
    return pair


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model saved (ours, and the reference's pipeline from the folder), three jittered ControlNet pairs
    (the third with global pooling), the latents and our image without a ControlNet."""
    d = tmp_path_factory.mktemp("controlnet_generate")
    model = sdxl.load_model("tiny", seed=1)
    model.save_pretrained(d / "model")
    base = StableDiffusionXLPipeline.from_pretrained(d / "model")
    pairs = [strong(make_pair()), strong(make_pair()),
             strong(make_pair(ControlNetConfig(TINY.unet, global_pool_conditions=True)))]
    latents = torch.randn(2, 4, H // 8, W // 8)
    plain = as_np(generate(model, PROMPTS, latents=latents.clone(), output_type="pt", **KW))
    return d, model, base, pairs, latents, plain


CASES = {  # (the pairs used, generate()'s ControlNet kwargs)
    # (On this tiny model the control image shows through the first step: a net whose image is checked is on there.)
    "one net, per-prompt images, scale 0.6, until 0.5": ([0], dict(controlnet_scale=0.6, control_guidance_end=0.5)),
    "two nets, an image and a tensor, windows": ([0, 1], dict(controlnet_scale=[1.0, 1.3], control_guidance_start=[
        0.2, 0.0], control_guidance_end=[1.0, 0.9])),
    "global pooling (the reference's guess mode)": ([2], dict(controlnet_scale=0.8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_pipeline(setup, case):
    _, model, base, pairs, latents, plain = setup
    which, kw = CASES[case]
    if len(which) == 1:  # an image per prompt, or one for both
        ref_nets, nets = pairs[which[0]]
        images = [noise_image(1), noise_image(2)] if which == [0] else noise_image(3)
    else:  # one image per net (the reference takes no per-prompt images here), a tensor in [0, 1] resized nearest
        ref_nets, nets = [pairs[i][0] for i in which], [pairs[i][1] for i in which]
        images = [noise_image(4), torch.rand(1, 3, 24, 20)]
    components = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = StableDiffusionXLControlNetPipeline(**components, controlnet=ref_nets)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, image=images, height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0,
               latents=latents.clone(), output_type="np", controlnet_conditioning_scale=kw["controlnet_scale"],
               **{k: v for k, v in kw.items() if k.startswith("control_guidance")}).images
    ours = as_np(generate(model, PROMPTS, latents=latents.clone(), controlnet=nets, control_image=images,
                          output_type="pt", **KW, **kw))
    assert ours.shape == ref.shape == (2, H, W, 3)
    assert np.abs(ours - ref).max() <= 1 / 255
    assert np.abs(plain - ref).max() > 4 / 255  # the ControlNet changes the image


def cli(*args) -> tuple[int, str]:
    rc, _, err = main_in_process(["--image-size", "64", "--steps", "3", "--num-gpus", "1", *map(str, args)])
    return rc, err


def test_cli_takes_a_controlnet_and_a_folder_of_control_images(setup, tmp_path):
    """generate.py --controlnet FOLDER --control-image DIR: the folder's images, sorted by name, go to the prompts
    in order; the PNGs are generate()'s with the same settings and say which ControlNet and image made them."""
    d, model, _, pairs, _, _ = setup
    net = pairs[0][1]
    net.save_pretrained(tmp_path / "canny")
    (tmp_path / "edges").mkdir()
    edges = {"a.png": Image.new("RGB", (32, 32), (255, 255, 255)), "b.png": noise_image(5)}
    for name, image in edges.items():
        image.save(tmp_path / "edges" / name)
    (tmp_path / "edges" / "notes.txt").write_text("not an image")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    rc, err = cli("--pretrained_model", d / "model", "--prompt-file", tmp_path / "prompts.txt", "--batch-size", 2,
                  "--controlnet", tmp_path / "canny", "--control-image", tmp_path / "edges", "--controlnet-scale",
                  1.5, "--control-guidance-end", 0.7, "--output-dir", tmp_path / "out")
    assert rc == 0, err[-3000:]
    want = generate(model, PROMPTS, height=64, width=64, steps=3, seed=[0, 1], controlnet=net,
                    control_image=list(edges.values()), controlnet_scale=1.5, control_guidance_end=0.7)
    for i, (image, control) in enumerate(zip(want, ["a.png", "b.png"])):
        png = tmp_path / "out" / "images" / f"{i + 1:012d}.png"
        assert np.abs(pixels(png).astype(int) - np.asarray(image).astype(int)).max() <= 1
        assert (f'ControlNet 0: "Model: canny, Image: {control}, Weight: 1.5, Guidance Start: 0, Guidance End: 0.7"'
                in png_text_chunks(png)["parameters"][1])


def test_bad_input(setup, tmp_path):
    """generate(): a one-line ValueError; generate.py: one line and exit 2 (also for a ControlNet that fails to
    load in the worker: made for another UNet)."""
    d, model, _, pairs, _, _ = setup
    net = pairs[0][1]
    with pytest.raises(ValueError, match=r"control_image: 3 image\(s\) of 48x64 for 2 prompt\(s\)"):
        generate(model, PROMPTS, controlnet=net, control_image=[noise_image(0)] * 3, **KW)
    with pytest.raises(ValueError, match="controlnet_scale: 1 values for 2 ControlNet"):
        generate(model, PROMPTS, controlnet=[net, net], control_image=[noise_image(0)] * 2, controlnet_scale=[1.0],
                 **KW)
    with pytest.raises(ValueError, match="start 0.5 and end 0.5"):
        generate(model, PROMPTS, controlnet=net, control_image=noise_image(0), control_guidance_start=0.5,
                 control_guidance_end=0.5, **KW)
    with pytest.raises(ValueError, match="not a pixel model"):
        generate(sdxl.load_model("pixel-tiny"), PROMPTS, controlnet=net, control_image=noise_image(0),
                 **(KW | dict(height=64, width=64)))
    other = ControlNet(ControlNetConfig(dataclasses.replace(TINY.unet, cross_attention_dim=32)))
    with pytest.raises(ValueError, match=r"made for another UNet \(cross_attention_dim 32"):
        generate(model, PROMPTS, controlnet=other, control_image=noise_image(0), **KW)

    other.save_pretrained(tmp_path / "other")
    net.save_pretrained(tmp_path / "canny")
    noise_image(0).save(tmp_path / "edge.png")
    (tmp_path / "one").mkdir()
    noise_image(0).save(tmp_path / "one" / "edge.png")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    for args, message in [
        (["--controlnet", tmp_path / "canny", "--control-image", tmp_path / "nope.png"],
         "nope.png: no such --control-image file or folder"),
        (["--controlnet", tmp_path / "canny", "--control-image", tmp_path / "one"], "one: 1 images for 2 prompts"),
        (["--controlnet", tmp_path / "nope", "--control-image", tmp_path / "edge.png"],
         "nope: no such ControlNet file or folder"),
        (["--controlnet", tmp_path / "canny"], "--controlnet and --control-image go together"),
        (["--controlnet", tmp_path / "other", "--control-image", tmp_path / "edge.png"],
         "other: made for another UNet (cross_attention_dim 32, the UNet has 64)")]:
        rc, err = cli("--pretrained_model", d / "model", "--prompt-file", tmp_path / "prompts.txt", "--output-dir",
                      tmp_path / "out", *args)
        assert rc == 2 and err.count("\n") == 1 and message in err, err[-3000:]
