"""QLoRA and long context on CPU: NF4 weights, bnb checkpoints, the memory plan, tiled MLP, 8-bit AdamW.

The Triton dequantization kernel is tested against `dequantize_nf4_reference` in kernels/test_nf4.py; here
the reference itself is held to error bounds, and to bitsandbytes (an independent implementation of the
same format) where that package is installed.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tests.test_train import learnable_docs, make_cfg, read_metrics, write_jsonl

from snuggle.config import LoraConfig
from snuggle.errors import SnuggleError
from snuggle.load import QUANTIZABLE, load
from snuggle.lora import LoRALinear, apply_lora
from snuggle.model.args import ModelArgs
from snuggle.model.decoder import Decoder
from snuggle.quant.nf4 import NF4_CODE, NF4Weight, dequantize_nf4_reference, quantize_nf4
from snuggle.train.adamw8bit import AdamW8bit, decode, encode
from snuggle.train.loop import train
from snuggle.train.memory import (
    _FRAGMENTATION,
    GIB,
    MemoryPlan,
    _block_bytes,
    apply_memory_plan,
    device_budget_gib,
    plan_for_model,
    plan_memory,
    predict_bytes,
    predict_for_model,
    prefer_expandable_segments,
    static_bytes,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# widest gap between neighbouring NF4 levels (between 0.7230 and 1.0): half of it bounds the rounding
HALF_GAP = float((NF4_CODE[1:] - NF4_CODE[:-1]).max()) / 2


def _absmax_seen(parts: dict, group: int) -> torch.Tensor:
    g = torch.arange(parts["absmax_q"].shape[1]) // group
    return parts["absmax_q"].float() * parts["absmax_scale"][:, g] + parts["absmax_mean"][:, g]


# --- NF4 format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 67), (33, 130), (5, 1), (3, 1000), (64, 64)])
@pytest.mark.parametrize("group", [1, 4, 256])
def test_nf4_round_trip_error_is_bounded(shape, group):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.03
    w[0, 0] = 0.5  # an outlier: its block's other weights lose resolution, but stay within the bound
    parts = quantize_nf4(w, block=64, group=group)
    d = dequantize_nf4_reference(**parts, in_features=shape[1], block=64, group=group)
    assert d.shape == w.shape and parts["qweight"].dtype == torch.uint8
    nb = math.ceil(shape[1] / 64)
    true = F.pad(w.abs(), (0, nb * 64 - shape[1])).view(shape[0], nb, 64).amax(-1)
    seen = _absmax_seen(parts, group)
    # the 8-bit second quantization of absmax: half a step of its group's scale
    g = torch.arange(nb) // group
    assert ((seen - true).abs() <= parts["absmax_scale"][:, g] * 0.5 + 1e-7).all()
    # each weight: half the widest level gap of its block's (reconstructed) absmax, plus the absmax error
    bound = (HALF_GAP * seen + (seen - true).abs() + 1e-7).repeat_interleave(64, dim=1)[:, : shape[1]]
    assert ((d - w).abs() <= bound).all()
    # and the codes are the nearest levels, not merely close ones
    ratio = (w / seen.repeat_interleave(64, dim=1)[:, : shape[1]]).clamp(-1, 1)
    nearest = NF4_CODE[(ratio[..., None] - NF4_CODE).abs().argmin(-1)]
    got = d / seen.repeat_interleave(64, dim=1)[:, : shape[1]]
    torch.testing.assert_close(got, nearest, atol=1e-6, rtol=0)


def test_nf4_zero_and_constant_blocks():
    w = torch.zeros(3, 130)
    w[1] = 0.25
    d = NF4Weight.from_dense(w).dequantize(torch.float32)
    torch.testing.assert_close(d, w)


def test_nf4_weight_size_is_about_4_bits():
    w = torch.randn(256, 1024)
    q = NF4Weight.from_dense(w.to(torch.bfloat16))
    assert q.shape == (256, 1024) and q.dtype == torch.bfloat16
    bits = 8 * q.nbytes() / w.numel()
    assert 4.0 < bits < 4.3, bits


def test_nf4_matches_bitsandbytes_quality():
    """bitsandbytes' NF4 (double quant, block 64) on the same weights: our error is no larger."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 640, generator=torch.Generator().manual_seed(1)) * 0.02
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    theirs = bnb_f.dequantize_4bit(packed, state)
    ours = NF4Weight.from_dense(w).dequantize(torch.float32)
    e_ours, e_theirs = (ours - w).abs().mean(), (theirs - w).abs().mean()
    assert e_ours <= 1.02 * e_theirs, (float(e_ours), float(e_theirs))
    # the same nearest-level codes, up to a handful of ties moved by the two absmax roundings
    ours_codes = quantize_nf4(w)["qweight"].reshape(-1)
    assert (ours_codes == packed.reshape(-1)).float().mean() > 0.97


# --- loading ---------------------------------------------------------------------------------------


def _nf4_modules(model) -> dict[str, NF4Weight]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Weight)}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_load_quantizes_every_block_projection(tiny_hf_model, tmp_path, family):
    path, _ = tiny_hf_model(family, False, tmp_path)
    dense, _ = load(path, with_tokenizer=False, device="cpu")
    q, _ = load(path, with_tokenizer=False, quantize="nf4", device="cpu")
    mods = _nf4_modules(q)
    assert len(mods) == 7 * dense.args.num_layers
    assert all(QUANTIZABLE.fullmatch(n) for n in mods)
    assert not isinstance(q.lm_head.weight, NF4Weight)
    ids = torch.randint(0, dense.args.vocab_size, (2, 19))
    with torch.no_grad():
        a, b = q(ids), dense(ids)
        # 4-bit weights move the logits (on this 48-wide model, by ~1/4 of their spread) ...
        assert (a - b).abs().mean() < 0.5 * (b - b.mean()).abs().mean()
        # ... and the 4-bit model is exactly the dense model with its weights dequantized
        params = dict(dense.named_parameters())
        for name, m in mods.items():
            params[name].copy_(m.dequantize(torch.float32))
        torch.testing.assert_close(a, dense(ids), atol=1e-5, rtol=1e-5)


def test_unknown_quantize_and_full_finetune_are_refused(tiny_hf_model, tmp_path):
    path, _ = tiny_hf_model("llama", False, tmp_path)
    with pytest.raises(SnuggleError, match="quantize"):
        load(path, quantize="int3")
    corpus = write_jsonl(tmp_path / "c.jsonl", learnable_docs(10))
    with pytest.raises(SnuggleError, match="quantize must be"):
        make_cfg(path, corpus, tmp_path / "o", "model.quantize=int3")
    with pytest.raises(SnuggleError, match="needs LoRA"):
        make_cfg(path, corpus, tmp_path / "o", "model.quantize=nf4", "lora=null")


def _write_bnb_checkpoint(src: Path, dst: Path) -> dict[str, tuple]:
    """`src` as transformers saves a bitsandbytes 4-bit model (double quant, NF4), written by bitsandbytes."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    from safetensors.torch import load_file

    tensors = load_file(str(src / "model.safetensors"))
    out, quantized = {}, {}
    for name, t in tensors.items():
        if not QUANTIZABLE.fullmatch(name):
            out[name] = t
            continue
        packed, state = bnb_f.quantize_4bit(t, blocksize=64, compress_statistics=True, quant_type="nf4")
        out[name] = packed
        for k, v in state.as_dict(packed=True).items():
            out[f"{name}.{k}"] = v
        quantized[name] = (packed, state)
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
    }
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (dst / f.name).write_bytes(f.read_bytes())
    return quantized


def test_bnb_4bit_checkpoint_loads_dequantized_and_requantized(tiny_hf_model, tmp_path):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    # rows of whole 64-weight blocks, as real models have: bitsandbytes' own CPU dequantization kernel
    # (the oracle here) mis-decodes rows that end inside a block
    src, _ = tiny_hf_model("llama", True, tmp_path, hidden_size=64, intermediate_size=128, head_dim=16)
    quantized = _write_bnb_checkpoint(src, tmp_path / "bnb-4bit")
    dense, _ = load(tmp_path / "bnb-4bit", with_tokenizer=False, device="cpu")
    params = dict(dense.named_parameters())
    for name, (packed, state) in quantized.items():
        torch.testing.assert_close(params[name], bnb_f.dequantize_4bit(packed, state), atol=0, rtol=0)
    q, tok = load(tmp_path / "bnb-4bit", quantize="nf4", device="cpu")
    assert tok is not None and len(_nf4_modules(q)) == len(quantized)
    for name, m in _nf4_modules(q).items():
        # requantizing bitsandbytes' own levels finds the same level for (almost) every weight
        torch.testing.assert_close(m.dequantize(torch.float32), params[name], atol=2e-3, rtol=0.02)


def test_export_of_a_bnb_4bit_base_loads_in_transformers(tiny_hf_model, tmp_path):
    """The merged export of a QLoRA model on a bitsandbytes checkpoint is 16-bit, so its config.json has
    no quantization_config: with the source's kept, transformers built 4-bit layers around the dense
    weights and failed in forward."""
    pytest.importorskip("bitsandbytes.functional")
    from transformers import AutoModelForCausalLM

    from snuggle.io.hf import save_hf_checkpoint
    from snuggle.io.peft_format import merged_state_dict

    src, _ = tiny_hf_model("llama", True, tmp_path, hidden_size=64, intermediate_size=128, head_dim=16)
    _write_bnb_checkpoint(src, tmp_path / "bnb-4bit")
    model, tok = load(tmp_path / "bnb-4bit", quantize="nf4", device="cpu")
    apply_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0.0, 0.1)
    out = tmp_path / "merged"
    save_hf_checkpoint(merged_state_dict(model), model.args.hf_config, out, tokenizer=tok)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, model.args.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def test_bnb_8bit_checkpoint_is_refused(tiny_hf_model, tmp_path):
    src, _ = tiny_hf_model("llama", True, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SnuggleError, match="8-bit"):
        load(src, with_tokenizer=False)


# --- QLoRA training --------------------------------------------------------------------------------


def test_qlora_on_nf4_base_tracks_lora(tiny_hf_model, tmp_path):
    """A short CPU run with a 4-bit base follows the 16-bit-base LoRA curve; export merges to 16-bit."""
    path, _ = tiny_hf_model("llama", False, tmp_path, hidden_size=64, intermediate_size=128)
    corpus = write_jsonl(tmp_path / "c.jsonl", learnable_docs(80))
    curves = {}
    for q in ("none", "nf4"):
        out = tmp_path / f"run-{q}"
        overrides = (
            f"model.quantize={q}",
            "train.steps=12",
            "train.lr=0.02",
            "train.batch_size=4",
            "model.device=cpu",
        )
        train(make_cfg(path, corpus, out, *overrides))
        curves[q] = [r["loss"] for r in read_metrics(out) if "loss" in r]
    lora, qlora = torch.tensor(curves["none"]), torch.tensor(curves["nf4"])
    assert lora[-1] < 0.7 * lora[0]  # it learns
    # a 64-wide model is the worst case for 4 bits (one block a row); the curves still agree within 10%
    assert ((qlora - lora).abs() / lora).max() < 0.1, (curves["nf4"], curves["none"])

    from transformers import AutoModelForCausalLM

    from snuggle.cli import main
    from snuggle.rebuild import load_run

    assert (
        main(["export", str(tmp_path / "run-nf4"), "--format", "hf", "--out", str(tmp_path / "merged")]) == 0
    )
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    model, _, _ = load_run(tmp_path / "run-nf4")
    assert _nf4_modules(model)  # the run rebuilds its 4-bit base ...
    ids = torch.randint(0, model.args.vocab_size, (2, 13))
    with torch.no_grad():
        # ... and the merged 16-bit export computes what the trained 4-bit model does
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def test_lora_on_nf4_base_equals_lora_on_its_dequantized_weights():
    torch.manual_seed(0)
    base = torch.nn.Linear(70, 33, bias=False)
    nf4 = NF4Weight.from_dense(base.weight.detach())
    with torch.no_grad():
        base.weight.copy_(nf4.dequantize(torch.float32))
    dense = LoRALinear(base, 4, 8)
    quant = LoRALinear(torch.nn.Linear(70, 33, bias=False), 4, 8)
    del quant._parameters["weight"]
    quant.weight = nf4
    with torch.no_grad():
        quant.lora_A.copy_(dense.lora_A)
        dense.lora_B.normal_()
        quant.lora_B.copy_(dense.lora_B)
    x = torch.randn(5, 70)
    for m in (dense, quant):
        m(x).square().sum().backward()
    torch.testing.assert_close(quant(x), dense(x))
    torch.testing.assert_close(quant.lora_A.grad, dense.lora_A.grad)
    torch.testing.assert_close(quant.merged().weight, dense.merged().weight)


# --- long context: tiled MLP -----------------------------------------------------------------------


def _tiny_decoder(dropout: float = 0.0) -> Decoder:
    torch.manual_seed(0)
    cfg = dict(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=72,
        vocab_size=97,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    m = Decoder(ModelArgs.from_hf(cfg))
    apply_lora(m, LoraConfig(r=4, alpha=8, dropout=dropout, train_embeddings=True))
    for mod in m.modules():
        if isinstance(mod, LoRALinear):
            torch.nn.init.normal_(mod.lora_B, std=0.05)
    return m.train()


def _loss_and_grads(m: Decoder, ids, tile: int):
    for b in m.model.layers:
        b.mlp.tile_tokens = tile
    m.zero_grad()
    torch.manual_seed(7)
    loss = m(ids, labels=torch.roll(ids, -1, 1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tile", [1, 10, 16, 74])
def test_tiled_mlp_gives_the_untiled_loss_and_gradients(tile):
    m = _tiny_decoder()
    ids = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(3))
    l0, g0 = _loss_and_grads(m, ids, 0)
    l1, g1 = _loss_and_grads(m, ids, tile)
    torch.testing.assert_close(l1, l0, atol=1e-4, rtol=1e-6)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-5, msg=k)
    with torch.no_grad():  # evaluation takes the tiles too
        for b in m.model.layers:
            b.mlp.tile_tokens = tile
        tiled = m(ids)
        for b in m.model.layers:
            b.mlp.tile_tokens = 0
        torch.testing.assert_close(tiled, m(ids), atol=1e-5, rtol=1e-5)


def test_tiled_mlp_recomputes_with_the_forward_dropout_masks(monkeypatch):
    """With LoRA dropout, backward's recomputation must see the masks the forward drew."""
    import snuggle.model.decoder as decoder

    m = _tiny_decoder(dropout=0.3)
    ids = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(4))
    l1, g1 = _loss_and_grads(m, ids, 16)

    def per_tile(fn, x, tile, params):  # the same tiles through plain autograd: the oracle
        flat = x.reshape(-1, x.shape[-1])
        return torch.cat([fn(flat[s : s + tile]) for s in range(0, flat.shape[0], tile)]).view_as(x)

    monkeypatch.setattr(decoder, "tiled_mlp", per_tile)
    l0, g0 = _loss_and_grads(m, ids, 16)
    torch.testing.assert_close(l1, l0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-5, msg=k)


# --- the memory plan -------------------------------------------------------------------------------

LLAMA3_8B = ModelArgs.from_hf(
    dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
    )
)


def test_plan_takes_the_cheapest_savings_that_fit():
    static = 6 * GIB
    roomy = plan_memory(LLAMA3_8B, static, 2, 2048, 80.0)
    assert (roomy.checkpoint_layers, roomy.offload, roomy.tile_tokens) == (0, False, 0)
    some = plan_memory(LLAMA3_8B, static, 2, 2048, 16.0)
    assert 0 < some.checkpoint_layers < 32 and some.predicted_gib <= 16.0
    # offloading the recomputed blocks' inputs comes before recomputing one block more
    assert some.offload and plan_memory(
        LLAMA3_8B, static, 2, 2048, 16.0, can_offload=False
    ).checkpoint_layers > (some.checkpoint_layers)
    long = plan_memory(LLAMA3_8B, static, 1, 131072, 24.0)
    assert (long.checkpoint_layers, long.offload) == (32, True) and long.tile_tokens > 0
    assert long.predicted_gib <= 24.0
    # every plan fits and costs more savings as the budget shrinks
    plans = [plan_memory(LLAMA3_8B, static, 1, 32768, b) for b in (80, 40, 24, 16)]
    keys = [(p.tile_tokens > 0, p.checkpoint_layers, p.offload) for p in plans]
    assert keys == sorted(keys)
    assert "predicted peak" in long.describe() and "tiles" in long.describe()


def test_plan_recomputes_the_swiglu_product_before_any_block():
    static = 16 * GIB  # a 16-bit 8B base with LoRA
    base = predict_bytes(LLAMA3_8B, 4096, static, 2, 0, False, 0)
    lean = predict_bytes(LLAMA3_8B, 4096, static, 2, 0, False, 0, fused_mlp=True)
    # the product is (tokens, intermediate) a block: its bytes over 32 blocks, less what backward makes again
    assert base - lean > 0.8 * 32 * 4096 * 14336 * 2
    between = (base + lean) / 2 / GIB
    p = plan_memory(LLAMA3_8B, static, 2, 2048, between, can_recompute_product=True)
    assert (p.checkpoint_layers, p.recompute_product) == (0, True)
    assert "SwiGLU product recomputed" in p.describe()
    # without the fast path's fused MLP the same budget costs recomputed blocks
    assert plan_memory(LLAMA3_8B, static, 2, 2048, between).checkpoint_layers > 0
    # room to spare: nothing recomputed
    assert not plan_memory(LLAMA3_8B, static, 2, 2048, 80.0, can_recompute_product=True).recompute_product
    tight = plan_memory(LLAMA3_8B, static, 2, 2048, 24.0, can_recompute_product=True)
    assert (
        tight.recompute_product
        and tight.checkpoint_layers < plan_memory(LLAMA3_8B, static, 2, 2048, 24.0).checkpoint_layers
    )


def test_plan_recomputes_the_norms_with_the_product():
    static = 16 * GIB
    lean = predict_bytes(LLAMA3_8B, 4096, static, 2, 0, False, 0, fused_mlp=True)
    leaner = predict_bytes(LLAMA3_8B, 4096, static, 2, 0, False, 0, fused_mlp=True, fused_norm=True)
    # two (tokens, hidden) tensors a block not kept: the norms' outputs
    assert lean - leaner >= 32 * 2 * 4096 * 4096 * 2
    both = dict(can_recompute_product=True, can_recompute_norm=True)
    p = plan_memory(LLAMA3_8B, static, 2, 2048, 24.0, **both)
    assert p.recompute_product and p.recompute_norm and "SwiGLU product and norms recomputed" in p.describe()
    only_product = plan_memory(LLAMA3_8B, static, 2, 2048, 24.0, can_recompute_product=True)
    assert not only_product.recompute_norm and p.checkpoint_layers < only_product.checkpoint_layers
    assert p.predicted_gib <= 24.0
    # room to spare: neither
    roomy = plan_memory(LLAMA3_8B, static, 2, 2048, 80.0, **both)
    assert not (roomy.recompute_product or roomy.recompute_norm)


def test_plan_that_cannot_fit_names_what_would():
    with pytest.raises(SnuggleError, match=r"data.seq_len <= (\d+)") as e:
        plan_memory(LLAMA3_8B, 6 * GIB, 1, 1 << 20, 24.0)
    fits = int(e.value.args[0].split("data.seq_len <= ")[1].split()[0])
    plan_memory(LLAMA3_8B, 6 * GIB, 1, fits, 24.0)  # the advice holds
    with pytest.raises(SnuggleError, match="model alone needs .*model.quantize=nf4"):
        plan_memory(LLAMA3_8B, 30 * GIB, 1, 2048, 24.0)


def test_predicted_bytes_grow_with_tokens_and_shrink_with_savings():
    p = [predict_bytes(LLAMA3_8B, n, 0, 2, 0, False, 0) for n in (1024, 2048, 4096)]
    assert p[0] < p[1] < p[2]
    assert predict_bytes(LLAMA3_8B, 4096, 0, 2, 32, False, 0) < p[2]
    assert predict_bytes(LLAMA3_8B, 4096, 0, 2, 32, True, 0) < predict_bytes(
        LLAMA3_8B, 4096, 0, 2, 32, False, 0
    )


def test_training_with_a_budget_plans_and_keeps_the_curve(tiny_hf_model, tmp_path, capsys):
    path, _ = tiny_hf_model("llama", False, tmp_path)
    corpus = write_jsonl(tmp_path / "c.jsonl", learnable_docs(40))
    cfg = make_cfg(path, corpus, tmp_path / "free", "model.device=cpu")
    train(cfg)
    # a budget between the predicted peaks with and without recomputing every block (CPU: no offload)
    from snuggle.train.setup import build_model

    model, _ = build_model(cfg)
    static, tokens, L = static_bytes(model), cfg.train.batch_size * cfg.data.seq_len, model.args.num_layers
    lo = predict_bytes(model.args, tokens, static, 4, L, False, 0)
    hi = predict_bytes(model.args, tokens, static, 4, 0, False, 0)
    assert lo < hi
    budget = (lo + hi) / 2 / GIB
    train(make_cfg(path, corpus, tmp_path / "tight", "model.device=cpu", f"train.memory_budget_gib={budget}"))
    err = capsys.readouterr().err
    assert "memory plan for 0.3 GiB: checkpointing 1 of 2 blocks" in err, err
    a = [r["loss"] for r in read_metrics(tmp_path / "free") if "loss" in r]
    b = [r["loss"] for r in read_metrics(tmp_path / "tight") if "loss" in r]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-6, rtol=1e-6)
    out = tmp_path / "impossible"
    with pytest.raises(SnuggleError, match="memory_budget_gib"):
        train(make_cfg(path, corpus, out, "model.device=cpu", "train.memory_budget_gib=0.01"))
    assert not (out / "metrics.jsonl").exists()


# --- the memory plan: blocks whose saved activations wait in CPU memory ----------------------------

STATIC_8B = int(15.6 * GIB)  # a 16-bit 8B base with LoRA


def _peak_8b(k: int, offload: bool, m: int, tokens: int = 4096) -> int:
    return predict_bytes(LLAMA3_8B, tokens, STATIC_8B, 2, k, offload, 0, offload_blocks=m)


@pytest.mark.parametrize("k,offload", [(0, False), (3, False), (3, True)])
def test_each_offloaded_block_saves_one_block_of_activations(k, offload):
    block = _block_bytes(LLAMA3_8B, 4096, 4096, 2)[0]
    assert block > 0.5 * GIB
    peaks = [_peak_8b(k, offload, m) for m in range(6)]
    # the first offloaded block saves nothing: one block's tensors are in flight to and from the host
    assert abs(peaks[0] - peaks[1]) <= 1
    # each one more saves one block's activations (and the allocator's share of them), nothing else
    for m in range(1, 5):
        assert abs(peaks[m] - peaks[m + 1] - block * _FRAGMENTATION) <= 2, m


def test_plan_offloads_the_fewest_blocks_that_fit_before_recomputing_any():
    args = (LLAMA3_8B, STATIC_8B, 2, 2048)
    # a budget that three offloaded blocks meet and two do not
    budget = _peak_8b(0, False, 3) / GIB
    assert _peak_8b(0, False, 2) > budget * GIB and _peak_8b(0, False, 0) > budget * GIB
    p = plan_memory(*args, budget, offload_blocks_max=8)
    assert (p.checkpoint_layers, p.offload, p.offload_blocks, p.tile_tokens) == (0, False, 3, 0)
    assert p.predicted_gib <= budget
    # without a host link to carry them (CPU), the same budget costs recomputed blocks instead
    for cpu in (plan_memory(*args, budget), plan_memory(*args, budget, offload_blocks_max=0)):
        assert cpu.offload_blocks == 0 and cpu.checkpoint_layers > 0
    assert plan_memory(*args, budget, offload_blocks_max=2).checkpoint_layers > 0
    # room to spare: nothing offloaded
    assert plan_memory(*args, 80.0, offload_blocks_max=8).offload_blocks == 0


@pytest.mark.parametrize("offload_max", [4, 20])
def test_plan_offloads_what_the_link_carries_and_recomputes_the_rest(offload_max):
    args = (LLAMA3_8B, STATIC_8B, 2, 2048)
    L = LLAMA3_8B.num_layers
    # tighter than offloading alone reaches: as many blocks as the link carries (and no more than stay
    # stored) are offloaded, and blocks are recomputed besides
    most = min(offload_max, L // 2)
    assert _peak_8b(6, False, min(offload_max, (L - 6) // 2)) < _peak_8b(0, False, most)
    budget = _peak_8b(6, False, min(offload_max, (L - 6) // 2)) / GIB
    p = plan_memory(*args, budget, offload_blocks_max=offload_max)
    k = p.checkpoint_layers
    assert 0 < k <= 6 and p.tile_tokens == 0 and p.predicted_gib <= budget
    assert p.offload_blocks == min(offload_max, (L - k) // 2) > 0
    assert p.offload_blocks <= L - k - p.offload_blocks  # never more offloaded than stored blocks
    # the fewest recomputed blocks: one fewer does not fit, offloaded inputs or not
    m = min(offload_max, (L - k + 1) // 2)
    assert min(_peak_8b(k - 1, False, m), _peak_8b(k - 1, True, m)) > budget * GIB
    # offloading saves recomputation: without it the same budget recomputes more blocks
    assert plan_memory(*args, budget).checkpoint_layers > k
    assert plan_memory(*args, budget).offload_blocks == 0


def test_plan_describes_offloaded_blocks():
    p = plan_memory(LLAMA3_8B, STATIC_8B, 2, 2048, _peak_8b(0, False, 3) / GIB, offload_blocks_max=8)
    assert "activations of 3 blocks kept in CPU memory" in p.describe()
    assert "no activation checkpointing" in p.describe()
    mixed = MemoryPlan(5, True, 0, 20.0, 24.0, 15.6, 32, offload_blocks=7)
    text = mixed.describe()
    assert "checkpointing 5 of 32 blocks (inputs offloaded to CPU)" in text
    assert "activations of 7 blocks kept in CPU memory" in text
    roomy = plan_memory(LLAMA3_8B, STATIC_8B, 2, 2048, 80.0, offload_blocks_max=8)
    for plain in (MemoryPlan(5, True, 0, 20.0, 24.0, 15.6, 32), roomy):
        assert "kept in CPU memory" not in plain.describe()


def _deep_decoder() -> Decoder:
    torch.manual_seed(0)
    args = ModelArgs(
        model_type="llama",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=72,
        num_layers=8,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    m = Decoder(args)
    apply_lora(m, LoraConfig(r=4, alpha=8))
    return m


def test_plan_for_a_cpu_model_offloads_no_blocks():
    model = _deep_decoder()
    B, T = 2, 64
    static, act = static_bytes(model), 4
    head = bool(model.lm_head.weight.requires_grad)

    def peak(k, m):
        return predict_bytes(model.args, B * T, static, act, k, False, 0, head, offload_blocks=m)

    # a budget that offloading three blocks would meet, and that costs recomputed blocks otherwise
    budget = peak(0, 3) / GIB
    assert peak(0, 2) > budget * GIB
    told = plan_for_model(model, B, T, budget, offload_blocks_max=4)
    assert (told.checkpoint_layers, told.offload_blocks) == (0, 3)  # the plan does offload when it may
    p = plan_for_model(model, B, T, budget)  # CPU: the host link is not measured, nothing offloaded
    assert p.offload_blocks == 0 and p.checkpoint_layers > 0 and p.predicted_gib <= budget
    # the plan set on the model: offloaded blocks first, the recomputed ones after them
    apply_memory_plan(model, told)
    assert model.saved_offloader is not None and model.saved_offloader.layers == {0, 1, 2}
    assert model.checkpoint_layers == set()
    apply_memory_plan(model, MemoryPlan(2, False, 0, 1.0, 1.0, 0.5, 8, offload_blocks=3))
    assert model.saved_offloader.layers == {0, 1, 2} and model.checkpoint_layers == {3, 4}
    apply_memory_plan(model, p)
    assert model.saved_offloader is None and model.checkpoint_layers == set(range(p.checkpoint_layers))


def test_predict_for_model_reads_back_what_a_plan_set():
    """bench.py holds each configuration's measured peak against this: a plan set on the model must read
    back as the same prediction the plan was chosen by."""
    model = _deep_decoder()
    B, T = 2, 64
    head = bool(model.lm_head.weight.requires_grad)
    terms = dict(static=static_bytes(model), act_bytes=4, trainable_head=head)
    plans = [
        MemoryPlan(0, False, 0, 0, 1.0, 0, 8),
        MemoryPlan(3, False, 0, 0, 1.0, 0, 8, recompute_product=True),
        MemoryPlan(2, False, 16, 0, 1.0, 0, 8, recompute_product=True, recompute_norm=True, offload_blocks=3),
    ]
    seen = set()
    for p in plans:
        apply_memory_plan(model, p)
        want = predict_bytes(
            model.args, B * T, checkpoint_layers=p.checkpoint_layers, offload=False,
            tile_tokens=p.tile_tokens, fused_mlp=p.recompute_product, fused_norm=p.recompute_norm,
            offload_blocks=p.offload_blocks, **terms,
        )  # fmt: skip
        assert predict_for_model(model, B * T) == want
        seen.add(want)
    assert len(seen) == len(plans)  # each setting moves the prediction


def test_device_budget_is_what_the_allocator_can_still_get(monkeypatch):
    """Free memory plus what the allocator holds, at most the card's size times the process's fraction:
    a desktop's or another process's memory is not in it."""
    card = 24 * GIB
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": card}))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda i: 1.0, raising=False)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 6 * GIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (int(16.5 * GIB), card))
    dev = torch.device("cuda", 0)
    assert device_budget_gib(dev) == pytest.approx(22.5)  # 1.5 GiB held outside this allocator
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda i: 0.5, raising=False)
    assert device_budget_gib(dev) == pytest.approx(12.0)  # the cap binds


@pytest.mark.parametrize("user", [None, "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch, user):
    for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(k, raising=False)
    if user:
        monkeypatch.setenv(user, "max_split_size_mb:128")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    prefer_expandable_segments()
    want = {None: "expandable_segments:True", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}.get(user)
    assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == want
    if user:
        assert os.environ[user] == "max_split_size_mb:128"
    # CUDA already started: the setting would be ignored, so it is not written
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    prefer_expandable_segments()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


# --- 8-bit AdamW -----------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_state_codes_keep_relative_precision(signed):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-5, 0, 5000)
    x = x if signed else x.abs()
    codes, absmax = encode(x, signed)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel()
    y = decode(codes, absmax, signed)
    block_max = absmax.repeat_interleave(256)[: x.numel()]
    big = x.abs() > 1e-5 * block_max  # inside the code's range
    rel = ((y - x).abs() / x.abs())[big]
    assert rel.max() < 0.06 and rel.median() < 0.03
    if not signed:
        assert (y[x > 0] > 0).all()  # a second moment never decodes to 0 (it divides the step)


def test_8bit_state_blocks_run_along_rows_so_row_shards_code_alike():
    # 7 rows of 300: blocks of 256 + 44 in each row, never across one. FSDP2 holds a matrix as row shards;
    # coding each shard alone must give what coding the whole matrix gives, at any split.
    x = torch.randn(7, 300, generator=torch.Generator().manual_seed(0))
    x[3, 256:] *= 1e-4  # a row's short tail block keeps its own scale, not its neighbour row's
    codes, absmax = encode(x, True)
    assert codes.shape == (7, 300) and absmax.shape == (7, 2)
    for cut in (1, 3, 4):
        parts = [encode(x[:cut], True), encode(x[cut:], True)]
        assert torch.equal(torch.cat([c for c, _ in parts]), codes)
        assert torch.equal(torch.cat([a for _, a in parts]), absmax)
    y = decode(codes, absmax, True)
    assert y.shape == x.shape
    torch.testing.assert_close(y[3, 256:], x[3, 256:], rtol=0.06, atol=0)
    assert decode(*encode(torch.zeros(0, 300), False), False).shape == (0, 300)  # a rank with no rows


def _fit(opt_cls, steps=150, **kw):
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(64, 128) * 0.1)
    x, y = torch.randn(256, 128), torch.randn(256, 64)
    opt = opt_cls([w], lr=3e-3, weight_decay=0.01, **kw)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(x @ w.t(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses, opt, w


def test_adamw8bit_tracks_adamw_and_resumes_from_its_state_dict():
    ref, _, _ = _fit(torch.optim.AdamW)
    got, opt, w = _fit(AdamW8bit, min_8bit_size=1)
    assert got[-1] < 0.5 * got[0]
    assert max(abs(a - b) / b for a, b in zip(got, ref, strict=True)) < 0.02
    state = opt.state[w]
    assert state["exp_avg_q"].dtype == torch.uint8 and state["exp_avg_sq_q"].dtype == torch.uint8
    assert sum(t.numel() * t.element_size() for t in state.values()) < 2.1 * w.numel()
    # a fresh optimizer from the state dict continues exactly
    opt2 = AdamW8bit([w], lr=3e-3, weight_decay=0.01, min_8bit_size=1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: no tensor shared
    w.grad = torch.randn_like(w)
    w0 = w.detach().clone()
    opt.step()
    a = w.detach().clone()
    with torch.no_grad():
        w.copy_(w0)
    opt2.step()
    torch.testing.assert_close(w.detach(), a, atol=0, rtol=0)


def test_full_finetune_with_adamw8bit_resumes_exactly(tiny_hf_model, tmp_path):
    path, _ = tiny_hf_model("llama", True, tmp_path)
    corpus = write_jsonl(tmp_path / "c.jsonl", learnable_docs(40))
    common = (
        "lora=null",
        "train.optimizer=adamw8bit",
        "train.lr=0.001",
        "train.schedule=constant",
        "model.device=cpu",
    )
    train(make_cfg(path, corpus, tmp_path / "whole", *common, "train.steps=6"))
    # stopped after 3 steps, then continued to 6 (with a constant lr the shorter schedule is the same)
    train(make_cfg(path, corpus, tmp_path / "split", *common, "train.steps=3"))
    resume = ("train.steps=6", "train.resume=true", "train.allow_config_change=true")
    train(make_cfg(path, corpus, tmp_path / "split", *common, *resume))
    whole = [r["loss"] for r in read_metrics(tmp_path / "whole") if "loss" in r]
    split = [r["loss"] for r in read_metrics(tmp_path / "split") if "loss" in r]
    assert whole[-1] < whole[0]
    assert split == whole


def test_resume_with_another_optimizer_restarts_its_moments(tiny_hf_model, tmp_path, capsys):
    """adamw -> adamw8bit on resume: refused as a change of the curve; allowed, the 8-bit optimizer starts
    with no state (AdamW's moments do not load into it) while the weights and schedule continue."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from snuggle.train.checkpoint import latest_checkpoint

    path, _ = tiny_hf_model("llama", True, tmp_path)
    corpus = write_jsonl(tmp_path / "c.jsonl", learnable_docs(40))
    common = ("lora=null", "train.lr=0.001", "train.schedule=constant", "model.device=cpu")
    out = tmp_path / "run"
    train(make_cfg(path, corpus, out, *common, "train.steps=3"))
    more = ("train.steps=5", "train.resume=true", "train.optimizer=adamw8bit")
    with pytest.raises(SnuggleError, match="train.optimizer: adamw -> adamw8bit"):
        train(make_cfg(path, corpus, out, *common, *more))
    capsys.readouterr()
    train(make_cfg(path, corpus, out, *common, *more, "train.allow_config_change=true"))
    assert "adamw8bit's moments start fresh: checkpoint-0000003 holds adamw's" in capsys.readouterr().err
    dcp_to_torch_save(latest_checkpoint(out) / "optimizer", tmp_path / "optim.pt")
    state = torch.load(tmp_path / "optim.pt", weights_only=True)["state"]
    emb = state["model.embed_tokens.weight"]
    assert float(emb["step"]) == 2  # its own two steps, not AdamW's three before them
    assert emb["exp_avg_q"].dtype == torch.uint8
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_weight_estimate_from_shapes_matches_the_built_model(tiny_hf_model, tmp_path, quantize):
    from snuggle.train.memory import estimate_weight_bytes

    path, _ = tiny_hf_model("llama", False, tmp_path, hidden_size=64, intermediate_size=128, head_dim=16)
    model, _ = load(path, with_tokenizer=False, device="cpu", quantize=quantize)
    built = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    est = estimate_weight_bytes(model.args, 4, quantize)
    assert abs(est - built) <= 0.1 * built, (est, built)


def test_auto_parallel_shards_a_model_too_large_for_one_card():
    from snuggle.train.data_parallel import resolve_strategy

    assert resolve_strategy("auto", 2, use_lora=True) == "ddp"
    assert resolve_strategy("auto", 2, use_lora=True, fits_one_card=False) == "fsdp"
    assert resolve_strategy("auto", 2, use_lora=False) == "fsdp"
    assert resolve_strategy("auto", 1, use_lora=True, fits_one_card=False) == "none"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_trainer_end_to_end_on_gpu(tiny_hf_model, tmp_path, capsys, monkeypatch):
    """The whole GPU path through the trainer: 4-bit load, memory plan, kernels, FlexAttention on packed
    documents, 8-bit AdamW on trained embeddings, then a 16-bit export."""
    path, _ = tiny_hf_model(
        "llama", False, tmp_path, hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
    )  # fmt: skip
    import snuggle.train.loop as loop

    built = []
    real_build = loop.build_model
    monkeypatch.setattr(loop, "build_model", lambda cfg: built.append(real_build(cfg)) or built[-1])
    corpus = write_jsonl(tmp_path / "c.jsonl", learnable_docs(400))
    out = tmp_path / "run"
    cfg = make_cfg(
        path, corpus, out, "model.quantize=nf4", "data.seq_len=256", "train.steps=30", "train.lr=0.003",
        "lora.train_embeddings=true", "train.optimizer=adamw8bit", "train.memory_budget_gib=20",
    )  # fmt: skip
    train(cfg)
    err = capsys.readouterr().err
    assert "memory plan for 20.0 GiB: no activation checkpointing" in err, err
    model = built[-1][0]
    assert model.attention == "flex" and _nf4_modules(model) and model.lm_head.weight.is_cuda
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    from snuggle.cli import main

    assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "merged")]) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainer_keeps_its_curve_with_blocks_offloaded_to_cpu_on_gpu(tiny_hf_model, tmp_path, monkeypatch):
    """The trainer on a GPU with a plan that keeps two blocks' saved activations in pinned CPU memory
    and recomputes one (its input offloaded): the loss curve of storing everything, over steps of two
    micro-batches with evaluations in between."""
    path, _ = tiny_hf_model(
        "llama", False, tmp_path, hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_hidden_layers=4, max_position_embeddings=512,
    )  # fmt: skip
    import snuggle.model.checkpointing as checkpointing
    import snuggle.train.loop as loop

    monkeypatch.setattr(checkpointing, "_MIN_OFFLOAD_BYTES", 0)  # tiny shapes: offload every saved tensor
    built = []
    real_build = loop.build_model
    monkeypatch.setattr(loop, "build_model", lambda cfg: built.append(real_build(cfg)) or built[-1])
    corpus = write_jsonl(tmp_path / "c.jsonl", learnable_docs(300))

    def curve(out: Path, plan: MemoryPlan) -> list[float]:
        monkeypatch.setattr(loop, "memory_plan_for", lambda model, device, **settings: plan)
        cfg = make_cfg(
            path, corpus, out, "model.dtype=float32", "data.seq_len=128", "data.val_fraction=0.1",
            "train.steps=12", "train.grad_accum=2", "train.lr=0.003", "train.eval_every=4",
        )  # fmt: skip
        train(cfg)
        return [r["loss"] for r in read_metrics(out) if "loss" in r]

    stored = curve(tmp_path / "stored", MemoryPlan(0, False, 0, 1.0, 20.0, 0.5, 4))
    offloaded = curve(tmp_path / "offloaded", MemoryPlan(1, True, 0, 1.0, 20.0, 0.5, 4, offload_blocks=2))
    model = built[-1][0]
    off = model.saved_offloader
    assert off is not None and off.layers == {0, 1} and off.host and not off.pending
    assert all(buf.is_pinned() for buf in off.host.values())
    assert model.checkpoint_layers == {2} and model.offloader is not None
    assert len(offloaded) == len(stored) == 12 and stored[-1] < 0.8 * stored[0]
    torch.testing.assert_close(offloaded, stored, rtol=2e-4, atol=0)


def test_parameter_count_counts_4bit_weights_by_shape(tiny_hf_model, tmp_path):
    from snuggle.lora import count_parameters

    path, _ = tiny_hf_model("llama", False, tmp_path)
    dense, _ = load(path, with_tokenizer=False, device="cpu")
    q, _ = load(path, with_tokenizer=False, device="cpu", quantize="nf4")
    assert count_parameters(q) == count_parameters(dense) == sum(p.numel() for p in dense.parameters())


def test_offload_capacity_is_what_the_link_carries_in_a_forward_within_the_host_share(monkeypatch):
    """The arithmetic of `offload_capacity`, its two measurements replaced by fixed figures."""
    from snuggle.train import memory

    a = LLAMA3_8B
    h, f, q, kv = a.hidden_size, a.intermediate_size, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    tokens, block = 4096, 368 * 2**20
    forward_s = a.num_layers * 2 * tokens * (h * (q + 2 * kv) + q * h + 3 * h * f) / 800e12
    monkeypatch.setattr(memory, "gemm_rate", lambda *_: 800e12)
    monkeypatch.setattr(memory, "host_link_rate", lambda _: 50e9)
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 100 * GIB)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    carried = int(0.8 * 50e9 * forward_s // block)
    assert 4 <= carried <= 12  # an H100's link and GEMM rate give a few blocks, not none or all
    assert memory.offload_capacity(a, tokens, block, torch.bfloat16, "cuda") == carried
    # a slower link carries proportionally fewer
    monkeypatch.setattr(memory, "host_link_rate", lambda _: 25e9)
    assert memory.offload_capacity(a, tokens, block, torch.bfloat16, "cuda") == int(
        0.8 * 25e9 * forward_s // block
    )
    # the host's pinned share bounds it, split between the processes of one host
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 4 * block)
    assert memory.offload_capacity(a, tokens, block, torch.bfloat16, "cuda") == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert memory.offload_capacity(a, tokens, block, torch.bfloat16, "cuda") == 1
    assert memory.offload_capacity(a, tokens, 0, torch.bfloat16, "cuda") == 0
