"""python -m sdxl.lora_tools resize | merge | extract, each tested for what it claims.

Oracles: the Eckart-Young truncated SVD of the full Delta W computed here in float64 (resize, extract); kohya's
resize_lora rank rules written out (dynamic ranks); the merged weights of load_lora applied file by file (merge).
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdxl
from sdxl import lora
from sdxl.lora_tools import main


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return sdxl.load_model("tiny")


def _delta(sd: dict, name: str) -> torch.Tensor:
    """kohya: Delta W = (alpha / r) up @ down, as (out, in * kh * kw), float64."""
    down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
    return sd[f"{name}.alpha"].item() / down.shape[0] * up.flatten(1) @ down.flatten(1)


def _best(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :k] * s[:k] @ vh[:k]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()[-1] if err.strip() else ""


def test_resize_keeps_the_best_low_rank_delta(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    lin, conv = "lora_unet_a", "lora_unet_b"
    s_lin = torch.tensor([8.0, 4, 2, 1, 0.5, 0.25, 0.1, 0.05])  # the singular values of lin's up @ down
    q1, _ = torch.linalg.qr(torch.randn(40, 8, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(24, 8, generator=g))
    sd = {f"{lin}.lora_up.weight": (q1 * s_lin).contiguous(), f"{lin}.lora_down.weight": q2.T.contiguous(),
          f"{lin}.alpha": torch.tensor(4.0),
          f"{conv}.lora_up.weight": torch.randn(16, 8, 1, 1, generator=g),
          f"{conv}.lora_down.weight": torch.randn(8, 6, 3, 3, generator=g), f"{conv}.alpha": torch.tensor(8.0)}
    src = tmp_path / "in.safetensors"
    save_file(sd, str(src), metadata={"ss_network_dim": "8", "sdxl_mini_family": "latent"})
    code, out, _ = _run(capsys, "resize", src, tmp_path / "r4.safetensors", "--rank", 4, "--conv_rank", 3)
    assert code == 0
    got = load_file(tmp_path / "r4.safetensors")
    assert got[f"{lin}.lora_down.weight"].shape == (4, 24) and got[f"{conv}.lora_down.weight"].shape == (3, 6, 3, 3)
    assert got[f"{lin}.alpha"].item() == 2.0  # alpha / r kept: 4 / 8 = 2 / 4
    for name, k in ((lin, 4), (conv, 3)):
        torch.testing.assert_close(_delta(got, name), _best(_delta(sd, name), k), rtol=1e-5, atol=1e-5)
    s_conv = torch.linalg.svdvals(_delta(sd, conv))
    fro = [(s[:k].square().sum() / s.square().sum()).sqrt().item() for s, k in ((s_lin, 4), (s_conv, 3))]
    assert f"Frobenius norm retained: mean {sum(fro) / 2:.2%}, min {fro[1]:.2%} ({conv})" in out
    with safe_open(str(tmp_path / "r4.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_dim"] in ("3", "4") and f.metadata()["sdxl_mini_family"] == "latent"

    # kohya's dynamic ranks: sv_ratio counts S > S[0] / P, sv_fro / sv_cumulative find where the normalised
    # cumulative sum reaches P^2 / P (searchsorted, + 1); each index is clamped to [1, min(out, in) - 1], then + 1.
    cum = lambda v, p: int(torch.searchsorted(torch.cumsum(v, 0) / v.sum(), p)) + 1  # noqa: E731
    for method, p, index in (("sv_ratio", 10.0, int((s_lin > 0.8).sum())),
                             ("sv_fro", 0.99, cum(s_lin.square(), 0.99 ** 2)),
                             ("sv_cumulative", 0.9, cum(s_lin, 0.9))):
        code, _, _ = _run(capsys, "resize", src, tmp_path / "d.safetensors", "--rank", 8, "--dynamic", method,
                          "--dynamic_param", p)
        assert code == 0
        k = min(max(1, min(index, 23)) + 1, 8)
        assert 1 < k < 8, method
        got = load_file(tmp_path / "d.safetensors")
        assert got[f"{lin}.lora_down.weight"].shape[0] == k, method
        torch.testing.assert_close(_delta(got, lin), _best(_delta(sd, lin), k), rtol=1e-5, atol=1e-5)

    # Bad input: a rank above the current one, a file that is not a LoRA / LoCon, a missing file.
    code, _, err = _run(capsys, "resize", src, tmp_path / "x.safetensors", "--rank", 12)
    assert code == 2 and err == f"lora_tools resize: error: {src}: module '{lin}' has rank 8; a resize to rank 12 " \
                                "would raise it"
    save_file({"lora_unet_a.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    code, _, err = _run(capsys, "resize", tmp_path / "loha.safetensors", tmp_path / "x.safetensors", "--rank", 1)
    assert code == 2 and "'lora_unet_a.hada_w1_a' is not a kohya LoRA / LoCon tensor" in err
    code, _, err = _run(capsys, "resize", tmp_path / "nope.safetensors", tmp_path / "x.safetensors", "--rank", 1)
    assert code == 2 and err.endswith("nope.safetensors: missing file")
    assert not (tmp_path / "x.safetensors").exists()


def test_merge_into_one_file_and_into_a_model(tiny, tmp_path, capsys):
    model = tiny
    a = lora.inject(model, "attention+conv", rank=4, alpha=2.0, conv_rank=2, attach=False)
    b = lora.inject(model, "attention", rank=3, alpha=6.0, text_encoders=True, attach=False)
    for seed, net in enumerate((a, b)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        lora.save_lora(tmp_path / f"{'ab'[seed]}.safetensors", net)
    layers = lora._layers(model)
    w0 = {n: t.module.weight.detach().clone() for n, t in layers.items()}
    # load_lora of each file with its scale, merged: the weights the merged file must give.
    la, lb = lora.load_lora(model, tmp_path / "a.safetensors", 0.5), lora.load_lora(model, tmp_path / "b.safetensors",
                                                                                      -1.5)
    by_hand = {n: t.module.weight.detach().clone() for n, t in layers.items()}
    la.remove(), lb.remove()
    changed = [n for n in layers if not torch.equal(by_hand[n], w0[n])]
    assert len(changed) == len(set(a.targets) | set(b.targets))
    code, out, _ = _run(capsys, "merge", f"{tmp_path / 'a.safetensors'}:0.5", f"{tmp_path / 'b.safetensors'}:-1.5",
                        "--out", tmp_path / "ab.safetensors")
    assert code == 0 and "from 2 files" in out
    keys = load_file(tmp_path / "ab.safetensors")
    q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert keys[f"{q}.lora_down.weight"].shape[0] == 7 and keys[f"{q}.alpha"].item() == 7.0  # ranks side by side
    merged = lora.load_lora(model, tmp_path / "ab.safetensors")
    try:
        for n, t in layers.items():
            torch.testing.assert_close(t.module.weight, by_hand[n], rtol=1e-5, atol=1e-6)
    finally:
        merged.remove()

    # Into the model: a folder, loadable, with the same weights.
    code, _, _ = _run(capsys, "merge", f"{tmp_path / 'a.safetensors'}:0.5", f"{tmp_path / 'b.safetensors'}:-1.5",
                      "--model", "tiny", "--out", tmp_path / "merged")
    assert code == 0
    back = lora._layers(sdxl.load_model(tmp_path / "merged"))
    for n in changed:
        torch.testing.assert_close(back[n].module.weight, by_hand[n], rtol=1e-5, atol=1e-6)

    # Bad input: LoRAs of two model families; shapes of another model.
    pixel = dict(load_file(tmp_path / "b.safetensors"))
    save_file(pixel, str(tmp_path / "pixel.safetensors"), metadata={"sdxl_mini_family": "pixel"})
    code, _, err = _run(capsys, "merge", tmp_path / "a.safetensors", tmp_path / "pixel.safetensors", "--out",
                        tmp_path / "x.safetensors")
    assert code == 2 and err == "lora_tools merge: error: these LoRAs are for different model families (latent, pixel)"
    other = {k: torch.zeros(v.shape[0], 7) if k == f"{q}.lora_down.weight" else v for k, v in pixel.items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    code, _, err = _run(capsys, "merge", tmp_path / "a.safetensors", tmp_path / "other.safetensors", "--out",
                        tmp_path / "x.safetensors")
    assert code == 2 and f"module '{q}' has down (3, 7)" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_extract_reproduces_the_difference(tmp_path, capsys):
    base = sdxl.load_model("tiny")  # the preset "tiny" names: its weights come from a fixed seed
    tuned = copy.deepcopy(base)
    layers = lora._layers(tuned)
    g = torch.Generator().manual_seed(3)
    changed = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": 0.02,  # Linear 64 x 64
               "lora_unet_input_blocks_1_0_in_layers_2": 0.02,  # 3x3 conv
               "lora_te2_text_model_encoder_layers_0_mlp_fc1": 0.02}
    with torch.no_grad():
        for n, std in changed.items():
            w = layers[n].module.weight
            w.add_(torch.randn(w.shape, generator=g) * std)
    tuned.save_single_file(tmp_path / "tuned.safetensors")
    want = {n: (layers[n].module.weight - lora._layers(base)[n].module.weight).double().flatten(1) for n in changed}
    # Full rank (64 >= every dimension here, 32 * 9 for the conv): the LoRA is the difference itself.
    code, out, _ = _run(capsys, "extract", "tiny", tmp_path / "tuned.safetensors",
                        tmp_path / "full.safetensors", "--rank", 64, "--conv_rank", 64)
    assert code == 0 and "3 layers" in out and "retained: mean 100.00%" in out
    full = load_file(tmp_path / "full.safetensors")
    assert {k.split(".")[0] for k in full} == set(changed)
    for n in changed:
        torch.testing.assert_close(_delta(full, n), want[n], rtol=0, atol=1e-5)
    net = lora.load_lora(base, tmp_path / "full.safetensors")  # and as a LoRA on the base: the tuned weights
    try:
        for n in changed:
            torch.testing.assert_close(lora._layers(base)[n].module.weight, layers[n].module.weight, rtol=0, atol=1e-5)
    finally:
        net.remove()
    # Rank 4, no --conv_rank: the best rank-4 approximation of the Linear layers; 3x3 convs are left out (kohya).
    code, _, _ = _run(capsys, "extract", "tiny", tmp_path / "tuned.safetensors",
                      tmp_path / "r4.safetensors", "--rank", 4)
    low = load_file(tmp_path / "r4.safetensors")
    assert code == 0 and {k.split(".")[0] for k in low} == set(changed) - {"lora_unet_input_blocks_1_0_in_layers_2"}
    for n in set(changed) - {"lora_unet_input_blocks_1_0_in_layers_2"}:
        torch.testing.assert_close(_delta(low, n), _best(want[n], 4), rtol=0, atol=1e-5)
    code, _, err = _run(capsys, "extract", "tiny", tmp_path / "nope", tmp_path / "x.safetensors", "--rank", 4)
    assert code == 2 and err.startswith("lora_tools extract: error: ") and "nope" in err
