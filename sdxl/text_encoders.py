"""SDXL's two text encoders and tokenizers, and prompts longer than 77 tokens.

Encoder 1 is OpenAI CLIP ViT-L/14 (`CLIPTextModel`), encoder 2 OpenCLIP ViT-bigG/14 (`CLIPTextModelWithProjection`,
the refiner's only one); both tokenizers use the OpenAI CLIP BPE vocabulary, padding with `<|endoftext|>` / `!`.
    context = concat_channels(h1[-2], h2[-2])          (B, 77k, 768 + 1280); clip_skip=s takes h[-(s+2)]
    pooled  = W_proj . LN(h2[-1])[first EOS position]  (B, 1280), from the first 77-token chunk
h[-2] is the penultimate layer, before the final LayerNorm. Prompts over 75 tokens are cut into 75-token chunks,
each wrapped in BOS/EOS, padded to 77, encoded alone and concatenated along the sequence (kohya's sd-scripts).
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers import CLIPTokenizer as _CLIPTokenizer

from .config import TextEncoderConfig
from .prompts import chunk_tokens, parse_emphasis

BPE_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=None)
def _shipped_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI CLIP's vocabulary and merges as its SimpleTokenizer builds them: 256 byte characters (GPT-2's), the
    same with </w>, the first 49152-256-2 merges joined, <|startoftext|> (49406), <|endoftext|> (49407)."""
    lines = gzip.open(BPE_PATH, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split(" ")) for m in lines[1:49152 - 256 - 2 + 1]]  # line 0 is a header
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


class CLIPTokenizer(_CLIPTokenizer):
    """transformers' CLIPTokenizer (the tokenizers-backed one; CLIPTokenizerFast is the same class), which
    also knows the shipped vocabulary and reads only local folders (no silent download)."""

    @classmethod
    def default(cls, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
        """The shipped OpenAI CLIP vocabulary with the given pad token ("!" for SDXL's tokenizer_2)."""
        vocab, merges = _shipped_bpe()
        return cls(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> CLIPTokenizer:
        """A transformers/diffusers tokenizer folder: tokenizer.json, or vocab.json + merges.txt (published SDXL)."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file() and not (folder / "merges.txt").is_file():
            raise FileNotFoundError(f"{folder}: not a tokenizer folder (no tokenizer.json, nor merges.txt)")
        return super().from_pretrained(folder, local_files_only=True, **kwargs)


def clip_text_config(cfg: TextEncoderConfig) -> CLIPTextConfig:
    """The transformers CLIPTextConfig of one tower (`to_dict()`: a text_encoder*/config.json). eos_token_id 49407:
    pooling takes the first EOS (the published eos_token_id=2 takes the argmax id: the same position)."""
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
    """A TextEncoderConfig from a CLIPTextConfig or a text_encoder*/config.json dict. with_projection defaults to
    "architectures" (CLIP-L's config states an unused projection_dim too), pad_token to SDXL's ("!" for bigG)."""
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
    """transformers' CLIPTextModel under `text_model`, the names diffusers' text_encoder/ files (and kohya's
    lora_te1_text_model_* keys) use; transformers 5 dropped that level from CLIPTextModel itself."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.text_model, self.config = CLIPTextModel(config), config

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False):
        return self.text_model(input_ids=input_ids, output_hidden_states=output_hidden_states)


class DualCLIP(nn.Module):
    """CLIP-L (`text_encoder`, None for the refiner) and bigG (`text_encoder_2`) with their tokenizers; state-dict
    keys are diffusers' (`text_encoder.text_model.*`, `text_encoder_2.text_projection.weight`, ...)."""

    def __init__(self, text_encoder: CLIPTextEncoder | None, text_encoder_2: CLIPTextModelWithProjection,
                 tokenizer: CLIPTokenizer | None, tokenizer_2: CLIPTokenizer):
        super().__init__()
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("text_encoder and tokenizer go together: give both or neither")
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2

    @classmethod
    def from_config(cls, te1: TextEncoderConfig | None, te2: TextEncoderConfig,
                    tokenizer: CLIPTokenizer | None = None, tokenizer_2: CLIPTokenizer | None = None) -> DualCLIP:
        """Randomly initialised towers on the default device (on "meta", fill them with `load_weights`), and by
        default the shipped tokenizer with each config's pad token."""
        if te2.projection_dim is None:
            raise ValueError("text_encoder_2 (bigG) needs a projection_dim")
        text_encoder = CLIPTextEncoder(clip_text_config(te1)) if te1 is not None else None
        tokenizer = (tokenizer or CLIPTokenizer.default(te1.pad_token)) if te1 is not None else None
        return cls(text_encoder, CLIPTextModelWithProjection(clip_text_config(te2)), tokenizer,
                   tokenizer_2 or CLIPTokenizer.default(te2.pad_token))

    def load_weights(self, state_dict: dict[str, torch.Tensor] | None, state_dict_2: dict[str, torch.Tensor],
                     assign: bool = True) -> None:
        """Load diffusers' text_encoder*/ state dicts, all keys required (assign: take the tensors, replacing meta
        ones). Also takes transformers-5 CLIP-L files (no `text_model.`); ignores older files' `position_ids`."""
        for (name, module, _), sd in zip(self._parts(), (state_dict, state_dict_2)):
            if (module is None) != (sd is None):
                raise ValueError(f"{name}: " + ("no weights given" if sd is None else "weights given, no such tower"))
            if module is None:
                continue
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
            emb.position_ids = torch.arange(emb.position_ids.shape[1], device=emb.token_embedding.weight.device)[None]

    def load_folder(self, folder: Path, device, dtype: torch.dtype | None = None, variant: str | None = None) -> None:
        """`load_weights` from a diffusers folder's text_encoder*/ files, each tensor cast as it is read."""
        from .weights import CheckpointError, convert_, find_weights, read_weights
        sds = [None if enc is None else convert_(read_weights(find_weights(folder / name, "model", variant), dtype),
                                                 device) for name, enc, _ in self._parts()]
        try:
            self.load_weights(*sds)
        except ValueError as e:
            raise CheckpointError(f"{folder}: {e}") from None

    def save_pretrained(self, folder) -> None:
        """text_encoder*/ (config.json + model.safetensors, atomically) and tokenizer*/ into a diffusers folder."""
        from .weights import save_json, save_safetensors
        folder = Path(folder)
        for name, module, tok in self._parts():
            if module is None:
                continue
            save_json(module.config.to_dict(), folder / name / "config.json")
            save_safetensors(module.state_dict(), folder / name / "model.safetensors", metadata={"format": "pt"})
            tok.save_pretrained(folder / name.replace("text_encoder", "tokenizer"))

    def _parts(self) -> list[tuple[str, nn.Module | None, CLIPTokenizer | None]]:
        return [("text_encoder", self.text_encoder, self.tokenizer),
                ("text_encoder_2", self.text_encoder_2, self.tokenizer_2)]

    def tokenize(self, prompts: list[str], num_chunks: int | None = None, weighting: bool = False):
        """Chunked token ids for each tokenizer: (ids, ids_2), each (B, k, 77) int64 on the CPU (ids is None
        without text_encoder). k = `num_chunks`, or what the longest prompt needs in either tokenizer. weighting:
        read A1111 emphasis and BREAK (sdxl.prompts) and return (ids, ids_2, weights), weights (B, k, 77) float32."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        L = self.text_encoder_2.config.max_position_embeddings  # tokens per chunk, BOS and EOS included (77)
        n = L - 2
        texts = [parse_emphasis(p) if weighting else [(p, 1.0)] for p in prompts]
        towers, chunked = [tok for _, enc, tok in self._parts() if enc is not None], []
        for tok in towers:
            # Every fragment of every prompt in one tokenizer call, then each prompt's fragments in chunks.
            flat = iter(tok([s for frags in texts for s, _ in frags], add_special_tokens=False,
                            verbose=False)["input_ids"])
            chunked.append([chunk_tokens(frags, [next(flat) for _ in frags], n) for frags in texts])
        need = max(len(chunks) for per_tok in chunked for chunks in per_tok)
        if num_chunks is not None and num_chunks < need:
            raise ValueError(f"a prompt needs {need} chunks of {n} tokens, more than num_chunks={num_chunks}")
        k, ids, weights = num_chunks or need, [], []
        for tok, per_tok in zip(towers, chunked):
            # Chunk i of a prompt: BOS, its tokens, EOS, pad; past the prompt's end, BOS EOS pad... (weight 1)
            parts = [c for chunks in per_tok for c in chunks + [[]] * (k - len(chunks))]
            rows = [[tok.bos_token_id, *(t for t, _ in c), tok.eos_token_id] + [tok.pad_token_id] * (n - len(c))
                    for c in parts]
            ids.append(torch.tensor(rows, dtype=torch.long).reshape(len(prompts), k, L))
            weights.append(torch.tensor([[1.0, *(w for _, w in c)] + [1.0] * (n + 1 - len(c)) for c in parts]
                                        ).reshape(len(prompts), k, L))
        if not torch.equal(weights[0], weights[-1]):
            raise ValueError("the two tokenizers split a weighted prompt differently")
        out = (None, ids[0]) if self.text_encoder is None else (ids[0], ids[1])
        return (*out, weights[0]) if weighting else out

    def encode_tokens(self, ids: torch.Tensor | None, ids_2: torch.Tensor, clip_skip: int | None = None,
                      weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, 77k, C1 + C2), pooled (B, P)) from `tokenize`'s ids, in text_encoder_2's dtype/device.
        weights (B, k, 77): each token's hidden state times its weight, then each chunk of each encoder times
        (mean before / mean after) (A1111's emphasis; A1111 takes the means over the batch, here per prompt so that
        an image does not depend on its batch-mates); the pooled embedding is not weighted, as in A1111."""
        skip = clip_skip or 0
        layers = min(e.config.num_hidden_layers for _, e, _ in self._parts() if e is not None)
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
            if weights is not None:
                w = weights.reshape(B * k, L, 1).to(hidden.device, hidden.dtype)  # (B, k, L) -> (B*k, L, 1)
                mean = hidden.mean(dim=(1, 2), keepdim=True)
                hidden = hidden * w
                hidden = hidden * (mean / hidden.mean(dim=(1, 2), keepdim=True))
            contexts.append(hidden.reshape(B, k * L, -1))  # (B*k, L, C) -> (B, k*L, C)
            if encoder is self.text_encoder_2:
                pooled = out.text_embeds.reshape(B, k, -1)[:, 0]  # the first chunk's
        context = torch.cat([c.to(pooled.device, pooled.dtype) for c in contexts], dim=-1)
        return context, pooled

    forward = encode_tokens  # so DDP / FSDP wrappers call the same thing

    def encode(self, prompts: list[str], clip_skip: int | None = None, num_chunks: int | None = None,
               weighting: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, 77k, C1 + C2), pooled (B, P)) for a list of prompts; k as in `tokenize`. weighting: A1111
        emphasis and BREAK (sdxl.prompts; off: brackets are literal text)."""
        ids, ids_2, *weights = self.tokenize(prompts, num_chunks, weighting)
        return self.encode_tokens(ids, ids_2, clip_skip, *weights)

    def encode_pair(self, prompts: list[str], negative_prompts: list[str | None] | str | None = None,
                    clip_skip: int | None = None, zero_empty: bool = True, weighting: bool = False,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context, pooled, negative_context, negative_pooled), both sides in one batch with one chunk count. A None
        negative prompt gets zeros (the reference's force_zeros_for_empty_prompt), so does "" unless zero_empty=False
        (the reference encodes an explicit ""). clip_skip applies to both sides (the reference: the positive only)."""
        if negative_prompts is None or isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * len(prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        keep = [p is not None and not (zero_empty and p == "") for p in negative_prompts]
        texts = list(prompts) + [p for p, k in zip(negative_prompts, keep) if k]
        context, pooled = self.encode(texts, clip_skip, weighting=weighting)  # one chunk count for both sides
        B = len(prompts)
        rows = torch.tensor(keep, device=context.device)
        neg_context = context.new_zeros((B, *context.shape[1:])).index_put((rows,), context[B:])
        neg_pooled = pooled.new_zeros((B, *pooled.shape[1:])).index_put((rows,), pooled[B:])
        return context[:B], pooled[:B], neg_context, neg_pooled
