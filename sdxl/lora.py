"""LoRA, LoCon and LoHa adapters for the SDXL UNet and both text encoders; inject, merge, and the file formats.

    net = inject(model, "attention", rank=4, alpha=4, text_encoders=True)   # training: adapters attached
    opt = torch.optim.AdamW(net.param_groups(unet_lr=1e-4, text_lr=5e-5))
    save_lora("lora.safetensors", net)                  # kohya keys: ComfyUI, A1111, diffusers' load_lora_weights
    net = load_lora(model, "other.safetensors", 0.8)   # generation: merged into the base weights (unmerge() undoes)

Adapters (each holds only its own tensors; the base layer is untouched):
    LoRA (Linear)  Delta W = m * (alpha / r) * up @ down              down (r, in), up (out, r)
    LoCon (Conv2d) the same with down a conv with the base kernel (r, in, kh, kw) and up a 1x1 conv (out, r, 1, 1);
                   up @ down flattened over (in, kh, kw) is the composed kernel, so Delta W has the base's shape
    LoHa           Delta W = m * (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b)   (Hadamard product, LyCORIS)
with m the multiplier. Init: down (LoRA) / w1_a, w1_b, w2_b (LoHa) random, up / w2_a zero, so Delta W = 0 at
step 0. Adapter tensors are fp32 whatever the base dtype: the branch casts its input to fp32, runs, and casts
the result to the base output's dtype (as PEFT does), so bf16 bases train fp32 adapters without an fp32 copy
of the base.

Design: the adapters live in a `LoRANetwork` (an nn.Module whose parameter names are the kohya keys), *outside*
the model tree, and reach their base layer through a forward hook (output += branch(input)). So
`unet.state_dict()` keeps exactly the diffusers names while adapters are attached (save_pretrained /
save_single_file / strict loads keep working mid-run), `network.state_dict()` is the kohya file itself, and
removing a LoRA is removing its hooks. The cost: the adapters are not parameters of the UNet, so DDP must wrap a
module that owns both the UNet and the network and runs the UNet in its forward (DDP only syncs parameters of
the module whose forward it ran), and `.to(device)` moves the network separately.

Target modes (UNet, as in the seed; `+` combines, e.g. "all+conv"):
    attention      to_q, to_k, to_v of self- and cross-attention
    attention_out  attention + to_out.0
    all            attention_out + feed-forward (ff.net.0.proj, ff.net.2) + proj_in / proj_out (kohya's default)
    conv           resnet conv1 / conv2 / conv_shortcut (1x1) and the down/upsampler convs (LoCon, kohya conv_dim)
Text encoders (`text_encoders=True`): q/k/v/out_proj and mlp fc1/fc2 of every CLIP-L and bigG layer.
Trainable parameters at rank 4 on sdxl-base: attention 4,474,880; attention_out 5,806,080; all 10,639,360;
conv 1,515,520; CLIP-L 663,552; bigG 2,949,120 (tests/test_lora.py checks these).

Files. kohya (written by default): `lora_unet_<original-layout module path, dots as underscores>.lora_down.weight
/ .lora_up.weight / .alpha`, `lora_te1_text_model_...` (CLIP-L), `lora_te2_text_model_...` (bigG); LoHa as
LyCORIS' `.hada_w1_a / .hada_w1_b / .hada_w2_a / .hada_w2_b / .alpha`. PEFT/diffusers: `unet.<path>.lora_A.weight
/ .lora_B.weight`, `text_encoder.` / `text_encoder_2.`, alphas in diffusers' `lora_adapter_metadata`. Read: both,
plus kohya files with diffusers module names, `lora_te_` (SD1-style CLIP-L prefix), diffusers' older
`.lora.down/.lora.up` and `.lora_linear_layer.down/up`, PEFT `.alpha` keys. A file with any module or tensor
this model does not have is refused with one line (how many matched, the first that did not): never a partial
load.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .config import UNetConfig
from .convert import unet_key_to_original
from .unet import UNet
from .weights import read_state_dict, save_safetensors

# UNet target modes: regexes over a module's diffusers path (anchored at a dot and at the end).
_ATTN_QKV = r"attn[12]\.to_[qkv]"
_ATTN = r"attn[12]\.(to_[qkv]|to_out\.0)"
UNET_TARGETS: dict[str, str] = {
    "attention": _ATTN_QKV,
    "attention_out": _ATTN,
    "all": _ATTN + r"|ff\.net\.(0\.proj|2)|proj_in|proj_out",
    "conv": r"resnets\.\d+\.(conv1|conv2|conv_shortcut)|(down|up)samplers\.0\.conv",
}
TEXT_TARGETS = r"self_attn\.(q|k|v|out)_proj|mlp\.fc[12]"

# component name (the diffusers folder, and the PEFT key prefix) -> kohya prefix
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
_LORA_KEYS = ("lora_down.weight", "lora_up.weight")
_LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


# --------------------------------------------------------------------------------------------------- adapters

class LoRA(nn.Module):
    """LoRA on a Linear, LoCon on a Conv2d: branch(x) = m * (alpha / r) * up(down(dropout(x))).

    Delta W = m * (alpha / r) * up @ down (conv: reshaped to the base kernel). `alpha` is a buffer so it travels
    in the state dict under kohya's `.alpha` key; dropout (on the branch input, as PEFT) only in training.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        self.rank, self.dropout, self.multiplier = rank, dropout, 1.0
        kw = {"device": base.weight.device, "dtype": torch.float32, "bias": False}
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, **kw)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, **kw)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, **kw)
            self.lora_up = nn.Linear(rank, base.out_features, **kw)
        self.register_buffer("alpha", torch.tensor(float(alpha if alpha is not None else rank),
                                                   device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # kohya's and PEFT's init
        nn.init.zeros_(self.lora_up.weight)

    def scale(self) -> torch.Tensor:
        return self.alpha * (self.multiplier / self.rank)  # a tensor: no host sync per forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x.to(self.lora_down.weight.dtype), self.dropout, self.training)
        return self.lora_up(self.lora_down(x)) * self.scale()

    def delta_weight(self) -> torch.Tensor:
        up, down = self.lora_up.weight, self.lora_down.weight
        # (out, r) @ (r, in * kh * kw) -> the base weight's shape
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * self.scale()


class LoHa(nn.Module):
    """LoHa (LyCORIS): Delta W = m * (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b), elementwise product.

    Rank r pairs reach rank up to r^2. Conv: w*_b is (r, in * kh * kw) and Delta W is reshaped to the kernel.
    The branch runs the base op (linear / conv with the base's stride and padding) with Delta W as its weight.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        self.rank, self.dropout, self.multiplier = rank, dropout, 1.0
        self.shape = tuple(base.weight.shape)
        self.conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation) \
            if isinstance(base, nn.Conv2d) else None
        out_f, in_f = self.shape[0], math.prod(self.shape[1:])
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.hada_w1_a = nn.Parameter(torch.empty(out_f, rank, **kw))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_f, **kw))
        self.hada_w2_a = nn.Parameter(torch.empty(out_f, rank, **kw))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_f, **kw))
        self.register_buffer("alpha", torch.tensor(float(alpha if alpha is not None else rank), **kw))
        # LyCORIS' init: w2_a = 0 makes Delta W = 0 while every other factor still gets a gradient.
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)

    def scale(self) -> torch.Tensor:
        return self.alpha * (self.multiplier / self.rank)

    def delta_weight(self) -> torch.Tensor:
        w = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)  # (out, in * kh * kw)
        return w.reshape(self.shape) * self.scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x.to(self.hada_w1_a.dtype), self.dropout, self.training)
        w = self.delta_weight()
        return F.conv2d(x, w, **self.conv) if self.conv is not None else F.linear(x, w)


ADAPTERS = {"lora": LoRA, "loha": LoHa}


# ------------------------------------------------------------------------------------------ targets and names

@dataclass
class Target:
    component: str  # "unet" | "text_encoder" | "text_encoder_2": the diffusers folder and PEFT prefix
    path: str  # module path inside the component (diffusers / transformers names)
    module: nn.Linear | nn.Conv2d  # the base layer


def _components(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(component name, module) of an SDXL bundle (UNet + the text encoders it has) or of a bare UNet."""
    if isinstance(model, UNet):
        return [("unet", model)]
    if not isinstance(getattr(model, "unet", None), UNet) or not hasattr(model, "text"):
        raise TypeError(f"expected the SDXL bundle or its UNet, got {type(model).__name__}")
    parts = [("unet", model.unet), ("text_encoder", model.text.text_encoder), ("text_encoder_2",
                                                                               model.text.text_encoder_2)]
    return [(name, m) for name, m in parts if m is not None]


def kohya_name(component: str, path: str, unet_cfg: UNetConfig | None = None) -> str:
    """The kohya module name: UNet paths in the ORIGINAL layout, text encoders in transformers names."""
    if component == "unet":
        path = unet_key_to_original(path + ".weight", unet_cfg)[: -len(".weight")]
    return KOHYA_PREFIX[component] + path.replace(".", "_")


def _layers(model: nn.Module) -> dict[str, Target]:
    """Every Linear / Conv2d of the model's components, by kohya name."""
    out = {}
    for component, root in _components(model):
        cfg = root.config if component == "unet" else None
        for path, m in root.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                out[kohya_name(component, path, cfg)] = Target(component, path, m)
    return out


def _aliases(layers: dict[str, Target]) -> dict[str, str]:
    """Every module name a LoRA file may use -> our kohya name: kohya (original or diffusers UNet names,
    lora_te_ for CLIP-L) and PEFT (with or without CLIP-L's `text_model.` level, which transformers 5 drops)."""
    alias = {}
    for name, t in layers.items():
        alias[name] = name
        alias[KOHYA_PREFIX[t.component] + t.path.replace(".", "_")] = name
        alias[f"{t.component}.{t.path}"] = name
        if t.component == "text_encoder":
            alias["lora_te_" + t.path.replace(".", "_")] = name
            alias[f"text_encoder.{t.path.removeprefix('text_model.')}"] = name
    return alias


def _select(mode: str) -> re.Pattern:
    parts = mode.split("+")
    bad = [p for p in parts if p not in UNET_TARGETS]
    if bad:
        raise ValueError(f"unknown LoRA target mode {bad[0]!r}; known: {', '.join(UNET_TARGETS)} (join with '+')")
    return re.compile(r"(^|\.)(" + "|".join(UNET_TARGETS[p] for p in parts) + r")$")


# ----------------------------------------------------------------------------------------------------- network

class LoRANetwork(nn.Module):
    """A set of adapters named by their kohya module names, each hooked onto (or merged into) its base layer.

    `state_dict()` is the kohya / LyCORIS file content. Attached: each base layer's output gets
    `+ branch(input)`; merged: Delta W is added to the base weight (no runtime cost) until `unmerge()`.
    """

    def __init__(self, targets: dict[str, Target], adapters: dict[str, nn.Module], config: dict | None = None):
        super().__init__()
        self.targets = targets
        for name, a in adapters.items():
            self.add_module(name, a)
        self.config = dict(config or {})
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
        if merged:
            self.merge()

    # -- attach / merge ----------------------------------------------------------------------------------------
    def attach(self) -> LoRANetwork:
        """Hook every adapter onto its base layer (training, or generation with a live multiplier)."""
        if self.merged:
            raise RuntimeError("this LoRA is merged into the base weights; unmerge() before attach()")
        if not self._hooks:
            for name, adapter in self.named_children():
                self._hooks.append(self.targets[name].module.register_forward_hook(_branch_hook(adapter)))
        return self

    def detach(self) -> LoRANetwork:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self

    @torch.no_grad()
    def _add_deltas(self, sign: float) -> None:
        # One layer at a time in fp32, rounded once to the base dtype: no full-model copy is ever held. unmerge
        # recomputes the same Delta W (adapters and multiplier are fixed while merged) instead of storing it.
        for name, adapter in self.named_children():
            w = self.targets[name].module.weight
            w.copy_((w.float() + sign * adapter.delta_weight().to(w.device)).to(w.dtype))

    def merge(self) -> LoRANetwork:
        """W += Delta W, for generation without per-layer overhead. Detaches the hooks."""
        self.detach()
        if not self.merged:
            self._add_deltas(1.0)
            self.merged = True
        return self

    def unmerge(self) -> LoRANetwork:
        """W -= Delta W: exact up to one rounding each way (float error for fp32 bases, bf16 ulps for bf16)."""
        if self.merged:
            self._add_deltas(-1.0)
            self.merged = False
        return self

    def remove(self) -> None:
        """Take this LoRA off the model entirely (unmerge and detach)."""
        self.unmerge()
        self.detach()

    # -- training ----------------------------------------------------------------------------------------------
    def param_groups(self, unet_lr: float, text_lr: float | None = None,
                     text_2_lr: float | None = None) -> list[dict]:
        """Optimizer parameter groups: UNet, CLIP-L, bigG, each with its own learning rate (text_lr defaults to
        unet_lr, text_2_lr to text_lr); empty groups are left out."""
        lrs = {"unet": unet_lr, "text_encoder": text_lr if text_lr is not None else unet_lr}
        lrs["text_encoder_2"] = text_2_lr if text_2_lr is not None else lrs["text_encoder"]
        groups = []
        for component, lr in lrs.items():
            params = [p for n, a in self.named_children() if self.targets[n].component == component
                      for p in a.parameters()]
            if params:
                groups.append({"name": component, "params": params, "lr": lr})
        return groups


def _branch_hook(adapter: nn.Module):
    def hook(module, args, output):
        return output + adapter(args[0]).to(output.dtype)
    return hook


def inject(model: nn.Module, target_mode: str = "attention", rank: int = 4, alpha: float | None = None,
           dropout: float = 0.0, *, kind: str = "lora", conv_rank: int | None = None, conv_alpha: float | None = None,
           text_encoders: bool = False, text_rank: int | None = None, text_alpha: float | None = None,
           multiplier: float = 1.0, attach: bool = True) -> LoRANetwork:
    """New adapters (fp32, Delta W = 0) on the targets of `target_mode` (see the module docstring), attached.

    `model`: the SDXL bundle or its UNet. alpha defaults to the rank (scale 1). Conv layers ("conv" mode) use
    conv_rank / conv_alpha, the text encoders text_rank / text_alpha, each defaulting to rank / alpha. `kind`:
    "lora" (LoRA / LoCon) or "loha". The base weights are left as they are (freeze them yourself).
    """
    if kind not in ADAPTERS:
        raise ValueError(f"unknown adapter kind {kind!r}; known: {', '.join(ADAPTERS)}")
    select, text_select = _select(target_mode), re.compile(r"(^|\.)(" + TEXT_TARGETS + r")$")
    targets, adapters = {}, {}
    for name, t in _layers(model).items():
        if t.component == "unet":
            if not select.search(t.path):
                continue
            is_conv = isinstance(t.module, nn.Conv2d)
            r, a = (conv_rank or rank, conv_alpha if conv_alpha is not None else alpha) if is_conv else (rank, alpha)
        else:
            if not (text_encoders and text_select.search(t.path)):
                continue
            r, a = text_rank or rank, text_alpha if text_alpha is not None else alpha
        targets[name] = t
        adapters[name] = ADAPTERS[kind](t.module, r, a if a is not None else r, dropout)
    if not adapters:
        raise ValueError(f"target mode {target_mode!r} selects no layer of this model")
    config = {"kind": kind, "target_mode": target_mode, "rank": rank, "alpha": alpha if alpha is not None else rank,
              "conv_rank": conv_rank, "conv_alpha": conv_alpha, "text_encoders": text_encoders,
              "text_rank": text_rank, "text_alpha": text_alpha, "dropout": dropout}
    net = LoRANetwork(targets, adapters, config)
    net.multiplier = multiplier
    return net.attach() if attach else net


def lora_state_dict(network: LoRANetwork) -> dict[str, torch.Tensor]:
    """The adapters' tensors under kohya / LyCORIS keys (what a training checkpoint stores)."""
    return {k: v.detach() for k, v in network.state_dict().items()}


def num_parameters(network: LoRANetwork) -> int:
    return sum(p.numel() for p in network.parameters())


# ------------------------------------------------------------------------------------------------------- saving

def _kohya_metadata(network: LoRANetwork, extra: dict | None) -> dict[str, str]:
    """The `ss_*` entries kohya's sd-scripts write (all strings), which A1111 and tools reading LoRA info use."""
    c = network.config
    kinds = {type(a).__name__ for a in network.children()}
    ranks = Counter(a.rank for a in network.children())
    alphas = Counter(float(a.alpha) for a in network.children())
    loha = "LoHa" in kinds
    args = {"algo": "loha"} if loha else {}
    if c.get("conv_rank"):
        args.update(conv_dim=str(c["conv_rank"]), conv_alpha=str(c.get("conv_alpha") or c["conv_rank"]))
    meta = {
        "ss_network_module": "lycoris.kohya" if loha else "networks.lora",
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": str(float(alphas.most_common(1)[0][0])),
        "ss_network_args": json.dumps(args),
        "ss_network_dropout": str(c.get("dropout", 0.0)),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_network_train_unet_only": str(not any(t.component != "unet" for t in network.targets.values())),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/" + ("lycoris-loha" if loha else "lora"),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
    }
    for k, v in (extra or {}).items():
        if k == "resolution" and not isinstance(v, str):  # kohya writes "(1024, 1024)"
            v = str(tuple(v) if isinstance(v, (tuple, list)) else (v, v))
            k = "ss_resolution"
        elif k == "training_config":
            k = "ss_training_config"
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def _peft_state_dict(network: LoRANetwork) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers/PEFT keys and diffusers' `lora_adapter_metadata` (per component r, lora_alpha, patterns).

    Module paths in the metadata leave out `text_model.`: PEFT matches them as suffixes, and transformers 5's
    CLIPTextModel has no `text_model` level, so `encoder.layers.0.mlp.fc1` names the layer under either."""
    sd, per_component = {}, {}
    for name, a in network.named_children():
        if not isinstance(a, LoRA):
            raise ValueError("the PEFT / diffusers layout holds LoRA and LoCon only; save LoHa in kohya format")
        t = network.targets[name]
        sd[f"{t.component}.{t.path}.lora_A.weight"] = a.lora_down.weight.detach()
        sd[f"{t.component}.{t.path}.lora_B.weight"] = a.lora_up.weight.detach()
        per_component.setdefault(t.component, {})[t.path.removeprefix("text_model.")] = (a.rank, float(a.alpha))
    meta = {}
    for component, mods in per_component.items():
        r = Counter(r for r, _ in mods.values()).most_common(1)[0][0]
        alpha = Counter(al for _, al in mods.values()).most_common(1)[0][0]
        meta.update({f"{component}.r": r, f"{component}.lora_alpha": alpha,
                     f"{component}.target_modules": sorted(mods),
                     f"{component}.rank_pattern": {p: rr for p, (rr, _) in mods.items() if rr != r},
                     f"{component}.alpha_pattern": {p: al for p, (_, al) in mods.items() if al != alpha}})
    return sd, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}


def save_lora(path: str | os.PathLike, network: LoRANetwork, format: str = "kohya", metadata: dict | None = None,
              dtype: torch.dtype | None = None) -> None:
    """Write a LoRA file (safetensors, atomically). `format`: "kohya" (default; LyCORIS keys for LoHa) or
    "peft" (diffusers' layout). `metadata`: extra entries (non-strings JSON-encoded; `resolution` and
    `training_config` become kohya's ss_resolution / ss_training_config). `dtype`: e.g. torch.float16 to halve
    the file (the adapters train in fp32)."""
    if format == "kohya":
        sd, meta = lora_state_dict(network), _kohya_metadata(network, metadata)
    elif format == "peft":
        sd, meta = _peft_state_dict(network)
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    else:
        raise ValueError(f"unknown LoRA format {format!r}; known: kohya, peft")
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    save_safetensors(sd, path, metadata=meta)


# ------------------------------------------------------------------------------------------------------ loading

# Tensor suffixes of every layout we read -> kohya / LyCORIS parameter names.
_SUFFIXES = {
    "lora_down.weight": "lora_down.weight", "lora_up.weight": "lora_up.weight", "alpha": "alpha",
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",  # PEFT
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",  # older diffusers
    "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
    **{k: k for k in _LOHA_KEYS},
}
_SUFFIX_RE = re.compile(r"^(.+?)\.(" + "|".join(re.escape(s) for s in sorted(_SUFFIXES, key=len, reverse=True))
                        + r")$")


def _group(sd: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module name as in the file: {kohya parameter name: tensor}}; an unknown tensor kind raises."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in sd.items():
        m = _SUFFIX_RE.match(key)
        if m is None:
            raise ValueError(f"{source}: unsupported LoRA tensor {key!r} (LoRA, LoCon and LoHa are supported; "
                             "not DoRA, LoKr, Tucker-decomposed conv or full weight diffs)")
        groups.setdefault(m.group(1), {})[_SUFFIXES[m.group(2)]] = v
    return groups


def _peft_alphas(path: Path) -> dict[str, tuple[float, dict[str, float]]]:
    """{component: (lora_alpha, alpha_pattern)} from diffusers' lora_adapter_metadata; PEFT files without it
    mean alpha = rank."""
    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    meta = json.loads(raw) if raw else {}
    return {c: (float(meta[f"{c}.lora_alpha"]), meta.get(f"{c}.alpha_pattern") or {})
            for c in KOHYA_PREFIX if f"{c}.lora_alpha" in meta}


def _alpha_for(file_name: str, tensors: dict, peft_alphas: dict, rank: int) -> float:
    if "alpha" in tensors:  # kohya, LyCORIS, and PEFT files that carry `.alpha` keys
        return float(tensors["alpha"])
    component, _, path = file_name.partition(".")
    if component not in peft_alphas:
        return float(rank)
    alpha, pattern = peft_alphas[component]
    for key, value in pattern.items():  # PEFT's rule: a pattern key matches a path suffix at a dot
        if re.match(rf"(.*\.)?{re.escape(key)}$", path) or re.match(rf"(.*\.)?{re.escape(path)}$", key):
            return float(value)
    return alpha


def load_lora(model: nn.Module, path: str | os.PathLike, scale: float = 1.0, merge: bool = True) -> LoRANetwork:
    """Read a LoRA file (kohya, LyCORIS LoHa/LoCon, diffusers/PEFT) and apply it to `model` with multiplier
    `scale`: merged into the base weights (default; `unmerge()` / `remove()` undoes) or attached as hooks
    (`merge=False`; the multiplier can then change per generation). Call again for more LoRAs: each adds its
    own Delta W. Raises ValueError naming the file if any module or shape does not fit this model."""
    path = Path(path)
    source = str(path)
    sd = read_state_dict(path)
    if not sd:
        raise ValueError(f"{source}: no tensors")
    groups = _group(sd, source)
    layers = _layers(model)
    alias = _aliases(layers)
    unknown = [n for n in groups if n not in alias]
    if unknown:
        hint = " (an SD1.x/2.x LoRA?)" if any(n.startswith("lora_te_") for n in groups) and not any(
            n.startswith("lora_te2_") for n in groups) else ""
        raise ValueError(f"{source}: {len(groups) - len(unknown)} of {len(groups)} LoRA modules match this model"
                         f"{hint}; the first that does not: {unknown[0]!r}")
    peft_alphas = _peft_alphas(path)
    targets, adapters, states = {}, {}, {}
    for file_name, tensors in groups.items():
        name = alias[file_name]
        t = layers[name]
        if all(k in tensors for k in _LORA_KEYS):
            cls, rank, want = LoRA, tensors["lora_down.weight"].shape[0], _LORA_KEYS
        elif all(k in tensors for k in _LOHA_KEYS):
            cls, rank, want = LoHa, tensors["hada_w1_b"].shape[0], _LOHA_KEYS
        else:
            raise ValueError(f"{source}: module {file_name!r} has an incomplete set of tensors "
                             f"({', '.join(sorted(tensors))})")
        extra = sorted(set(tensors) - set(want) - {"alpha"})
        if extra:
            raise ValueError(f"{source}: module {file_name!r} mixes LoRA and LoHa tensors ({extra[0]!r})")
        if name in targets:
            raise ValueError(f"{source}: module {file_name!r} appears twice (under two naming schemes)")
        adapter = cls(t.module, rank, _alpha_for(file_name, tensors, peft_alphas, rank))
        own = adapter.state_dict()
        for k in want:
            got, need = tuple(tensors[k].shape), tuple(own[k].shape)
            if got != need:
                raise ValueError(f"{source}: {file_name}.{k} has shape {got}, this model's {t.component}.{t.path} "
                                 f"needs {need} (a LoRA for another model?)")
        states[name] = {k: tensors[k] for k in want}
        targets[name], adapters[name] = t, adapter
    for name, adapter in adapters.items():
        adapter.load_state_dict({**adapter.state_dict(), **states[name]})
    kinds = {type(a) for a in adapters.values()}
    config = {"kind": "loha" if kinds == {LoHa} else "lora", "source": source,
              "rank": Counter(a.rank for a in adapters.values()).most_common(1)[0][0],
              "alpha": Counter(float(a.alpha) for a in adapters.values()).most_common(1)[0][0]}
    net = LoRANetwork(targets, adapters, config).eval()
    net.multiplier = scale
    return net.merge() if merge else net.attach()
