"""SDXL's two text encoders, their BPE tokenizer, and prompts longer than 77 tokens.

Encoder 1 is OpenAI CLIP ViT-L/14 (transformers' `CLIPTextModel`), encoder 2 OpenCLIP ViT-bigG/14
(`CLIPTextModelWithProjection`); the refiner has only the second. Both share the OpenAI CLIP BPE vocabulary but
pad differently: tokenizer 1 with `<|endoftext|>`, tokenizer 2 with `!` (id 0).

    context = concat_channels(h1[-2], h2[-2])        (B, 77k, 768 + 1280)
    pooled  = W_proj . LN(h2[-1])[first EOS position]  (B, 1280), from the first 77-token chunk

h[-2] is the penultimate layer's output (no final LayerNorm); clip_skip=s takes h[-(s+2)], as diffusers'
`StableDiffusionXLPipeline.encode_prompt` does. Prompts over 75 tokens are cut into 75-token chunks, each
wrapped in BOS/EOS, padded to 77 and encoded on its own; the chunks' hidden states are concatenated along the
sequence (kohya's sd-scripts approach).
"""
from __future__ import annotations

import functools
import gzip
import json
import math
import unicodedata
from pathlib import Path

import regex  # \p{L} / \p{N} classes; a transformers dependency already
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .config import TextEncoderConfig

BPE_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

# Pre-tokenisation of transformers' CLIPTokenizer (tokenizers backend): CLIP's own split, then the GPT-2 split
# that tokenizers' ByteLevel step applies to each piece. The second one only changes pieces such as
# "<|endoftext|>" that were not taken as special tokens (e.g. typed in upper case): -> "<|", "endoftext", "|>".
_CLIP_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_BYTE_LEVEL_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_WHITESPACE = regex.compile(r"\s+")  # Unicode White_Space, as the tokenizers (Oniguruma) \s


@functools.lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (BPE works on these)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(extra))]
    return {b: chr(c) for b, c in zip(printable + extra, chars)}


@functools.lru_cache(maxsize=None)
def _shipped_bpe() -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges of OpenAI CLIP, built from the shipped merge list as CLIP's
    SimpleTokenizer builds them: 256 byte characters, the same with </w>, the first 49152-256-2 merges joined,
    then <|startoftext|> (49406) and <|endoftext|> (49407)."""
    lines = gzip.open(BPE_PATH, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # line 0 is a header
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _normalize(text: str) -> str:
    """transformers' CLIP normaliser (transformers 5 has no ftfy path): NFC, runs of whitespace -> one space,
    lower case. Lower-casing is per character like tokenizers' (str.lower() would turn a final Σ into ς)."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


def _is_normalized(token: dict) -> bool:
    # tokenizers' AddedToken default: special tokens match the raw text, others the normalised text.
    return bool(token.get("normalized", not token.get("special", False)))


def _token_content(value) -> str | None:
    # tokenizer_config.json stores special tokens as plain strings or as {"content": ..., ...} (AddedToken).
    return value.get("content") if isinstance(value, dict) else value


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, token for token the same as transformers' `CLIPTokenizer`.

    Special tokens (BOS, EOS, UNK, PAD and any others the folder lists) are cut out of the text before
    normalisation (`normalized=False`, the default) or after it (`normalized=True`); the rest is normalised,
    split into words, mapped to byte characters and merged by BPE rank. Because the pad token is special,
    tokenizer 2 (pad `!`) reads a typed "!" as id 0, not as the word "!</w>" (256), just as transformers does.
    Characters newer than Python's Unicode database (15.0+ on Python 3.11) may normalise or split differently.
    """

    def __init__(self, vocab: dict[str, int], merges: list[str], bos_token: str = "<|startoftext|>",
                 eos_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>",
                 pad_token: str = "<|endoftext|>", added_tokens: dict[int, dict] | None = None,
                 model_max_length: int = 77):
        self.vocab = vocab
        self.merges = merges
        self.ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.model_max_length = model_max_length
        # id -> AddedToken fields, as tokenizer_config.json's "added_tokens_decoder".
        self.added_tokens = {int(i): dict(t) for i, t in (added_tokens or {}).items()}
        known = {t["content"] for t in self.added_tokens.values()}
        for token in (bos_token, eos_token, unk_token, pad_token):
            if token not in known:
                if token not in vocab:
                    raise ValueError(f"special token {token!r} is not in the vocabulary")
                self.added_tokens[vocab[token]] = {"content": token, "normalized": False, "special": True}
                known.add(token)
        for t in self.added_tokens.values():
            if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
                raise ValueError(f"added token {t['content']!r}: lstrip/rstrip/single_word are not supported")
        self._added_ids = {t["content"]: i for i, t in self.added_tokens.items()}
        self._raw_split = self._added_pattern(normalized=False)
        self._normalized_split = self._added_pattern(normalized=True)
        self._byte_chars = _bytes_to_unicode()
        self._cache: dict[str, list[int]] = {}

    def _added_pattern(self, normalized: bool) -> regex.Pattern | None:
        tokens = [t["content"] for t in self.added_tokens.values() if _is_normalized(t) == normalized]
        # Longest first: at each position the alternation then takes the longest match (leftmost-longest).
        tokens.sort(key=len, reverse=True)
        return regex.compile("|".join(regex.escape(t) for t in tokens)) if tokens else None

    @classmethod
    def default(cls, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
        """The shipped OpenAI CLIP vocabulary with the given pad token ("!" for SDXL's tokenizer_2)."""
        vocab, merges = _shipped_bpe()
        return cls(vocab, merges, pad_token=pad_token)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CLIPTokenizer:
        """Read a transformers/diffusers tokenizer folder: tokenizer.json (what transformers 5 writes) or
        vocab.json + merges.txt, and tokenizer_config.json / special_tokens_map.json for the special tokens."""
        folder = Path(folder)
        added: dict[int, dict] = {}
        if (folder / "tokenizer.json").is_file():
            data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            model = data.get("model") or {}
            if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
                raise ValueError(f"{folder / 'tokenizer.json'}: not a CLIP BPE tokenizer (model type "
                                 f"{model.get('type')!r}, end_of_word_suffix {model.get('end_of_word_suffix')!r})")
            vocab = model["vocab"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            added = {t["id"]: t for t in data.get("added_tokens", [])}
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            merges = [line for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
                      if line and not line.startswith("#version")]
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt (not a CLIP "
                                    "tokenizer folder)")
        for line in merges:
            if len(line.split(" ")) != 2:
                raise ValueError(f"{folder}: bad merge {line!r} (expected two symbols)")
        config = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the second wins, as in transformers
            if (folder / name).is_file():
                config.update(json.loads((folder / name).read_text(encoding="utf-8")))
        added |= {int(i): t for i, t in (config.get("added_tokens_decoder") or {}).items()}
        specials = {k: _token_content(config[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                    if config.get(k) is not None}
        return cls(vocab, merges, **specials, added_tokens=added,
                   model_max_length=int(config.get("model_max_length", 77)))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, a folder that
        transformers' `CLIPTokenizer.from_pretrained` (and this class) load."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in self.merges),
                                           encoding="utf-8")
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                    "pad_token": self.pad_token}
        added = {str(i): {"content": t["content"], "lstrip": False, "normalized": _is_normalized(t),
                          "rstrip": False, "single_word": False, "special": bool(t.get("special", True))}
                 for i, t in sorted(self.added_tokens.items())}
        config = {**specials, "added_tokens_decoder": added, "model_max_length": self.model_max_length,
                  "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                      encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False),
                                                        encoding="utf-8")

    @property
    def bos_token_id(self) -> int:
        return self._added_ids[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self._added_ids[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self._added_ids[self.pad_token]

    @property
    def unk_token_id(self) -> int:
        return self._added_ids[self.unk_token]

    def __len__(self) -> int:
        return len(self.vocab | self._added_ids)

    def _split(self, text: str, pattern: regex.Pattern | None):
        """Yield (piece, None) for plain text and (token, id) for each added token `pattern` finds."""
        start = 0
        for m in pattern.finditer(text) if pattern is not None else ():
            if m.start() > start:
                yield text[start:m.start()], None
            yield m.group(), self._added_ids[m.group()]
            start = m.end()
        if start < len(text):
            yield text[start:], None

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-tokenised word: its UTF-8 bytes as characters, </w> on the last, merged lowest rank
        first (all occurrences of that pair, left to right) until no pair has a rank."""
        if word in self._cache:
            return self._cache[word]
        symbols = [self._byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.ranks.get(pair, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.vocab.get(s, self.unk_token_id) for s in symbols]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and without truncation."""
        ids = []
        for raw, raw_id in self._split(text, self._raw_split):
            if raw_id is not None:
                ids.append(raw_id)
                continue
            for piece, piece_id in self._split(_normalize(raw), self._normalized_split):
                if piece_id is not None:
                    ids.append(piece_id)
                    continue
                for word in _CLIP_SPLIT.findall(piece):
                    for sub in _BYTE_LEVEL_SPLIT.findall(word):
                        ids.extend(self._bpe(sub))
        return ids

    def chunk(self, ids: list[int], num_chunks: int, length: int = 77) -> list[list[int]]:
        """Cut `ids` into `num_chunks` rows of `length`: up to length-2 ids each, wrapped as
        BOS ids EOS pad...; rows past the end of `ids` are BOS EOS pad..."""
        n = length - 2
        if len(ids) > num_chunks * n:
            raise ValueError(f"{len(ids)} tokens do not fit in {num_chunks} chunks of {n}")
        rows = []
        for i in range(num_chunks):
            part = ids[i * n:(i + 1) * n]
            rows.append([self.bos_token_id, *part, self.eos_token_id] + [self.pad_token_id] * (n - len(part)))
        return rows


def clip_text_config(cfg: TextEncoderConfig) -> CLIPTextConfig:
    """The transformers CLIPTextConfig of one tower (its `to_dict()` is a valid text_encoder*/config.json).

    eos_token_id is the real EOS id (49407), so pooling takes the first EOS position; the published SDXL configs
    say eos_token_id=2, which makes transformers take the argmax of the ids instead: the same position, since
    no CLIP id exceeds EOS.
    """
    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        projection_dim=cfg.projection_dim or cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        architectures=["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"],
    )


def text_encoder_config(clip: CLIPTextConfig | dict, with_projection: bool | None = None,
                        pad_token: str | None = None) -> TextEncoderConfig:
    """A TextEncoderConfig from a CLIPTextConfig or a diffusers text_encoder*/config.json dict.

    with_projection: whether the tower is CLIPTextModelWithProjection; by default read from "architectures"
    (CLIP-L's config.json also states a projection_dim, unused). pad_token: by default SDXL's convention,
    "!" for the projected (bigG) tower and <|endoftext|> otherwise; the tokenizer folder has the last word.
    """
    d = clip.to_dict() if isinstance(clip, CLIPTextConfig) else dict(clip)
    if with_projection is None:
        with_projection = "CLIPTextModelWithProjection" in (d.get("architectures") or [])
    if with_projection and not d.get("projection_dim"):
        raise ValueError("a CLIPTextModelWithProjection config needs projection_dim")
    fields = {f: d[f] for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                "hidden_act", "vocab_size", "max_position_embeddings", "layer_norm_eps") if f in d}
    return TextEncoderConfig(**fields, projection_dim=d["projection_dim"] if with_projection else None,
                             pad_token=pad_token or ("!" if with_projection else "<|endoftext|>"))


class CLIPTextEncoder(nn.Module):
    """CLIP-L's transformers text model under `text_model`, the names diffusers' text_encoder/ files (and
    kohya's lora_te1_text_model_* keys) use. transformers 5 dropped that level from CLIPTextModel (its own
    loader strips the prefix), transformers 4 had it inside; this keeps `text_model.*` with either."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        model = CLIPTextModel(config)
        self.text_model = getattr(model, "text_model", model)  # transformers 4: CLIPTextModel.text_model
        self.config = config

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False):
        return self.text_model(input_ids=input_ids, output_hidden_states=output_hidden_states)


class DualCLIP(nn.Module):
    """CLIP-L (`text_encoder`, None for the refiner) and bigG (`text_encoder_2`) with their tokenizers.

    State-dict keys are those of diffusers' files: `text_encoder.text_model.*`, `text_encoder_2.text_model.*`,
    `text_encoder_2.text_projection.weight`; `load_weights` loads the two folders' state dicts.
    """

    def __init__(self, text_encoder: CLIPTextEncoder | None, text_encoder_2: CLIPTextModelWithProjection,
                 tokenizer: CLIPTokenizer | None, tokenizer_2: CLIPTokenizer):
        super().__init__()
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("text_encoder and tokenizer go together: give both or neither")
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2

    @classmethod
    def from_config(cls, te1: TextEncoderConfig | None, te2: TextEncoderConfig,
                    tokenizer: CLIPTokenizer | None = None, tokenizer_2: CLIPTokenizer | None = None) -> DualCLIP:
        """Randomly initialised towers on the current default device (under `with torch.device("meta"):` they
        take no memory; fill them with `load_weights`), and by default the shipped tokenizer with each
        config's pad token."""
        if te2.projection_dim is None:
            raise ValueError("text_encoder_2 (bigG) needs a projection_dim")
        text_encoder = CLIPTextEncoder(clip_text_config(te1)) if te1 is not None else None
        if te1 is not None and tokenizer is None:
            tokenizer = CLIPTokenizer.default(te1.pad_token)
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(te2))
        return cls(text_encoder, text_encoder_2, tokenizer if te1 is not None else None,
                   tokenizer_2 or CLIPTokenizer.default(te2.pad_token))

    def load_weights(self, state_dict: dict[str, torch.Tensor] | None, state_dict_2: dict[str, torch.Tensor],
                     assign: bool = True) -> None:
        """Load the state dicts of diffusers' text_encoder/ and text_encoder_2/ weight files, all keys required.

        assign=True takes the given tensors as they are (device and dtype), replacing meta tensors. Besides the
        published layout this accepts CLIP-L files that transformers 5 wrote (no `text_model.` prefix), and
        ignores the `position_ids` buffer older files carry (it is rebuilt here, being derivable).
        """
        for name, module, sd in (("text_encoder", self.text_encoder, state_dict),
                                 ("text_encoder_2", self.text_encoder_2, state_dict_2)):
            if module is None:
                if sd is not None:
                    raise ValueError(f"{name}: weights given but this model has no {name}")
                continue
            if sd is None:
                raise ValueError(f"{name}: no weights given")
            sd = {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}
            if module is self.text_encoder and not any(k.startswith("text_model.") for k in sd):
                sd = {"text_model." + k: v for k, v in sd.items()}
            expected = set(module.state_dict())
            if set(sd) != expected:
                missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
                raise ValueError(f"{name}: weights do not match the model: missing {missing[:3]} "
                                 f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})")
            module.load_state_dict(sd, strict=True, assign=assign)
            # A non-persistent buffer: never in a state dict, so it would stay on meta.
            emb = module.text_model.embeddings
            weight = emb.position_embedding.weight
            emb.position_ids = torch.arange(weight.shape[0], device=weight.device).expand(1, -1)

    def save_pretrained(self, folder) -> None:
        """text_encoder/, text_encoder_2/ (config.json + model.safetensors) and tokenizer*/ into a diffusers
        model folder; each file written atomically."""
        from .weights import save_json, save_safetensors
        folder = Path(folder)
        for name, module, tok in (("text_encoder", self.text_encoder, self.tokenizer),
                                  ("text_encoder_2", self.text_encoder_2, self.tokenizer_2)):
            if module is None:
                continue
            save_json(module.config.to_dict(), folder / name / "config.json")
            save_safetensors(module.state_dict(), folder / name / "model.safetensors", metadata={"format": "pt"})
            tok.save_pretrained(folder / name.replace("text_encoder", "tokenizer"))

    def _towers(self) -> list[tuple[CLIPTokenizer, nn.Module]]:
        towers = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(t, e) for t, e in towers if e is not None]

    @property
    def context_dim(self) -> int:
        return sum(e.config.hidden_size for _, e in self._towers())

    @property
    def pooled_dim(self) -> int:
        return self.text_encoder_2.config.projection_dim

    @property
    def max_length(self) -> int:
        """Tokens per chunk, BOS and EOS included (77)."""
        return self.text_encoder_2.config.max_position_embeddings

    def tokenize(self, prompts: list[str], num_chunks: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Chunked token ids for each tokenizer: (ids, ids_2), each (B, k, 77) int64 on the CPU (ids is None
        without text_encoder). k = `num_chunks`, or what the longest prompt needs in either tokenizer."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, not one string")
        encoded = [[tok.encode(p) for p in prompts] for tok, _ in self._towers()]
        n = self.max_length - 2
        need = max([1] + [math.ceil(len(x) / n) for per_tok in encoded for x in per_tok])
        if num_chunks is not None and num_chunks < need:
            raise ValueError(f"a prompt needs {need} chunks of {n} tokens, more than num_chunks={num_chunks}")
        k = num_chunks or need
        ids = [torch.tensor([tok.chunk(x, k, self.max_length) for x in per_tok], dtype=torch.long)
               for (tok, _), per_tok in zip(self._towers(), encoded)]
        return (None, ids[0]) if self.text_encoder is None else (ids[0], ids[1])

    def encode_tokens(self, ids: torch.Tensor | None, ids_2: torch.Tensor,
                      clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, 77k, C1 + C2), pooled (B, P)) from `tokenize`'s ids, in text_encoder_2's dtype/device."""
        skip = clip_skip or 0
        layers = min(e.config.num_hidden_layers for _, e in self._towers())
        if not 0 <= skip <= layers - 1:
            raise ValueError(f"clip_skip={clip_skip} out of range: the encoders have {layers} layers")
        B, k, L = ids_2.shape
        contexts, pooled = [], None
        for tokens, encoder in ((ids, self.text_encoder), (ids_2, self.text_encoder_2)):
            if encoder is None:
                continue
            if tokens is None or tokens.shape != ids_2.shape:
                raise ValueError(f"token ids for both encoders must have the same shape, got "
                                 f"{None if tokens is None else tuple(tokens.shape)} and {tuple(ids_2.shape)}")
            device = next(encoder.parameters()).device
            # All chunks of all prompts in one batch: (B, k, L) -> (B*k, L)
            out = encoder(tokens.reshape(B * k, L).to(device), output_hidden_states=True)
            # hidden_states = (embeddings, layer 1, ..., layer N); [-2] is layer N-1, before the final LayerNorm.
            hidden = out.hidden_states[-(skip + 2)]
            contexts.append(hidden.reshape(B, k * L, -1))  # (B*k, L, C) -> (B, k*L, C)
            if encoder is self.text_encoder_2:
                pooled = out.text_embeds.reshape(B, k, -1)[:, 0]  # the first chunk's
        context = torch.cat([c.to(pooled.device, pooled.dtype) for c in contexts], dim=-1)
        return context, pooled

    forward = encode_tokens  # so DDP / FSDP wrappers call the same thing

    def encode(self, prompts: list[str], clip_skip: int | None = None,
               num_chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, 77k, C1 + C2), pooled (B, P)) for a list of prompts; k as in `tokenize`."""
        return self.encode_tokens(*self.tokenize(prompts, num_chunks), clip_skip=clip_skip)

    def encode_pair(self, prompts: list[str], negative_prompts: list[str | None] | str | None = None,
                    clip_skip: int | None = None, zero_empty: bool = True,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context, pooled, negative_context, negative_pooled) for classifier-free guidance: both sides padded
        to the same number of chunks and encoded in one batch.

        A negative prompt that is None gets all-zero context and pooled (the reference pipeline's
        force_zeros_for_empty_prompt, which applies when negative_prompt is None); so does "" unless
        zero_empty=False (the reference encodes an explicit "" as text). clip_skip applies to both sides (the
        reference pipeline applies it to the positive side only).
        """
        if negative_prompts is None or isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * len(prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        keep = [p is not None and not (zero_empty and p == "") for p in negative_prompts]
        texts = list(prompts) + [p for p, k in zip(negative_prompts, keep) if k]
        context, pooled = self.encode(texts, clip_skip)  # one chunk count for both sides
        B = len(prompts)
        rows = torch.tensor(keep, device=context.device)
        neg_context = context.new_zeros((B, *context.shape[1:])).index_put((rows,), context[B:])
        neg_pooled = pooled.new_zeros((B, *pooled.shape[1:])).index_put((rows,), pooled[B:])
        return context[:B], pooled[:B], neg_context, neg_pooled
