"""sdxl/model.py: load_model / save_pretrained / save_single_file against diffusers' own pipeline and files.

The oracle is a tiny StableDiffusionXLPipeline built here from diffusers / transformers classes with random
weights (every tensor perturbed, so that no two are equal by accident), written by diffusers' `save_pretrained`
with tokenizer folders written by transformers' CLIPTokenizer. Key tables per component are covered by
tests/test_convert.py; here the whole files go through.
"""
from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from conftest import diffusers_kwargs, rel_err
from diffusers import AutoencoderKL as RefVAE
from diffusers import (EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from safetensors import safe_open
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers import CLIPTokenizer as HFTokenizer

from sdxl.config import SDXL_BASE, SDXL_REFINER, TINY, ModelConfig, TextEncoderConfig, UNetConfig
from sdxl.convert import BIGG_PREFIX, vae_to_original
from sdxl.model import SDXL, build_model, load_model
from sdxl.text_encoders import CLIPTokenizer
from sdxl.weights import CheckpointError

CPU = torch.device("cpu")
PROMPTS = ["a photo of a cat!", "An astronaut, riding a horse; 4k... (trending) [on] ArtStation?!",
           "Crème brûlée à la française, 東京の夜景 ✨😀", ""]
LONG = "a very detailed oil painting of an old lighthouse on a cliff at sunset, crashing waves, " * 5  # > 75 tokens


def _perturb(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # LayerNorm ones and zero biases would let two swapped tensors pass
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def _clip_config(te: TextEncoderConfig) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=te.hidden_size, num_hidden_layers=te.num_hidden_layers,
                          num_attention_heads=te.num_attention_heads, intermediate_size=te.intermediate_size,
                          hidden_act=te.hidden_act, projection_dim=te.projection_dim or te.hidden_size,
                          vocab_size=49408, max_position_embeddings=77)


def _hf_tokenizer(folder, pad_token: str) -> HFTokenizer:
    CLIPTokenizer.default(pad_token).save_pretrained(folder / "ours")
    tok = HFTokenizer.from_pretrained(folder / "ours")  # transformers' own tokenizer, from our shipped vocab
    shutil.rmtree(folder / "ours")
    return tok


def _reference_pipeline(tmp, cfg: ModelConfig = TINY):
    """A diffusers pipeline with random weights; base (StableDiffusionXLPipeline) or, without text_encoder,
    refiner-style (StableDiffusionXLImg2ImgPipeline)."""
    torch.manual_seed(0)
    unet = _perturb(UNet2DConditionModel(**diffusers_kwargs(cfg.unet.to_diffusers())))
    vae = _perturb(RefVAE(**diffusers_kwargs(cfg.vae.to_diffusers())))
    te2 = _perturb(CLIPTextModelWithProjection(_clip_config(cfg.text_encoder_2)))
    tok2 = _hf_tokenizer(tmp, "!")
    if cfg.text_encoder is None:
        return StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None,
                                                tokenizer_2=tok2, unet=unet, scheduler=EulerDiscreteScheduler(),
                                                requires_aesthetics_score=True).to(CPU)
    te1 = _perturb(CLIPTextModel(_clip_config(cfg.text_encoder)))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=_hf_tokenizer(tmp, "<|endoftext|>"), tokenizer_2=tok2, unet=unet,
                                     scheduler=EulerDiscreteScheduler()).to(CPU)


def _components(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """The reference pipeline's tensors in diffusers' file names (CLIP-L under `text_model.` as published)."""
    out = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict(),
           "text_encoder_2": pipe.text_encoder_2.state_dict()}
    if pipe.text_encoder is not None:
        sd = pipe.text_encoder.state_dict()
        out["text_encoder"] = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
    return {name: {k: v for k, v in sd.items() if not k.endswith("position_ids")} for name, sd in out.items()}


def _ours(model: SDXL) -> dict[str, dict[str, torch.Tensor]]:
    out = {"unet": model.unet.state_dict(), "vae": model.vae.state_dict(),
           "text_encoder_2": model.text.text_encoder_2.state_dict()}
    if model.text.text_encoder is not None:
        out["text_encoder"] = model.text.text_encoder.state_dict()
    return out


def assert_identical(ours: dict, ref: dict, dtype: torch.dtype | None = None) -> None:
    """Same components, same keys, every tensor bit-identical (after casting the reference to `dtype`)."""
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].keys() == ref[name].keys(), name
        for k, v in ref[name].items():
            expected = v.to(dtype) if dtype is not None else v
            assert ours[name][k].dtype == expected.dtype and torch.equal(ours[name][k], expected), f"{name}.{k}"


def assert_one_copy(model: SDXL) -> None:
    """The model holds no memory beyond its own tensors (no file buffer kept alive by a view), all contiguous."""
    tensors = [*model.parameters(), *model.buffers()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert sum(storages.values()) == sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())
    assert all(t.is_contiguous() and t.device == CPU for t in tensors)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(pipeline, folder written by diffusers' save_pretrained)."""
    tmp = tmp_path_factory.mktemp("reference")
    pipe = _reference_pipeline(tmp)
    pipe.save_pretrained(tmp / "pipe")
    return pipe, tmp / "pipe"


@pytest.fixture(scope="module")
def loaded(reference) -> SDXL:
    return load_model(reference[1])


# ------------------------------------------------------------------------------------- against diffusers

def test_folder_loads_the_reference_weights(reference, loaded):
    pipe, folder = reference
    assert_identical(_ours(loaded), _components(pipe))
    assert_one_copy(loaded)
    assert loaded.config.unet == TINY.unet and loaded.config.vae == TINY.vae
    assert loaded.config.text_encoder == TINY.text_encoder and loaded.config.text_encoder_2 == TINY.text_encoder_2
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


@torch.no_grad()
def test_outputs_match_reference(reference, loaded):
    pipe, _ = reference
    cfg = TINY.unet
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, cfg.cross_attention_dim)
    pooled, ids = torch.randn(2, cfg.pooled_dim), torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 32, 8, 4, 64, 64]])
    t = torch.tensor([999.0, 17.0])
    ref = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    assert rel_err(ref, loaded.unet(x, t, ctx, pooled, ids)) <= 1e-5
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    ref_post = pipe.vae.encode(images).latent_dist
    post = loaded.vae.encode(images)
    assert rel_err(ref_post.mean, post.mean) <= 1e-5 and rel_err(ref_post.logvar, post.logvar) <= 1e-5
    assert rel_err(pipe.vae.decode(ref_post.mean).sample, loaded.vae.decode(post.mean)) <= 1e-5


@torch.no_grad()
def test_encode_matches_encode_prompt(reference, loaded):
    pipe, _ = reference
    negatives = ["blurry, lowres!", "ugly; (bad) hands", "", "水彩画 — watercolor"]
    ref = pipe.encode_prompt(PROMPTS, device=CPU, negative_prompt=negatives)  # ctx, neg ctx, pooled, neg pooled
    ours = loaded.text.encode_pair(PROMPTS, negatives, zero_empty=False)
    assert ours[0].shape == (4, 77, 64) and ours[1].shape == (4, 32)
    for a, b in zip(ours, (ref[0], ref[2], ref[1], ref[3])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Without negatives the reference uses zeros (force_zeros_for_empty_prompt), as we do.
    ref = pipe.encode_prompt(PROMPTS, device=CPU)
    ours = loaded.text.encode_pair(PROMPTS)
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=0)
    assert ours[2].abs().max() == 0 == ref[1].abs().max() and ours[3].abs().max() == 0

    # A prompt over 75 tokens: two chunks. The first is what the reference (truncating at 77) encodes; the
    # second is BOS + the rest + EOS + padding through the reference encoders' penultimate layers.
    ctx, pooled = loaded.text.encode([LONG])
    ref_ctx, _, ref_pooled, _ = pipe.encode_prompt([LONG], device=CPU, do_classifier_free_guidance=False)
    assert ctx.shape == (1, 154, 64)
    torch.testing.assert_close(ctx[:, :77], ref_ctx, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=0)
    tails = []
    for tok, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        rest = tok(LONG, add_special_tokens=False)["input_ids"][75:]
        assert 0 < len(rest) <= 75
        row = [tok.bos_token_id, *rest, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(rest))
        tails.append(encoder(torch.tensor([row]), output_hidden_states=True).hidden_states[-2])
    torch.testing.assert_close(ctx[:, 77:], torch.cat(tails, dim=-1), atol=1e-5, rtol=0)


def test_fp16_variant_sharded_and_dtype(reference, tmp_path):
    pipe, folder = reference
    half = copy.deepcopy(pipe).to(torch.float16)
    half.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    expected = _components(half)
    assert_identical(_ours(load_model(tmp_path / "fp16", variant="fp16", dtype=torch.float16)), expected)
    # Without variant= the fp16 files are still found; the default dtype is float32.
    assert_identical(_ours(load_model(tmp_path / "fp16")), expected, torch.float32)

    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    for name, module in (("unet", pipe.unet), ("text_encoder_2", pipe.text_encoder_2)):
        shutil.rmtree(sharded / name)
        module.save_pretrained(sharded / name, max_shard_size="100KB")
        assert len(list((sharded / name).glob("*.safetensors"))) >= 2
        assert list((sharded / name).glob("*.safetensors.index.json"))
    model = load_model(sharded)
    assert_identical(_ours(model), _components(pipe))
    assert_one_copy(model)

    bf16 = load_model(folder, dtype=torch.bfloat16)
    assert_identical(_ours(bf16), _components(pipe), torch.bfloat16)
    assert_one_copy(bf16)
    ctx, pooled = bf16.text.encode(["a cat"])
    assert ctx.dtype == pooled.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- round trips

def test_round_trip_folder_single_file_folder(reference, loaded, tmp_path):
    pipe, folder = reference
    original = _components(pipe)
    loaded.save_single_file(tmp_path / "model.safetensors")
    from_file = load_model(tmp_path / "model.safetensors")
    assert_identical(_ours(from_file), original)
    assert_one_copy(from_file)
    from_file.save_pretrained(tmp_path / "again")
    assert_identical(_ours(load_model(tmp_path / "again")), original)

    # The reference library reads both of our outputs: the single file with its own single-file loader (our
    # diffusers folder as the config: no network), the folder with from_pretrained. diffusers 0.42's
    # from_single_file leaves bigG unloaded under transformers 5 (random weights, text_projection on meta), so
    # bigG goes through its converter function, on the whole file.
    ref_file = StableDiffusionXLPipeline.from_single_file(tmp_path / "model.safetensors",
                                                          config=str(tmp_path / "again"), local_files_only=True)
    whole_file = load_file(tmp_path / "model.safetensors")
    bigg = convert_open_clip_checkpoint(pipe.text_encoder_2, whole_file, prefix=BIGG_PREFIX)
    assert_identical({**_components(ref_file), "text_encoder_2": bigg}, original)
    assert_identical(_components(StableDiffusionXLPipeline.from_pretrained(tmp_path / "again")), original)
    # The published key names and the configs in the metadata; tokenizers as transformers reads them.
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
            "first_stage_model.decoder.mid.attn_1.q.weight", "conditioner.embedders.1.model.text_projection",
            "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"} <= keys
    assert json.loads(meta["sdxl_mini_config"])["unet"]["block_out_channels"] == list(TINY.unet.block_out_channels)
    for sub in ("tokenizer", "tokenizer_2"):
        ref_tok = HFTokenizer.from_pretrained(tmp_path / "again" / sub)
        assert ref_tok(PROMPTS[1])["input_ids"] == getattr(pipe, sub)(PROMPTS[1])["input_ids"]

    # A half-precision single file: the same tensors cast, read back as such.
    loaded.save_single_file(tmp_path / "half.safetensors", dtype=torch.float16)
    assert_identical(_ours(load_model(tmp_path / "half.safetensors", dtype=None)), original, torch.float16)


def test_refiner_style_round_trip(tmp_path):
    te2 = TINY.text_encoder_2
    cfg = ModelConfig(unet=UNetConfig(block_out_channels=(32, 64, 64, 64), transformer_depth=(0, 2, 2, 0),
                                      mid_transformer_depth=2, num_attention_heads=(2, 2, 4, 4),
                                      cross_attention_dim=te2.hidden_size, pooled_dim=te2.projection_dim,
                                      num_time_ids=5, addition_time_embed_dim=8, sample_size=32),
                      vae=TINY.vae, text_encoder=None, text_encoder_2=te2)
    pipe = _reference_pipeline(tmp_path, cfg)
    pipe.save_pretrained(tmp_path / "pipe")
    original = _components(pipe)
    model = load_model(tmp_path / "pipe")
    assert model.text.text_encoder is None and model.config == cfg
    assert_identical(_ours(model), original)
    model.save_single_file(tmp_path / "refiner.safetensors")
    with safe_open(tmp_path / "refiner.safetensors", framework="pt") as f:
        assert "conditioner.embedders.0.model.text_projection" in f.keys()
    again = load_model(tmp_path / "refiner.safetensors")
    assert again.config == cfg
    again.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["text_encoder"] == [None, None]
    assert_identical(_ours(load_model(tmp_path / "again")), original)
    ref = StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "again")
    assert ref.text_encoder is None
    assert_identical(_components(ref), original)
    with torch.no_grad():  # bigG only: the refiner's encode_prompt
        torch.testing.assert_close(again.text.encode(PROMPTS)[0],
                                   pipe.encode_prompt(PROMPTS, device=CPU, do_classifier_free_guidance=False)[0],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["sdxl-base", "sdxl-refiner"])
def test_files_without_our_metadata_are_the_standard_presets(tmp_path, preset):
    """The full published key set (tensors of size 0, so the file is a few hundred kB) without our metadata is
    read as the standard preset: the first tensor whose shape is checked reports the full-size shape."""
    cfg = {"sdxl-base": SDXL_BASE, "sdxl-refiner": SDXL_REFINER}[preset]
    with torch.device("meta"):
        keys = list(build_model(cfg).original_state_dict())
    assert len(keys) == (2515 if preset == "sdxl-base" else 1858)
    path = tmp_path / "published.safetensors"
    save_file({k: torch.zeros(0, 0) for k in keys}, path)
    expected = (cfg.unet.block_out_channels[0], 4, 3, 3)
    with pytest.raises(CheckpointError, match=re.escape(f"key 'conv_in.weight' has shape (0, 0) in the file, "
                                                        f"the model expects {expected} (read as {preset}")) as e:
        load_model(path)
    assert_one_line(e, path)


def test_vae_replacement(reference, tmp_path):
    _, folder = reference
    torch.manual_seed(1)
    new = _perturb(RefVAE(**{**diffusers_kwargs(TINY.vae.to_diffusers()), "force_upcast": False}))
    new.save_pretrained(tmp_path / "vae_fix")
    model = load_model(folder, vae=tmp_path / "vae_fix", dtype=torch.float16)
    expected = {k: v.half() for k, v in new.state_dict().items()}
    assert_identical({"vae": model.vae.state_dict()}, {"vae": expected})
    assert model.config.vae.force_upcast is False and model.vae.config == model.config.vae
    # A single VAE file, in the original layout or in diffusers names.
    save_file({k: v.contiguous() for k, v in vae_to_original(new.state_dict()).items()}, tmp_path / "vae.safetensors")
    assert_identical({"vae": load_model(folder, vae=tmp_path / "vae.safetensors").vae.state_dict()},
                     {"vae": new.state_dict()})


# ---------------------------------------------------------------------------------------------- bad input

def assert_one_line(e: pytest.ExceptionInfo, path) -> None:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg


def test_bad_paths_and_folders(reference, tmp_path):
    _, folder = reference
    cases = {tmp_path / "nope": "no such file or folder",
             tmp_path / "empty": "model_index.json is missing",
             folder / "unet": "a component folder",
             tmp_path / "no_unet": r"missing unet/ folder \(model_index.json names StableDiffusionXLPipeline\)",
             tmp_path / "sd15": "SD1.x/2.x", tmp_path / "flux": "transformer/, not a unet/",
             tmp_path / "bad.gguf": "unknown checkpoint type"}
    (tmp_path / "empty").mkdir()
    shutil.copytree(folder, tmp_path / "no_unet", ignore=shutil.ignore_patterns("unet"))
    for name, index in (("sd15", {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "U"],
                                  "text_encoder": ["transformers", "CLIPTextModel"]}),
                        ("flux", {"_class_name": "FluxPipeline", "transformer": ["diffusers", "T"]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF")
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as e:
            load_model(path)
        assert_one_line(e, path)
    # An SD1.x UNet config inside an SDXL-looking folder: the config.json is named.
    sd15_unet = tmp_path / "sd15_unet"
    shutil.copytree(folder, sd15_unet)
    config = json.loads((sd15_unet / "unet" / "config.json").read_text())
    (sd15_unet / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": None}))
    with pytest.raises(CheckpointError, match="not an SDXL UNet") as e:
        load_model(sd15_unet)
    assert_one_line(e, sd15_unet / "unet" / "config.json")


class Payload:  # any class: weights_only=True must refuse to build it
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_bad_single_files(loaded, tmp_path):
    small = lambda *shape: torch.zeros(shape)  # noqa: E731
    sd15 = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": small(4),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": small(320, 768),
            "first_stage_model.encoder.conv_in.weight": small(2)}
    flux = {"double_blocks.0.img_attn.norm.key_norm.scale": small(2), "img_in.weight": small(2, 2)}
    save_file(sd15, tmp_path / "sd15.safetensors")
    save_file(flux, tmp_path / "flux.safetensors")
    loaded.save_single_file(tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.safetensors").write_text("this is not a safetensors file\n" * 10)
    torch.save({"state_dict": sd15, "payload": Payload()}, tmp_path / "pickle.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    cases = {"sd15.safetensors": r"an SD1.x checkpoint .*cross-attention 768", "flux.safetensors": "FLUX",
             "truncated.safetensors": "not a readable safetensors file",
             "text.safetensors": "not a readable safetensors file",
             "pickle.ckpt": "cannot be read safely with weights_only=True", "empty.ckpt": "weights_only=True"}
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as e:
            load_model(tmp_path / name)
        assert_one_line(e, tmp_path / name)


def test_ckpt_state_dicts(loaded, tmp_path):
    """A .ckpt holding plain tensors is read (weights_only=True): an ldm-style {"state_dict": ...} file of our
    tiny model is read as sdxl-base (no metadata in pickles) and stops at the first key tiny lacks; a VAE
    .ckpt loads."""
    torch.save({"state_dict": loaded.original_state_dict(), "global_step": torch.tensor(3)},
               tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match=r"\(UNet\): missing key 'down_blocks.1.attentions.0.transformer_blocks"
                                              r".1.norm1.weight' .* \(read as sdxl-base: a file without") as e:
        load_model(tmp_path / "model.ckpt")
    assert_one_line(e, tmp_path / "model.ckpt")
    vae = {k: v.clone() for k, v in vae_to_original(loaded.vae.state_dict()).items()}
    torch.save({"state_dict": vae}, tmp_path / "vae.ckpt")
    model = load_model("tiny", vae=tmp_path / "vae.ckpt", seed=3)
    assert_identical({"vae": model.vae.state_dict()}, {"vae": loaded.vae.state_dict()})


def test_preset_is_seeded():
    a, b, c = load_model("tiny", seed=1), load_model("tiny", seed=1), load_model("tiny", seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)
    state = torch.random.get_rng_state()
    load_model("tiny", seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone
