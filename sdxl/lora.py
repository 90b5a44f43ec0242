"""LoRA, LoCon, DoRA, LoHa and LoKr adapters for the SDXL UNet (latent or pixel) and both text encoders; inject, merge,
files.

    net = inject(model, "attention", rank=4, alpha=4, text_encoders=True)   # training: adapters attached
    save_lora("lora.safetensors", net)                  # kohya keys: ComfyUI, A1111, diffusers' load_lora_weights
    net = load_lora(model, "other.safetensors", 0.8)   # generation: merged into the base weights (unmerge() undoes)

LoRA: Delta W = m * (alpha / r) * up @ down (LoCon on a Conv2d: down a conv with the base kernel, up 1x1); DoRA: the
LoRA'd weight V = W + (alpha / r) up @ down rescaled to a learnt norm per output row; LoHa (LyCORIS): Delta W =
m * (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b); LoKr (LyCORIS): kron(w1, w2_a @ w2_b); m the multiplier.
Adapters keep fp32 masters and compute in the activation's dtype (a bf16 forward casts each master once per change).
They live in a `LoRANetwork` *outside* the model tree, hooked onto their base layers: `unet.state_dict()` keeps the
diffusers names, `network.state_dict()` is the kohya file; the cost: DDP must wrap a module owning both.
Target modes (`+` combines, UNET_TARGETS): attention (q/k/v), attention_out (+ to_out.0), all (+ ff, proj_in /
proj_out: kohya's default), conv (LoCon on resnet, sampler and pixel codec convs). Text encoders: TEXT_TARGETS.

Files: kohya (the default) `lora_unet_<original-layout path, dots as underscores>.lora_down.weight / .lora_up.weight
/ .alpha` (pixel codec: `lora_unet_encoder_...`), `lora_te1_` CLIP-L, `lora_te2_` bigG; LyCORIS' `.dora_scale`,
`.hada_w1_a ...`, `.lokr_w1 ...`; PEFT `unet.<path>.lora_A.weight / .lora_B.weight (/ .lora_magnitude_vector)`,
`text_encoder(_2).`, alphas in `lora_adapter_metadata`. Both are read (and the variants in `_SUFFIXES` /
`_aliases`); a module or tensor this model lacks refuses the whole file, as does a LoRA of the other family
(metadata `sdxl_mini_family`; none = "latent")."""
from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .convert import unet_key_to_original
from .weights import CheckpointError, read_header, read_state_dict, save_safetensors

# UNet target modes: regexes over a module's diffusers path (anchored at a dot and at the end).
_ATTN = r"attn[12]\.(to_[qkv]|to_out\.0)"
UNET_TARGETS: dict[str, str] = {
    "attention": r"attn[12]\.to_[qkv]",
    "attention_out": _ATTN,
    "all": _ATTN + r"|ff\.net\.(0\.proj|2)|proj_in|proj_out",
    "conv": r"resnets\.\d+\.(conv1|conv2|conv_shortcut)|(down|up)samplers\.0\.conv|(encoder|decoder)\.conv_(in|out)",
}
TEXT_TARGETS = r"self_attn\.(q|k|v|out)_proj|mlp\.fc[12]"
FAMILY_KEY = "sdxl_mini_family"  # safetensors metadata: the model family a LoRA is for

# component name (the diffusers folder, and the PEFT key prefix) -> kohya prefix
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
_LORA_KEYS = ("lora_down.weight", "lora_up.weight")
_LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


class _Adapter(nn.Module):
    """Rank, multiplier, dropout (on the branch input, as PEFT) and `alpha`, a buffer: kohya's `.alpha` key. The scale
    m * alpha / r is a Python float (no tensor op, no host sync per forward), refreshed when m or alpha changes."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None, dropout: float):
        super().__init__()
        self.rank, self.dropout, self.shape = rank, dropout, tuple(base.weight.shape)
        self.kw = dict(stride=base.stride, padding=base.padding, dilation=base.dilation) \
            if isinstance(base, nn.Conv2d) else None
        self._alpha, self._cast = float(rank if alpha is None else alpha), {}
        self.register_buffer("alpha", torch.tensor(self._alpha, device=base.weight.device))
        self.register_load_state_dict_post_hook(lambda m, _: m._loaded())
        self.multiplier = 1.0

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._multiplier, self.lora_scale = float(value), self._alpha / self.rank
        self.scale = self._multiplier * self.lora_scale

    def _loaded(self) -> None:  # a loaded `.alpha` changes the scale
        self._alpha = float(self.alpha)
        self.multiplier = self._multiplier

    def __getstate__(self) -> dict:  # copies drop the cast cache (its tensors may carry autograd graphs)
        return {**self.__dict__, "_cast": {}}

    def _w(self, p: torch.Tensor, key: str, x: torch.Tensor) -> torch.Tensor:
        """Master `p` in x's dtype. A cast is kept until p changes (version, storage: an optimizer step, a move) and
        reused by later calls (micro-steps, checkpoint recompute, sampling); one made with grad keeps its autograd
        edge (a cast saves no tensors, so several backwards may pass it), so gradients still reach the fp32 master."""
        if p.dtype == x.dtype or torch.compiler.is_compiling():
            return p.to(x.dtype)
        tag = (p._version, p.data_ptr(), x.dtype, torch.is_grad_enabled() and p.requires_grad)
        if (hit := self._cast.get(key)) is None or hit[0] != tag:
            hit = self._cast[key] = (tag, p.to(x.dtype))
        return hit[1]

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, True) if self.dropout and self.training else x

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The base layer's op (its stride and padding) with weight w, no bias."""
        return F.conv2d(x, w, None, **self.kw) if self.kw is not None else F.linear(x, w)

    def _branch_hook(self, base: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.add_to(output, args[0], base)  # a forward hook on the base layer

    def add_to(self, y: torch.Tensor, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """The base layer's output y plus the branch on its input x (here: through Delta W)."""
        return y + self(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branch alone: what the hook adds to the base layer's output."""
        return self._op(self._drop(x), self.delta_weight().to(x.dtype))

    def merged(self, w: torch.Tensor, merge: bool) -> torch.Tensor:
        """The fp32 weight w with this adapter merged in (or taken out again)."""
        return w + (1 if merge else -1) * self.delta_weight().to(w.device)


class LoRA(_Adapter):
    """LoRA on a Linear, LoCon on a Conv2d: branch(x) = m * (alpha / r) * up(down(dropout(x)))."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        kw = {"device": base.weight.device, "dtype": torch.float32, "bias": False}
        if self.kw is not None:
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, **self.kw, **kw)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, **kw)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, **kw)
            self.lora_up = nn.Linear(rank, base.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # kohya's and PEFT's init
        nn.init.zeros_(self.lora_up.weight)

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        """up(down(x)), unscaled, in x's dtype: the two matmuls (convolutions for LoCon)."""
        h = self._op(x, self._w(self.lora_down.weight, "down", x))
        up = self._w(self.lora_up.weight, "up", x)
        return F.conv2d(h, up) if self.kw is not None else F.linear(h, up)

    def add_to(self, y: torch.Tensor, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return torch.add(y, self._lora(self._drop(x)), alpha=self.scale)  # the third and last op carries the scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._lora(self._drop(x)) * self.scale

    def _product(self) -> torch.Tensor:
        up, down = self.lora_up.weight, self.lora_down.weight
        return (up.flatten(1) @ down.flatten(1)).reshape(self.shape)  # (out, r) @ (r, in * kh * kw) -> W's shape

    def delta_weight(self) -> torch.Tensor:
        return self._product() * self.scale


class DoRA(LoRA):
    """DoRA (PEFT's use_dora, LyCORIS' dora_wd): W' = dora_scale * V / |V|, V = W + (alpha / r) up @ down, |V| the
    norm per output row (`dora_scale` (out, 1[, 1, 1]), as PEFT and LyCORIS since 2024 write it) or, read from older
    LyCORIS files (A1111's layout), per input column ((1, in[, 1, 1]), axis 1). |V| is a constant for gradients (the
    paper's choice, as PEFT). The multiplier m interpolates: W + m (W' - W). Merges undo in reverse order."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 axis: int = 0):
        super().__init__(base, rank, alpha, dropout)
        object.__setattr__(self, "base", base)  # not a submodule: its weight is the model's, not the file's
        self.axis, self._g = axis, None
        self.dora_scale = nn.Parameter(self._norm(base.weight.detach().float()))  # = |W|: a no-op while up = 0

    def _norm(self, v: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(v, dim=[d for d in range(v.dim()) if d != self.axis], keepdim=True)

    def _gain(self, w: torch.Tensor) -> torch.Tensor:
        """dora_scale / |V| (the shape of dora_scale), V from the base weight w; |V| detached."""
        v = w.float() + self.lora_scale * self._product().detach()
        return self.dora_scale / self._norm(v).detach()

    def delta_weight(self) -> torch.Tensor:
        w = self.base.weight.float()
        return self._multiplier * ((w + self.lora_scale * self._product()) * self._gain(w) - w)

    def _channels(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *[1] * (y.dim() - 2)) if self.kw is not None else t.reshape(-1)  # onto y's channels

    def _branch(self, plain: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """m ((g - 1) W x + g s up(down(x))), g per output channel, from plain = W x: PEFT's form of DoRA."""
        g = self._channels(self._gain(w).to(plain.dtype), plain)
        return self._multiplier * ((g - 1) * plain + g * self.lora_scale * self._lora(x))

    def add_to(self, y: torch.Tensor, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.axis != 0:  # column norms do not factor out of the output: through Delta W
            return y + self(x)
        xd = self._drop(x)  # with dropout, PEFT runs the base weight on the dropped input; else y is reused
        plain = self._op(xd, base.weight) if xd is not x else y if base.bias is None else \
            y - self._channels(base.bias, y)
        return y + self._branch(plain, xd, base.weight)

    forward = _Adapter.forward  # the branch alone, through Delta W

    def merged(self, w: torch.Tensor, merge: bool) -> torch.Tensor:
        m, ba = self._multiplier, self.lora_scale * self._product()
        if merge:  # W_m = (1 - m + m g) W + m g s up @ down; g is kept to invert it
            self._g = self._gain(w)
            return w + m * ((w + ba) * self._g - w)
        g, self._g = self._g, None
        return (w - m * g * ba) / (1 - m + m * g)


class LoHa(_Adapter):
    """LoHa (LyCORIS; rank up to r^2): the branch runs the base op with Delta W (reshaped to a kernel) as weight."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        out_f, in_f = self.shape[0], math.prod(self.shape[1:])
        kw = {"device": base.weight.device, "dtype": torch.float32}
        # LyCORIS' init: w2_a = 0 makes Delta W = 0 while every other factor still gets a gradient.
        self.hada_w1_a = nn.Parameter(torch.randn(out_f, rank, **kw) * 0.1)
        self.hada_w1_b = nn.Parameter(torch.randn(rank, in_f, **kw))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_f, rank, **kw))
        self.hada_w2_b = nn.Parameter(torch.randn(rank, in_f, **kw))

    def delta_weight(self) -> torch.Tensor:
        w = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)  # (out, in * kh * kw)
        return w.reshape(self.shape) * self.scale


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of a LoKr dimension, dim = m * n with m <= n: (factor, dim / factor) sorted for a factor > 0
    (it must divide dim), else the most balanced pair (m the largest divisor <= sqrt(dim))."""
    if factor > 0:
        if dim % factor:
            raise ValueError(f"LoKr factor {factor} does not divide the layer dimension {dim}")
        return min(factor, dim // factor), max(factor, dim // factor)
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return m, dim // m


class LoKr(_Adapter):
    """LoKr (LyCORIS): Delta W = m * (alpha / r) * kron(w1, w2_a @ w2_b) reshaped to W, w1 (a, c) and w2 (b, d * kh *
    kw) with out = a * b, in = c * d (`factorization`, for both sides). As LyCORIS: w2 is one full matrix `lokr_w2`
    (b, d, kh, kw) when r >= max(b, d) / 2, and then the scale is 1 (alpha is not used). Files may also split w1 into
    lokr_w1_a @ lokr_w1_b (`shapes`: the file's parameter shapes); LyCORIS' Tucker form (lokr_t2) is not read."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 factor: int = -1, shapes: dict[str, tuple] | None = None):
        if shapes is None:
            (a, b), (c, d), k = factorization(base.weight.shape[0], factor), factorization(
                base.weight.shape[1], factor), tuple(base.weight.shape[2:])
            shapes = {"lokr_w1": (a, c), **({"lokr_w2": (b, d, *k)} if rank >= max(b, d) / 2 else
                                            {"lokr_w2_a": (b, rank), "lokr_w2_b": (rank, d * math.prod(k))})}
        full = not any(k.endswith("_a") for k in shapes)
        super().__init__(base, rank, rank if full else alpha, dropout)
        self.full = full
        for name, s in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(s, device=base.weight.device)))
            if name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a"):  # LyCORIS' init: w2 (or w2_b) stays 0
                nn.init.kaiming_uniform_(self.get_parameter(name), a=math.sqrt(5))
        rows, cols = (math.prod(self._part(i).shape[j] for i in (1, 2)) for j in (0, 1))
        if (rows, cols) != (self.shape[0], math.prod(self.shape[1:])):
            raise ValueError(f"LoKr factors {dict(shapes)} make a ({rows}, {cols}) weight, not {self.shape}")

    def _loaded(self) -> None:
        if not self.full:
            super()._loaded()

    def _part(self, i: int) -> torch.Tensor:
        full = self._parameters.get(f"lokr_w{i}")
        if full is None:
            full = self.get_parameter(f"lokr_w{i}_a") @ self.get_parameter(f"lokr_w{i}_b").flatten(1)
        return full.flatten(1)

    def delta_weight(self) -> torch.Tensor:
        # kron((a, c), (b, d * kh * kw)) = (a * b, c * d * kh * kw): the row-major flattening of W's shape
        return torch.kron(self._part(1), self._part(2)).reshape(self.shape) * self.scale


ADAPTERS = {"lora": LoRA, "dora": DoRA, "loha": LoHa, "lokr": LoKr}


@dataclass
class Target:
    component: str  # "unet" | "text_encoder" | "text_encoder_2": the diffusers folder and PEFT prefix
    path: str  # module path inside the component (diffusers / transformers names)
    module: nn.Linear | nn.Conv2d  # the base layer


def _family(model: nn.Module) -> str:
    """"latent" or "pixel": the bundle's `family`; a bare UNet is a pixel one when it has the patch codec."""
    return getattr(model, "family", "pixel" if hasattr(model, "encoder") else "latent")


def _parts(model: nn.Module) -> dict[str, nn.Module | None]:
    if hasattr(model, "down_blocks"):
        return {"unet": model}
    if hasattr(model, "unet") and hasattr(model, "text"):
        return {"unet": model.unet, "text_encoder": model.text.text_encoder,
                "text_encoder_2": model.text.text_encoder_2}
    raise TypeError(f"expected an SDXL bundle or its UNet, got {type(model).__name__}")


def _layers(model: nn.Module) -> dict[str, Target]:
    """Every Linear / Conv2d of a UNet or a bundle (UNet and text encoders) by kohya name (UNet: original layout)."""
    out = {}
    for component, root in _parts(model).items():
        for path, m in root.named_modules() if root is not None else ():  # the refiner has no CLIP-L
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                name = path
                if component == "unet" and not path.startswith(("encoder.", "decoder.")):  # not the pixel codec
                    name = unet_key_to_original(path + ".weight", root.config)[: -len(".weight")]
                out[KOHYA_PREFIX[component] + name.replace(".", "_")] = Target(component, path, m)
    return out


def _aliases(layers: dict[str, Target]) -> dict[str, str]:
    """File module names -> ours: kohya (original or diffusers UNet names, lora_te_ CLIP-L) and PEFT (with or
    without CLIP-L's `text_model.` level, which transformers 5 drops)."""
    alias = {}
    for name, t in layers.items():
        alias[name] = name
        alias[KOHYA_PREFIX[t.component] + t.path.replace(".", "_")] = name
        alias[f"{t.component}.{t.path}"] = name
        if t.component == "text_encoder":
            alias["lora_te_" + t.path.replace(".", "_")] = name
            alias[f"text_encoder.{t.path.removeprefix('text_model.')}"] = name
    return alias


def select(model: nn.Module, target_mode: str = "attention", text_encoders: bool = False) -> dict[str, Target]:
    """The layers an adapter goes on, by kohya name: `target_mode` in the UNet, TEXT_TARGETS in the text encoders."""
    modes = target_mode.split("+")
    if bad := [m for m in modes if m not in UNET_TARGETS]:
        raise ValueError(f"unknown LoRA target mode {bad[0]!r}; known: {', '.join(UNET_TARGETS)} (join with '+')")
    unet = re.compile(r"(^|\.)(" + "|".join(UNET_TARGETS[m] for m in modes) + r")$")
    text = re.compile(r"(^|\.)(" + TEXT_TARGETS + r")$")
    return {n: t for n, t in _layers(model).items()
            if (unet.search(t.path) if t.component == "unet" else text_encoders and text.search(t.path))}


def _per_block(value, where: str):
    """`value`, or from a mapping {diffusers name prefix: value} the value of the longest key that is `where` or a
    dotted prefix of it ("" is every layer's); None where no key matches."""
    if not isinstance(value, Mapping):
        return value
    keys = [k for k in value if k in ("", where) or where.startswith(k + ".")]
    return value[max(keys, key=len)] if keys else None


def block_values(spec: str | None, rank: int, alpha: float | None) -> tuple:
    """--lora_block_ranks 'down_blocks.1=8,mid_block=16:8' (prefix=rank[:alpha]) over the defaults: inject's rank and
    alpha (mappings when the spec names blocks). ValueError on a malformed spec."""
    if not spec:
        return rank, alpha
    ranks, alphas = {"": rank}, {"": alpha}
    for item in spec.split(","):
        name, eq, value = item.partition("=")
        name, (r, _, a) = name.strip(), value.partition(":")
        try:
            ranks[name], alphas[name] = int(r), float(a) if a else None
        except ValueError:
            raise ValueError(f"--lora_block_ranks: {item.strip()!r} is not prefix=rank[:alpha]") from None
        if not eq or not name or ranks[name] < 0:
            raise ValueError(f"--lora_block_ranks: {item.strip()!r} is not prefix=rank[:alpha]")
    return ranks, alphas


def inject(model: nn.Module, target_mode: str = "attention", rank: int | Mapping[str, int] = 4,
           alpha: float | Mapping[str, float | None] | None = None, dropout: float = 0.0, *, kind: str = "lora",
           conv_rank: int | None = None, conv_alpha: float | None = None, text_encoders: bool = False,
           text_rank: int | None = None, text_alpha: float | None = None, multiplier: float = 1.0,
           attach: bool = True, factor: int = -1) -> LoRANetwork:
    """New "lora" (LoRA / LoCon), "dora", "loha" or "lokr" (`factor`: see `factorization`) adapters (fp32, Delta W = 0)
    on the `target_mode` layers of an SDXL bundle or its UNet; conv_* / text_* rank and alpha default to rank / alpha
    (itself the rank). rank / alpha may map diffusers name prefixes ("down_blocks.1", "mid_block", "up_blocks.0",
    "text_encoder_2"; "" for the rest) to values: the longest prefix wins, a layer with rank 0 or no match gets no
    adapter. Freeze the base yourself."""
    if kind not in ADAPTERS:
        raise ValueError(f"unknown adapter kind {kind!r}; known: {', '.join(ADAPTERS)}")
    names = {f"{c}.{p}".removeprefix("unet.").strip(".") for c, root in _parts(model).items() if root is not None
             for p, _ in root.named_modules()}
    if bad := [k for v in (rank, alpha) if isinstance(v, Mapping) for k in v if k and k not in names]:
        raise ValueError(f"no block {bad[0]!r} in this model (diffusers names, e.g. down_blocks.1, mid_block, "
                         "up_blocks.0, text_encoder_2)")
    targets, adapters = {}, {}
    for name, t in select(model, target_mode, text_encoders).items():
        where = t.path if t.component == "unet" else f"{t.component}.{t.path}"
        r, a = _per_block(rank, where), _per_block(alpha, where)
        if t.component != "unet":
            r, a = text_rank or r, a if text_alpha is None else text_alpha
        elif isinstance(t.module, nn.Conv2d):
            r, a = conv_rank or r, a if conv_alpha is None else conv_alpha
        if r:
            try:
                targets[name], adapters[name] = t, ADAPTERS[kind](t.module, r, a, dropout, **(
                    {"factor": factor} if kind == "lokr" else {}))
            except ValueError as e:
                raise ValueError(f"{t.component}.{t.path}: {e}") from None
    if not adapters:
        raise ValueError(f"target mode {target_mode!r} selects no layer of this model")
    config = {"kind": kind, "target_mode": target_mode, "rank": rank, "alpha": alpha if alpha is not None else rank,
              "conv_rank": conv_rank, "conv_alpha": conv_alpha, "text_encoders": text_encoders,
              "text_rank": text_rank, "text_alpha": text_alpha, "dropout": dropout, "family": _family(model),
              **({"factor": factor} if kind == "lokr" else {})}
    net = LoRANetwork(targets, adapters, config)
    net.multiplier = multiplier
    return net.attach() if attach else net


class LoRANetwork(nn.ModuleDict):
    """Adapters by kohya module name, each hooked onto (output + branch(input)) or merged into (W + Delta W, until
    `unmerge()`) its base layer. `state_dict()` is the kohya / LyCORIS file; `config["family"]` defaults to latent."""

    def __init__(self, targets: dict[str, Target], adapters: dict[str, nn.Module], config: dict | None = None):
        super().__init__(adapters)
        self.targets, self.config = targets, dict(config or {})
        self._hooks: list = []
        self.merged = False

    @property
    def multiplier(self) -> float:
        return next(iter(self.children())).multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        merged = self.merged
        self.unmerge()
        for a in self.children():
            a.multiplier = float(value)
        self._set_merged(merged)

    def attach(self) -> LoRANetwork:
        """Hook every adapter onto its base layer (training, or generation with a live multiplier)."""
        if self.merged:
            raise RuntimeError("this LoRA is merged into the base weights; unmerge() before attach()")
        self._hooks = self._hooks or [self.targets[name].module.register_forward_hook(adapter._branch_hook)
                                      for name, adapter in self.named_children()]
        return self

    def detach(self) -> LoRANetwork:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self

    @torch.no_grad()
    def _set_merged(self, merged: bool) -> LoRANetwork:
        # One layer at a time in fp32, rounded once to the base dtype: no full-model copy is ever held. unmerge
        # recomputes the same Delta W (adapters and multiplier are fixed while merged) instead of storing it.
        if merged != self.merged:
            for name, adapter in self.named_children():
                w = self.targets[name].module.weight
                w.copy_(adapter.merged(w.float(), merged).to(w.dtype))
            self.merged = merged
        return self

    def merge(self) -> LoRANetwork:
        """W += Delta W, for generation without per-layer overhead. Detaches the hooks."""
        return self.detach()._set_merged(True)

    def unmerge(self) -> LoRANetwork:
        """W -= Delta W: exact up to one rounding each way (float error for fp32 bases, bf16 ulps for bf16)."""
        return self._set_merged(False)

    def remove(self) -> None:
        """Take this LoRA off the model entirely (unmerge and detach)."""
        self.unmerge().detach()


KINDS = {LoRA: "lora", DoRA: "dora", LoHa: "loha", LoKr: "lokr"}


def _kohya_metadata(network: LoRANetwork) -> dict[str, str]:
    """The `ss_*` entries kohya's sd-scripts write (all strings), which A1111 and tools reading LoRA info use; LyCORIS
    kinds as LyCORIS' kohya wrapper (`lycoris.kohya`) names them."""
    c, adapters = network.config, list(network.children())
    kind = statistics.mode(KINDS[type(a)] for a in adapters)
    algo = {"dora": "lora", "loha": "loha", "lokr": "lokr"}.get(kind)
    args = {"algo": algo} if algo else {}
    args.update({"dora_wd": "True"} if kind == "dora" else {"factor": str(c.get("factor", -1))} if kind == "lokr"
                else {})
    if c.get("conv_rank"):
        args.update(conv_dim=str(c["conv_rank"]), conv_alpha=str(c.get("conv_alpha") or c["conv_rank"]))
    return {"ss_network_module": "lycoris.kohya" if algo else "networks.lora",
            "ss_network_dim": str(statistics.mode(a.rank for a in adapters)),
            "ss_network_alpha": str(statistics.mode(float(a.alpha) for a in adapters)),
            "ss_network_args": json.dumps(args), "ss_network_dropout": str(c.get("dropout", 0.0)),
            "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
            "ss_network_train_unet_only": str(all(t.component == "unet" for t in network.targets.values())),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/" + (f"lycoris-{kind}" if algo else "lora"),
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models"}


def _peft_state_dict(network: LoRANetwork) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT keys and diffusers' `lora_adapter_metadata`. Its paths leave out `text_model.` (transformers 5 has no such
    level): PEFT matches them as suffixes, so `encoder.layers.0.mlp.fc1` names the layer under either version."""
    sd, per_component, dora = {}, {}, set()
    for name, a in network.named_children():
        if type(a) not in (LoRA, DoRA) or getattr(a, "axis", 0):
            raise ValueError("the PEFT / diffusers layout holds LoRA, LoCon and (row-norm) DoRA only; save LoHa, "
                             "LoKr and column-norm DoRA in kohya format")
        t = network.targets[name]
        sd[f"{t.component}.{t.path}.lora_A.weight"] = a.lora_down.weight
        sd[f"{t.component}.{t.path}.lora_B.weight"] = a.lora_up.weight
        if isinstance(a, DoRA):  # PEFT's magnitude: (out,) for a Linear, (1, out, 1, 1) for a Conv2d
            sd[f"{t.component}.{t.path}.lora_magnitude_vector"] = a.dora_scale.reshape(
                (1, -1, 1, 1) if a.kw is not None else (-1,))
            dora.add(t.component)
        per_component.setdefault(t.component, {})[t.path.removeprefix("text_model.")] = (a.rank, float(a.alpha))
    meta = {}
    for component, mods in per_component.items():
        r, alpha = statistics.mode(r for r, _ in mods.values()), statistics.mode(al for _, al in mods.values())
        meta.update({f"{component}.r": r, f"{component}.lora_alpha": alpha,
                     f"{component}.target_modules": sorted(mods), f"{component}.use_dora": component in dora,
                     f"{component}.rank_pattern": {p: rr for p, (rr, _) in mods.items() if rr != r},
                     f"{component}.alpha_pattern": {p: al for p, (_, al) in mods.items() if al != alpha}})
    return sd, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}


def save_lora(path: str | os.PathLike, network: LoRANetwork, format: str = "kohya", metadata: dict | None = None,
              dtype: torch.dtype | None = None) -> None:
    """Write a "kohya" or "peft" safetensors LoRA (atomically, with the model family). `metadata`: extra entries
    (non-strings as JSON; kohya's `resolution` / `training_config` as ss_*). `dtype`: e.g. float16 halves the file."""
    if format not in ("kohya", "peft"):
        raise ValueError(f"unknown LoRA format {format!r}; known: kohya, peft")
    sd, meta = (network.state_dict(), _kohya_metadata(network)) if format == "kohya" else _peft_state_dict(network)
    for k, v in (metadata or {}).items():
        if format == "kohya" and k == "resolution" and not isinstance(v, str):  # kohya writes "(1024, 1024)"
            k, v = "ss_resolution", str(tuple(v) if isinstance(v, (tuple, list)) else (v, v))
        elif format == "kohya" and k == "training_config":
            k = "ss_training_config"
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    meta[FAMILY_KEY] = network.config.get("family", "latent")
    save_safetensors({k: v.to(dtype) if dtype is not None else v for k, v in sd.items()}, path, metadata=meta)


# Tensor suffixes of every layout we read -> kohya / LyCORIS parameter names.
_SUFFIXES = {**{k: k for k in ("alpha", "dora_scale", *_LORA_KEYS, *_LOHA_KEYS, *_LOKR_KEYS)},
             "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",  # PEFT
             "lora_magnitude_vector": "peft_magnitude", "lora_magnitude_vector.weight": "peft_magnitude",
             "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",  # older diffusers
             "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight"}


def _alpha_for(file_name: str, tensors: dict, meta: dict, rank: int) -> float:
    """An `.alpha` tensor, else diffusers' per-component lora_alpha / alpha_pattern metadata (`meta`), else rank."""
    if "alpha" in tensors:
        return float(tensors["alpha"])
    component, _, path = file_name.partition(".")
    if f"{component}.lora_alpha" not in meta:
        return float(rank)
    for key, value in (meta.get(f"{component}.alpha_pattern") or {}).items():
        # PEFT's rule: a pattern key matches a path suffix at a dot
        if re.match(rf"(.*\.)?{re.escape(key)}$", path) or re.match(rf"(.*\.)?{re.escape(path)}$", key):
            return float(value)
    return float(meta[f"{component}.lora_alpha"])


def _adapter_for(t: Target, tensors: dict[str, torch.Tensor], alpha) -> _Adapter | None:
    """The adapter a module's file tensors describe (None: no complete kind); `tensors` gets our parameter names."""
    keys, shape = set(tensors) - {"alpha"}, tuple(t.module.weight.shape)
    if "peft_magnitude" in tensors:  # PEFT's DoRA magnitude: per output row, whatever its shape
        tensors["dora_scale"] = tensors.pop("peft_magnitude").reshape(shape[0], *[1] * (len(shape) - 1))
        keys = keys - {"peft_magnitude"} | {"dora_scale"}
    if keys == set(_LORA_KEYS):
        return LoRA(t.module, tensors["lora_down.weight"].shape[0], alpha(tensors["lora_down.weight"].shape[0]))
    if keys == {*_LORA_KEYS, "dora_scale"}:  # (out, 1[, 1, 1]) row norms, or LyCORIS' older (1, in[, 1, 1]) columns
        s = tensors["dora_scale"]
        axis = int(s.dim() == len(shape) and s.shape[0] == 1 != shape[0])
        return DoRA(t.module, tensors["lora_down.weight"].shape[0], alpha(tensors["lora_down.weight"].shape[0]),
                    axis=axis)
    if keys == set(_LOHA_KEYS):
        return LoHa(t.module, tensors["hada_w1_b"].shape[0], alpha(tensors["hada_w1_b"].shape[0]))
    lokr = keys <= set(_LOKR_KEYS) and all((f"lokr_w{i}" in keys) != ({f"lokr_w{i}_a", f"lokr_w{i}_b"} <= keys) and
                                           (f"lokr_w{i}_a" in keys) == (f"lokr_w{i}_b" in keys) for i in (1, 2))
    if lokr:  # the rank of the low-rank part (w2's first, as ComfyUI); none: scale 1
        rank = next((tensors[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in keys), 1)
        return LoKr(t.module, rank, alpha(rank), shapes={k: tuple(tensors[k].shape) for k in keys})
    return None


def load_lora(model: nn.Module, path: str | os.PathLike, scale: float = 1.0, merge: bool = True) -> LoRANetwork:
    """Apply a LoRA file with multiplier `scale`, merged (`unmerge()` / `remove()` undoes) or attached as hooks (the
    multiplier can then change per generation). Each call adds its own Delta W. CheckpointError on any mismatch."""
    path = Path(path)
    sd = read_state_dict(path)
    meta = read_header(path)[1] if path.suffix == ".safetensors" else {}
    if not sd:
        raise CheckpointError(f"{path}: no tensors")
    family, ours = meta.get(FAMILY_KEY, "latent"), _family(model)
    if family != ours:
        raise CheckpointError(f"{path}: a LoRA for a {family} SDXL UNet; this model is a {ours} SDXL")
    groups: dict[str, dict[str, torch.Tensor]] = {}  # module name as in the file -> {our parameter name: tensor}
    for key, v in sd.items():
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)  # at most one matches
        if suffix is None:
            raise CheckpointError(f"{path}: unsupported LoRA tensor {key!r} (LoRA, LoCon, DoRA, LoHa and LoKr are "
                                  "supported; not Tucker-decomposed convs or full weight diffs)")
        groups.setdefault(key[:-len(suffix) - 1], {})[_SUFFIXES[suffix]] = v
    layers = _layers(model)
    alias = _aliases(layers)
    if unknown := [n for n in groups if n not in alias]:
        hint = " (an SD1.x/2.x LoRA?)" if any(n.startswith("lora_te_") for n in groups) and not any(
            n.startswith("lora_te2_") for n in groups) else ""
        raise CheckpointError(f"{path}: {len(groups) - len(unknown)} of {len(groups)} LoRA modules match this "
                              f"model{hint}; the first that does not: {unknown[0]!r}")
    peft_meta = json.loads(meta.get("lora_adapter_metadata") or "{}")
    targets, adapters = {}, {}
    for file_name, tensors in groups.items():
        name = alias[file_name]
        t = layers[name]
        if name in targets:
            raise CheckpointError(f"{path}: module {file_name!r} appears twice (under two naming schemes)")
        try:
            adapter = _adapter_for(t, tensors, lambda rank: _alpha_for(file_name, tensors, peft_meta, rank))
        except ValueError as e:  # LoKr factors that do not make this layer's weight
            raise CheckpointError(f"{path}: {file_name}: {e}") from None
        if adapter is None:
            raise CheckpointError(f"{path}: module {file_name!r} holds {', '.join(sorted(tensors))}: not one "
                                  "complete LoRA, DoRA, LoHa or LoKr")
        state = adapter.state_dict()
        for k in set(tensors) - {"alpha"}:
            if tensors[k].shape != state[k].shape:
                raise CheckpointError(f"{path}: {file_name}.{k} has shape {tuple(tensors[k].shape)}, this model's "
                                      f"{t.component}.{t.path} needs {tuple(state[k].shape)} (another model's LoRA?)")
        adapter.load_state_dict({**state, **{k: v for k, v in tensors.items() if k != "alpha"}})
        targets[name], adapters[name] = t, adapter
    kinds = {KINDS[type(a)] for a in adapters.values()}
    config = {"kind": kinds.pop() if len(kinds) == 1 else "mixed", "source": str(path), "family": family,
              "rank": statistics.mode(a.rank for a in adapters.values()),
              "alpha": statistics.mode(float(a.alpha) for a in adapters.values())}
    net = LoRANetwork(targets, adapters, config).eval()
    net.multiplier = scale
    return net.merge() if merge else net.attach()
