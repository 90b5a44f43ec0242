"""LoRA, LoCon and LoHa adapters for the SDXL UNet (latent or pixel) and both text encoders; inject, merge, files.

    net = inject(model, "attention", rank=4, alpha=4, text_encoders=True)   # training: adapters attached
    save_lora("lora.safetensors", net)                  # kohya keys: ComfyUI, A1111, diffusers' load_lora_weights
    net = load_lora(model, "other.safetensors", 0.8)   # generation: merged into the base weights (unmerge() undoes)

LoRA: Delta W = m * (alpha / r) * up @ down (LoCon on a Conv2d: down a conv with the base kernel, up 1x1); LoHa
(LyCORIS): Delta W = m * (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b); m the multiplier; up / w2_a start at zero.
Adapters are fp32 whatever the base dtype (the branch casts in and out, as PEFT: no fp32 copy of a bf16 base).
They live in a `LoRANetwork` *outside* the model tree, hooked onto their base layers: `unet.state_dict()` keeps the
diffusers names, `network.state_dict()` is the kohya file; the cost: DDP must wrap a module owning both.
Target modes (`+` combines, UNET_TARGETS): attention (q/k/v), attention_out (+ to_out.0), all (+ ff, proj_in /
proj_out: kohya's default), conv (LoCon on resnet, sampler and pixel codec convs). Text encoders: TEXT_TARGETS.

Files: kohya (the default) `lora_unet_<original-layout path, dots as underscores>.lora_down.weight / .lora_up.weight
/ .alpha` (pixel codec: `lora_unet_encoder_...`), `lora_te1_` CLIP-L, `lora_te2_` bigG, LoHa as LyCORIS'
`.hada_w1_a ...`; PEFT `unet.<path>.lora_A.weight / .lora_B.weight`, `text_encoder(_2).`, alphas in
`lora_adapter_metadata`. Both are read (and the variants in `_SUFFIXES` / `_aliases`); a module or tensor this model
lacks refuses the whole file, as does a LoRA of the other family (metadata `sdxl_mini_family`; none = "latent")."""
from __future__ import annotations

import json
import math
import os
import re
import statistics
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


class _Adapter(nn.Module):
    """Rank, multiplier, dropout (on the branch input, as PEFT) and `alpha`, a buffer: kohya's `.alpha` key."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None, dropout: float):
        super().__init__()
        self.rank, self.dropout, self.multiplier = rank, dropout, 1.0
        self.register_buffer("alpha", torch.tensor(float(rank if alpha is None else alpha), dtype=torch.float32,
                                                    device=base.weight.device))

    def scale(self) -> torch.Tensor:
        return self.alpha * (self.multiplier / self.rank)  # a tensor: no host sync per forward

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x.to(self.alpha.dtype), self.dropout, self.training)  # the adapter's dtype (fp32)

    def _branch_hook(self, base: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self(args[0]).to(output.dtype)  # a forward hook on the base layer


class LoRA(_Adapter):
    """LoRA on a Linear, LoCon on a Conv2d: branch(x) = m * (alpha / r) * up(down(dropout(x)))."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        kw = {"device": base.weight.device, "dtype": torch.float32, "bias": False}
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, **kw)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, **kw)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, **kw)
            self.lora_up = nn.Linear(rank, base.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # kohya's and PEFT's init
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(self._input(x))) * self.scale()

    def delta_weight(self) -> torch.Tensor:
        up, down = self.lora_up.weight, self.lora_down.weight
        # (out, r) @ (r, in * kh * kw) -> the base weight's shape
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * self.scale()


class LoHa(_Adapter):
    """LoHa (LyCORIS; rank up to r^2): the branch runs the base op with Delta W (reshaped to a kernel) as weight."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        self.shape = tuple(base.weight.shape)
        self.conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation) \
            if isinstance(base, nn.Conv2d) else None
        out_f, in_f = self.shape[0], math.prod(self.shape[1:])
        kw = {"device": base.weight.device, "dtype": torch.float32}
        # LyCORIS' init: w2_a = 0 makes Delta W = 0 while every other factor still gets a gradient.
        self.hada_w1_a = nn.Parameter(torch.randn(out_f, rank, **kw) * 0.1)
        self.hada_w1_b = nn.Parameter(torch.randn(rank, in_f, **kw))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_f, rank, **kw))
        self.hada_w2_b = nn.Parameter(torch.randn(rank, in_f, **kw))

    def delta_weight(self) -> torch.Tensor:
        w = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)  # (out, in * kh * kw)
        return w.reshape(self.shape) * self.scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._input(x), self.delta_weight()
        return F.conv2d(x, w, **self.conv) if self.conv is not None else F.linear(x, w)


ADAPTERS = {"lora": LoRA, "loha": LoHa}


@dataclass
class Target:
    component: str  # "unet" | "text_encoder" | "text_encoder_2": the diffusers folder and PEFT prefix
    path: str  # module path inside the component (diffusers / transformers names)
    module: nn.Linear | nn.Conv2d  # the base layer


def _family(model: nn.Module) -> str:
    """"latent" or "pixel": the bundle's `family`; a bare UNet is a pixel one when it has the patch codec."""
    return getattr(model, "family", "pixel" if hasattr(model, "encoder") else "latent")


def _layers(model: nn.Module) -> dict[str, Target]:
    """Every Linear / Conv2d of a UNet or a bundle (UNet and text encoders) by kohya name (UNet: original layout)."""
    if hasattr(model, "down_blocks"):
        parts = {"unet": model}
    elif hasattr(model, "unet") and hasattr(model, "text"):
        parts = {"unet": model.unet, "text_encoder": model.text.text_encoder,
                 "text_encoder_2": model.text.text_encoder_2}
    else:
        raise TypeError(f"expected an SDXL bundle or its UNet, got {type(model).__name__}")
    out = {}
    for component, root in parts.items():
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
                w.copy_((w.float() + (1 if merged else -1) * adapter.delta_weight().to(w.device)).to(w.dtype))
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


def inject(model: nn.Module, target_mode: str = "attention", rank: int = 4, alpha: float | None = None,
           dropout: float = 0.0, *, kind: str = "lora", conv_rank: int | None = None, conv_alpha: float | None = None,
           text_encoders: bool = False, text_rank: int | None = None, text_alpha: float | None = None,
           multiplier: float = 1.0, attach: bool = True) -> LoRANetwork:
    """New "lora" (LoRA / LoCon) or "loha" adapters (fp32, Delta W = 0) on the `target_mode` layers of an SDXL bundle
    or its UNet; conv_* / text_* rank and alpha default to rank / alpha (itself the rank). Freeze the base yourself."""
    if kind not in ADAPTERS:
        raise ValueError(f"unknown adapter kind {kind!r}; known: {', '.join(ADAPTERS)}")
    modes = target_mode.split("+")
    if bad := [m for m in modes if m not in UNET_TARGETS]:
        raise ValueError(f"unknown LoRA target mode {bad[0]!r}; known: {', '.join(UNET_TARGETS)} (join with '+')")
    select = re.compile(r"(^|\.)(" + "|".join(UNET_TARGETS[m] for m in modes) + r")$")
    text_select = re.compile(r"(^|\.)(" + TEXT_TARGETS + r")$")
    targets, adapters = {}, {}
    for name, t in _layers(model).items():
        if t.component == "unet" and select.search(t.path):
            conv = isinstance(t.module, nn.Conv2d)
            r, a = (conv_rank or rank, alpha if conv_alpha is None else conv_alpha) if conv else (rank, alpha)
        elif t.component != "unet" and text_encoders and text_select.search(t.path):
            r, a = text_rank or rank, alpha if text_alpha is None else text_alpha
        else:
            continue
        targets[name], adapters[name] = t, ADAPTERS[kind](t.module, r, a, dropout)
    if not adapters:
        raise ValueError(f"target mode {target_mode!r} selects no layer of this model")
    config = {"kind": kind, "target_mode": target_mode, "rank": rank, "alpha": alpha if alpha is not None else rank,
              "conv_rank": conv_rank, "conv_alpha": conv_alpha, "text_encoders": text_encoders,
              "text_rank": text_rank, "text_alpha": text_alpha, "dropout": dropout, "family": _family(model)}
    net = LoRANetwork(targets, adapters, config)
    net.multiplier = multiplier
    return net.attach() if attach else net


def _kohya_metadata(network: LoRANetwork) -> dict[str, str]:
    """The `ss_*` entries kohya's sd-scripts write (all strings), which A1111 and tools reading LoRA info use."""
    c, adapters = network.config, list(network.children())
    loha = any(isinstance(a, LoHa) for a in adapters)
    args = {"algo": "loha"} if loha else {}
    if c.get("conv_rank"):
        args.update(conv_dim=str(c["conv_rank"]), conv_alpha=str(c.get("conv_alpha") or c["conv_rank"]))
    return {"ss_network_module": "lycoris.kohya" if loha else "networks.lora",
            "ss_network_dim": str(statistics.mode(a.rank for a in adapters)),
            "ss_network_alpha": str(statistics.mode(float(a.alpha) for a in adapters)),
            "ss_network_args": json.dumps(args), "ss_network_dropout": str(c.get("dropout", 0.0)),
            "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
            "ss_network_train_unet_only": str(all(t.component == "unet" for t in network.targets.values())),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/" + ("lycoris-loha" if loha else "lora"),
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models"}


def _peft_state_dict(network: LoRANetwork) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT keys and diffusers' `lora_adapter_metadata`. Its paths leave out `text_model.` (transformers 5 has no such
    level): PEFT matches them as suffixes, so `encoder.layers.0.mlp.fc1` names the layer under either version."""
    sd, per_component = {}, {}
    for name, a in network.named_children():
        if not isinstance(a, LoRA):
            raise ValueError("the PEFT / diffusers layout holds LoRA and LoCon only; save LoHa in kohya format")
        t = network.targets[name]
        sd[f"{t.component}.{t.path}.lora_A.weight"] = a.lora_down.weight
        sd[f"{t.component}.{t.path}.lora_B.weight"] = a.lora_up.weight
        per_component.setdefault(t.component, {})[t.path.removeprefix("text_model.")] = (a.rank, float(a.alpha))
    meta = {}
    for component, mods in per_component.items():
        r, alpha = statistics.mode(r for r, _ in mods.values()), statistics.mode(al for _, al in mods.values())
        meta.update({f"{component}.r": r, f"{component}.lora_alpha": alpha,
                     f"{component}.target_modules": sorted(mods),
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
_SUFFIXES = {**{k: k for k in ("alpha", *_LORA_KEYS, *_LOHA_KEYS)},
             "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",  # PEFT
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
    groups: dict[str, dict[str, torch.Tensor]] = {}  # module name as in the file -> {kohya parameter name: tensor}
    for key, v in sd.items():
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)  # at most one matches
        if suffix is None:
            raise CheckpointError(f"{path}: unsupported LoRA tensor {key!r} (LoRA, LoCon and LoHa are supported; "
                                  "not DoRA, LoKr, Tucker-decomposed conv or full weight diffs)")
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
        t, want = layers[name], tuple(sorted(set(tensors) - {"alpha"}))  # both key tuples are sorted
        if want not in (_LORA_KEYS, _LOHA_KEYS):
            raise CheckpointError(f"{path}: module {file_name!r} holds {', '.join(want)}: not one complete "
                                  "LoRA or LoHa")
        cls = LoRA if want == _LORA_KEYS else LoHa
        rank = tensors["lora_down.weight" if cls is LoRA else "hada_w1_b"].shape[0]
        if name in targets:
            raise CheckpointError(f"{path}: module {file_name!r} appears twice (under two naming schemes)")
        adapter = cls(t.module, rank, _alpha_for(file_name, tensors, peft_meta, rank))
        state = adapter.state_dict()
        for k in want:
            if tensors[k].shape != state[k].shape:
                raise CheckpointError(f"{path}: {file_name}.{k} has shape {tuple(tensors[k].shape)}, this model's "
                                      f"{t.component}.{t.path} needs {tuple(state[k].shape)} (another model's LoRA?)")
        adapter.load_state_dict({**state, **{k: tensors[k] for k in want}})
        targets[name], adapters[name] = t, adapter
    config = {"kind": "loha" if all(isinstance(a, LoHa) for a in adapters.values()) else "lora",
              "source": str(path), "family": family, "rank": statistics.mode(a.rank for a in adapters.values()),
              "alpha": statistics.mode(float(a.alpha) for a in adapters.values())}
    net = LoRANetwork(targets, adapters, config).eval()
    net.multiplier = scale
    return net.merge() if merge else net.attach()
