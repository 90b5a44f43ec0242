"""sdxl/text_encoders.py against transformers' CLIPTokenizer / CLIP text models and diffusers' SDXL encode_prompt."""
from __future__ import annotations

import dataclasses
import gzip
import json
import random

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel
from transformers import CLIPTokenizer as HFTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sdxl.config import CLIP_BIGG, CLIP_L, TINY
from sdxl.text_encoders import BPE_PATH, CLIPTokenizer, DualCLIP, clip_text_config, text_encoder_config

CPU = torch.device("cpu")

STRINGS = [
    "", " ", "   \t\n ", "a photo of a cat", "A Photo Of A CAT", "hello world!!", "hello!world", "!!!", "!",
    "masterpiece, best quality, (ultra-detailed:1.2), [cat|dog], {blue} <lora:x:0.5>", "a_b-c.d/e\\f",
    "3.14159 1,000,000 2024-01-01 12:30pm #1 50% $5", "don't I'm you're we've they'll she'd it's O'REILLY'S",
    "Crème brûlée à la française, naïve café, ÉCOLE, Straße, ØRESUND, œuvre", "e\u0301 vs \u00e9",
    "東京の夜景, 北京, 한국어 문장, ไทย", "emoji 😀👍🏽🇫🇷 ❤️ ✨", "non\u00a0breaking\u3000ideographic\u2003em\u200bzero",
    "ΣΑΣ ΟΔΟΣ", "İstanbul ﬁne Ⅻ ２ ٣", "tabs\tand\nnew\r\nlines  and   runs", "  leading and trailing  ",
    "a<|endoftext|>b", "<|startoftext|>x<|endoftext|>", "A <|ENDOFTEXT|> b <|StartOfText|>", "!!<|endoftext|>!",
    "word " * 100, "supercalifragilisticexpialidocious antidisestablishmentarianism " * 5, "cat, " * 160,
]


def _fuzz(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = [*"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()[]{}<>|/\\-_+=*&^%$#@~`\t\n",
              *"éèêëàâäôöüçñÉÀÖÜßøåæœ", "e\u0301", "東", "京", "한", "😀", "👍🏽", "\u00a0", "\u200b", "\x1c", "Σ",
              "<|endoftext|>", "<|startoftext|>", "'s", "'LL", "n't", "cat ", "photo "]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def _rows(tok, prompts: list[str], k: int) -> list[list[list[int]]]:
    """Oracle chunking by hand from a transformers tokenizer: k rows per prompt of BOS, 75 ids, EOS, pad."""
    out = []
    for ids in tok(prompts, add_special_tokens=False)["input_ids"]:
        parts = [ids[75 * i:75 * (i + 1)] for i in range(k)]
        out.append([[tok.bos_token_id, *p, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(p)) for p in parts])
    return out


@pytest.fixture(scope="module")
def tiny() -> DualCLIP:
    torch.manual_seed(0)
    return DualCLIP.from_config(TINY.text_encoder, TINY.text_encoder_2).eval()


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict:
    """tokenizer/ and tokenizer_2/ laid out as the published SDXL folders (vocab.json, merges.txt,
    tokenizer_config.json), built from the shipped merge list as OpenAI CLIP's SimpleTokenizer builds its
    vocabulary, with transformers' byte map; and transformers' CLIPTokenizer read from them: the reference."""
    root = tmp_path_factory.mktemp("published")
    merges = gzip.open(BPE_PATH, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = [*chars, *(c + "</w>" for c in chars), *(m.replace(" ", "") for m in merges),
             "<|startoftext|>", "<|endoftext|>"]
    out = {"root": root}
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        (root / name).mkdir()
        (root / name / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        (root / name / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        config = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": pad, "do_lower_case": True, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
        (root / name / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        out[name] = HFTokenizer.from_pretrained(root / name)
    return out


@pytest.fixture(scope="module")
def hf_tokenizers(published) -> tuple[HFTokenizer, HFTokenizer]:
    return published["tokenizer"], published["tokenizer_2"]


@pytest.fixture(scope="module")
def pipe(tiny, hf_tokenizers) -> StableDiffusionXLPipeline:
    # encode_prompt only needs the text side; the same module objects as `tiny`.
    return StableDiffusionXLPipeline(vae=None, text_encoder=tiny.text_encoder.text_model,
                                     text_encoder_2=tiny.text_encoder_2, tokenizer=hf_tokenizers[0],
                                     tokenizer_2=hf_tokenizers[1], unet=None, scheduler=EulerDiscreteScheduler())


def test_shipped_vocabulary():
    tok = CLIPTokenizer.default()
    vocab, merges = tok.get_vocab(), json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert len(vocab) == len(tok) == 49408 and len(merges) == 48894 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512
    # Published OpenAI CLIP ids of "a photo of a cat".
    assert tok("a photo of a cat", add_special_tokens=False)["input_ids"] == [320, 1125, 539, 320, 2368]
    assert CLIPTokenizer.default("!").pad_token_id == 0


@pytest.mark.parametrize("which", [0, 1], ids=["tokenizer", "tokenizer_2"])
def test_tokenizer_matches_transformers(tiny, hf_tokenizers, which):
    """The presets' tokenizers (built in memory from the shipped file) and DualCLIP's chunks, id for id against
    transformers reading a published-layout folder."""
    ours, ref = (tiny.tokenizer, tiny.tokenizer_2)[which], hf_tokenizers[which]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    texts = STRINGS + _fuzz(600, seed=which)
    expected = ref(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, expected):
        assert ours(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
    chunks = tiny.tokenize(texts)[which]  # (N, k, 77)
    assert chunks.shape == (len(texts), 5, 77)  # "cat, " * 160: 320 tokens, 5 chunks of 75
    assert chunks.tolist() == _rows(ref, texts, 5)
    # The first chunk is exactly what the reference pipeline feeds the encoder.
    assert chunks[:, 0].tolist() == ref(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    # "!" is tokenizer_2's (special) pad token: transformers cuts it out as id 0.
    assert ours("hi!", add_special_tokens=False)["input_ids"] == ([1883, 256] if which == 0 else [1883, 0])


def test_tokenizer_folders(tiny, published, tmp_path):
    """CLIPTokenizer.from_pretrained on SDXL's published tokenizer_2 config (mixed `normalized` flags) and on the
    tokenizer.json-only folder transformers 5 writes; DualCLIP.save_pretrained's folders as transformers reads
    them."""
    folder = tmp_path / "tokenizer_2"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((published["root"] / "tokenizer" / name).read_bytes())
    flags = {"lstrip": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": {"0": {"content": "!", "normalized": False, **flags},
                                 "49406": {"content": "<|startoftext|>", "normalized": True, **flags},
                                 "49407": {"content": "<|endoftext|>", "normalized": False, **flags}},
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "!", "do_lower_case": True, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = CLIPTokenizer.from_pretrained(folder), HFTokenizer.from_pretrained(folder)
    ref.save_pretrained(tmp_path / "v5")
    assert not (tmp_path / "v5" / "vocab.json").exists()
    ours_v5 = CLIPTokenizer.from_pretrained(tmp_path / "v5")
    tiny.save_pretrained(tmp_path / "model")
    saved = [HFTokenizer.from_pretrained(tmp_path / "model" / sub) for sub in ("tokenizer", "tokenizer_2")]
    assert [t.pad_token_id for t in saved] == [49407, 0] and {t.model_max_length for t in saved} == {77}
    texts = STRINGS + _fuzz(150, seed=7)
    expected = ref(texts, add_special_tokens=False)["input_ids"]
    assert ours(texts, add_special_tokens=False)["input_ids"] == expected
    assert ours_v5(texts, add_special_tokens=False)["input_ids"] == expected
    for saved_tok, reference in zip(saved, (published["tokenizer"], published["tokenizer_2"])):
        assert saved_tok(texts)["input_ids"] == reference(texts)["input_ids"]
    assert ours("<|STARTOFTEXT|>", add_special_tokens=False)["input_ids"] == [49406]  # normalized=True
    assert ours.pad_token_id == 0
    with pytest.raises(FileNotFoundError):
        CLIPTokenizer.from_pretrained(tmp_path / "missing")


PROMPTS = ["a photo of a cat!", "An astronaut riding a horse, 4k, Trending on ArtStation", "", "東京 ✨ crème"]


@torch.no_grad()
def test_encode_matches_pipeline(tiny, pipe):
    ref_ctx, ref_neg, ref_pool, ref_neg_pool = pipe.encode_prompt(PROMPTS, device=CPU, negative_prompt=None)
    ctx, pool, neg, neg_pool = tiny.encode_pair(PROMPTS, None)
    assert ctx.shape == (4, 77, 64) and pool.shape == (4, 32)
    torch.testing.assert_close(ctx, ref_ctx, atol=1e-5, rtol=0)
    torch.testing.assert_close(pool, ref_pool, atol=1e-5, rtol=0)
    assert ref_neg.abs().max() == 0 and neg.abs().max() == 0 and neg_pool.abs().max() == 0
    assert neg.shape == ref_neg.shape and neg_pool.shape == ref_neg_pool.shape

    negatives = ["blurry, lowres!", "", "ugly", "bad hands"]
    ref_ctx, ref_neg, ref_pool, ref_neg_pool = pipe.encode_prompt(PROMPTS, device=CPU, negative_prompt=negatives)
    ctx, pool, neg, neg_pool = tiny.encode_pair(PROMPTS, negatives, zero_empty=False)
    for ours, ref in ((ctx, ref_ctx), (pool, ref_pool), (neg, ref_neg), (neg_pool, ref_neg_pool)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # Default: an empty negative prompt gives zeros, the others are unchanged.
    _, _, neg_z, neg_pool_z = tiny.encode_pair(PROMPTS, negatives)
    assert neg_z[1].abs().max() == 0 and neg_pool_z[1].abs().max() == 0
    torch.testing.assert_close(neg_z[[0, 2, 3]], ref_neg[[0, 2, 3]], atol=1e-5, rtol=0)
    torch.testing.assert_close(neg_pool_z[[0, 2, 3]], ref_neg_pool[[0, 2, 3]], atol=1e-5, rtol=0)

    for skip in (1,):  # the tiny towers have 2 layers: clip_skip 1 is the embeddings' output
        ref_ctx, _, ref_pool, _ = pipe.encode_prompt(PROMPTS, device=CPU, do_classifier_free_guidance=False,
                                                     clip_skip=skip)
        ctx, pool = tiny.encode(PROMPTS, clip_skip=skip)
        torch.testing.assert_close(ctx, ref_ctx, atol=1e-5, rtol=0)
        torch.testing.assert_close(pool, ref_pool, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        tiny.encode(PROMPTS, clip_skip=2)


@torch.no_grad()
def test_long_prompt_chunks(tiny, hf_tokenizers, pipe):
    long = "a very detailed painting of a lighthouse on a cliff at sunset, " * 12  # > 150 tokens
    prompts = [long, "a cat"]
    ctx, pool = tiny.encode(prompts)
    k = ctx.shape[1] // 77
    assert ctx.shape == (2, 77 * k, 64) and k == 3

    # Oracle: each 75-token chunk through the transformers models by hand, BOS/EOS/pad from transformers.
    parts = []
    for tok, model in zip(hf_tokenizers, (tiny.text_encoder.text_model, tiny.text_encoder_2)):
        rows = [row for per_prompt in _rows(tok, prompts, k) for row in per_prompt]
        hidden = model(torch.tensor(rows), output_hidden_states=True).hidden_states[-2]  # (2k, 77, C)
        parts.append(torch.stack([torch.cat(list(chunks)) for chunks in hidden.split(k)]))  # (2, 77k, C)
    expected = [torch.cat(parts, dim=-1)]
    torch.testing.assert_close(ctx, torch.cat(expected), atol=1e-5, rtol=0)
    # Pooled: the first chunk's, which is what the reference pipeline (truncating at 77) returns.
    _, _, ref_pool, _ = pipe.encode_prompt(prompts, device=CPU, do_classifier_free_guidance=False)
    torch.testing.assert_close(pool, ref_pool, atol=1e-5, rtol=0)

    # Negatives are padded to the positives' chunk count; padding chunks are BOS EOS pad...
    c, p, n, n_pool = tiny.encode_pair(prompts, ["blurry", None])
    assert c.shape == n.shape == (2, 231, 64) and n[1].abs().max() == 0
    torch.testing.assert_close(c, ctx, atol=1e-5, rtol=0)
    ids, ids_2 = tiny.tokenize(["blurry"], num_chunks=3)
    assert ids.shape == ids_2.shape == (1, 3, 77)
    assert ids_2[0, 2].tolist() == [49406, 49407] + [0] * 75 and ids[0, 1].tolist() == [49406] + [49407] * 76
    torch.testing.assert_close(n[:1], tiny.encode_tokens(ids, ids_2)[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        tiny.tokenize(prompts, num_chunks=2)


@torch.no_grad()
def test_refiner_bigg_only(tiny, hf_tokenizers):
    refiner = DualCLIP(None, tiny.text_encoder_2, None, tiny.tokenizer_2)
    pipe = StableDiffusionXLImg2ImgPipeline(vae=None, text_encoder=None, text_encoder_2=tiny.text_encoder_2,
                                            tokenizer=None, tokenizer_2=hf_tokenizers[1], unet=None,
                                            scheduler=EulerDiscreteScheduler(), requires_aesthetics_score=True)
    negatives = ["blurry", "bad"] * 2
    ref_ctx, ref_neg, ref_pool, ref_neg_pool = pipe.encode_prompt(PROMPTS, device=CPU, negative_prompt=negatives)
    ctx, pool, neg, neg_pool = refiner.encode_pair(PROMPTS, negatives)
    assert ctx.shape == (4, 77, 32)
    for ours, ref in ((ctx, ref_ctx), (pool, ref_pool), (neg, ref_neg), (neg_pool, ref_neg_pool)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    ids, ids_2 = refiner.tokenize(["x"])
    assert ids is None and ids_2.shape == (1, 1, 77)


def test_meta_build_and_load(tiny, tmp_path):
    """Build on meta, fill from diffusers-style weight files: the published layout (`text_model.` keys) and
    what transformers 5 saves for CLIPTextModel (no prefix)."""
    te1 = CLIPTextModel(clip_text_config(TINY.text_encoder))
    te1.load_state_dict(tiny.text_encoder.text_model.state_dict())
    te1.save_pretrained(tmp_path / "text_encoder")  # transformers 5 layout: no text_model. prefix
    save_file(tiny.text_encoder_2.state_dict(), tmp_path / "te2.safetensors")
    sd1 = load_file(tmp_path / "text_encoder" / "model.safetensors")
    sd2 = load_file(tmp_path / "te2.safetensors")
    assert all(k.startswith("text_model.") for k in sd2 if k != "text_projection.weight")
    # The reference loader reads our published-layout keys too.
    save_file(tiny.text_encoder.state_dict(), tmp_path / "te1_published.safetensors")
    assert all(k.startswith("text_model.") for k in load_file(tmp_path / "te1_published.safetensors"))

    with torch.device("meta"):
        meta = DualCLIP.from_config(TINY.text_encoder, TINY.text_encoder_2)
    assert all(p.is_meta for p in meta.parameters())
    meta.load_weights(sd1, sd2)
    assert not any(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    with torch.no_grad():
        for ours, ref in zip(meta.encode(PROMPTS), tiny.encode(PROMPTS)):
            torch.testing.assert_close(ours, ref, atol=0, rtol=0)

    # Published layout, with the position_ids buffer older files carry.
    published = {**tiny.text_encoder.state_dict(), "text_model.embeddings.position_ids": torch.arange(77)[None]}
    other = DualCLIP.from_config(TINY.text_encoder, TINY.text_encoder_2)
    other.load_weights(published, sd2)
    torch.testing.assert_close(other.text_encoder.state_dict(), tiny.text_encoder.state_dict(), atol=0, rtol=0)
    with pytest.raises(ValueError, match="missing"):
        other.load_weights(published, {k: v for k, v in sd2.items() if k != "text_projection.weight"})

    # Half precision: outputs follow the encoders' dtype.
    half = DualCLIP.from_config(TINY.text_encoder, TINY.text_encoder_2).to(torch.bfloat16)
    ctx, pool = half.encode(["a cat"])
    assert ctx.dtype == pool.dtype == torch.bfloat16


def test_config_round_trip():
    for cfg in (CLIP_L, CLIP_BIGG, TINY.text_encoder, TINY.text_encoder_2):
        assert text_encoder_config(clip_text_config(cfg)) == cfg
        assert text_encoder_config(clip_text_config(cfg).to_dict()) == cfg
    # Shaped like the published SDXL text_encoder/config.json: CLIP-L states an unused projection_dim.
    published = {"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
                 "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
                 "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768, "vocab_size": 49408,
                 "eos_token_id": 2, "bos_token_id": 0, "pad_token_id": 1}
    assert text_encoder_config(published) == CLIP_L
    assert text_encoder_config({**published, "architectures": ["CLIPTextModelWithProjection"]}) == \
        dataclasses.replace(CLIP_L, projection_dim=768, pad_token="!")
