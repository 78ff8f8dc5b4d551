"""benchmarks/run.py's ratio to the best peer, and bench.py's model directory for peers that load from a path.

The ratio is what the issues' targets are stated in ("1.3x Unsloth's fastest configuration that fits the
cap"), so which peer row a snuggle row is held against is tested here, with measured and anchor rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench  # noqa: E402
import run  # noqa: E402


def row(variant, model="8b", ckpt="none", tok=1000.0, peak=10.0, cap=0, quantize="none", batch=2, seq=2048):
    return dict(
        variant=variant,
        model=model,
        batch=batch,
        seq=seq,
        ckpt=ckpt,
        quantize=quantize,
        cap_gib=cap,
        tokens_per_s=tok,
        peak_gib=peak,
    )


def test_capped_row_is_held_against_the_fastest_peer_that_fits_the_cap():
    peers = [row("unsloth", tok=14000, peak=30.6), row("unsloth", ckpt="all", tok=10000, peak=16.7)]
    capped = row("snuggle", ckpt="plan", cap=24)
    assert run.best_peer(capped, peers) == 10000  # the uncapped peer needs 30.6 GiB: it does not fit
    assert run.best_peer(row("snuggle"), peers) == 14000  # uncapped: the fastest
    # a peer run under the same cap fits by construction, whatever its peak
    assert run.best_peer(capped, [*peers, row("unsloth", tok=12000, peak=23.9, cap=24)]) == 12000


def test_offloaded_row_is_held_against_the_peers_checkpointed_runs():
    peers = [row("unsloth", tok=14000, peak=30.6), row("unsloth", ckpt="all", tok=10000, peak=16.7)]
    assert run.best_peer(row("snuggle", ckpt="offload"), peers) == 10000


def test_measured_peers_win_over_anchors_and_other_cases_never_count():
    anchors = run.anchor_rows()
    assert run.best_peer(row("snuggle"), anchors) == 14665  # ANCHORS.md's Unsloth 8B without checkpointing
    measured = [row("unsloth", tok=15500, peak=30.0)]
    assert run.best_peer(row("snuggle"), measured + anchors) == 15500
    # another model, batch, sequence or precision is not a peer of this row
    others = [
        row("unsloth", model="1b", tok=1e6),
        row("unsloth", batch=1, tok=1e6),
        row("unsloth", quantize="nf4", tok=1e6),
    ]
    assert run.best_peer(row("snuggle"), others) is None
    qlora = row("snuggle", ckpt="plan", cap=24, quantize="nf4")
    assert run.best_peer(qlora, anchors) == 14104  # Unsloth QLoRA without checkpointing, 21.0 GiB


def test_suites_name_known_variants_and_shapes():
    for name, cases in run.SUITES.items():
        for variant, model, *_ in cases:
            assert variant in ("snuggle", "hf", "liger", "unsloth"), name
            assert model in bench.SHAPES, name


def test_model_dir_holds_the_benchmark_weights_and_a_tokenizer_of_the_vocabulary(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    monkeypatch.setattr(bench, "MODEL_DIR", str(tmp_path / "snuggle-bench-{model}"))
    path = Path(bench.write_model_dir(Namespace(model="tiny"), torch.device("cpu")))
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.vocab_size == bench.SHAPES["tiny"]["vocab_size"] and cfg.num_hidden_layers == 2
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == cfg.vocab_size and tok.eos_token_id == cfg.eos_token_id
    # the weights are build_hf's: the same names and the same seeded values
    with torch.device("meta"):
        ref = LlamaForCausalLM(bench.hf_config("tiny")).to(torch.bfloat16)
    ref.to_empty(device="cpu")
    ref.tie_weights()
    bench.init_weights(ref.named_parameters())
    saved = load_file(path / "model.safetensors")
    for name, p in ref.state_dict().items():
        if name == "lm_head.weight" and name not in saved:
            continue  # tied to the embedding
        assert torch.equal(saved[name], p), name
    # written once: a second call finds the complete directory and leaves it as it is
    stamp = (path / "config.json").stat().st_mtime_ns
    assert bench.write_model_dir(Namespace(model="tiny"), torch.device("cpu")) == str(path)
    assert (path / "config.json").stat().st_mtime_ns == stamp
    assert json.loads((path / "config.json").read_text())["pad_token_id"] == 3


def test_table_rebuilt_from_printed_rows_carries_same_run_ratios(tmp_path):
    """`run.py --rows`: a run stopped before its table still gets one, from the lines it printed."""
    env = {"gpu": "NVIDIA H200", "commit": "abc1234"}
    lines = [
        {"environment": env, "matmul_tflops": 800.0},
        {
            **row("snuggle", ckpt="plan", cap=24, tok=15000, peak=23.3),
            "loss_first": 12.6,
            "loss_last": 12.5,
            "step_s": 0.27,
        },
        {**row("unsloth", tok=15800, peak=30.6), "loss_first": 12.6, "loss_last": 12.5, "step_s": 0.26},
        {
            **row("unsloth", ckpt="all", tok=10000, peak=16.7),
            "loss_first": 12.6,
            "loss_last": 12.5,
            "step_s": 0.4,
        },
    ]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "targets", "--rows", str(src), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    table = (tmp_path / "targets-NVIDIA_H200-abc1234.md").read_text()
    # held against Unsloth's offloaded run (the only one that fits 24 GiB); no H100 anchor on an H200
    assert "| 8b snuggle, ckpt plan, cap 24 GiB | 15,000 |" in table
    assert "| 1.50 |" in table
    rows = [json.loads(x) for x in (tmp_path / "targets-NVIDIA_H200-abc1234.jsonl").read_text().splitlines()]
    assert rows[0]["vs_best_peer"] == 1.5 and "mfu" in rows[1] and rows[1]["gpu"] == "NVIDIA H200"


def test_hf_peft_variant_starts_from_the_seeded_lora_factors_and_trains_on_cpu():
    """build_hf (the HF + PEFT and Liger variants, and Unsloth's LoRA set the same way): A as init_lora
    draws it from the projection's name, B zero, and one step's loss near ln(vocab) for random weights."""
    pytest.importorskip("peft")
    model, step_loss, _ = bench.build_hf(Namespace(model="tiny", ckpt="none"), torch.device("cpu"))
    mods = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    name = "model.layers.1.mlp.down_proj"
    a, b = (
        torch.empty_like(mods[name].lora_A["default"].weight),
        torch.empty_like(mods[name].lora_B["default"].weight),
    )
    bench.init_lora(name, a, b)
    assert torch.equal(mods[name].lora_A["default"].weight, a) and not b.any()
    # RoPE's buffers are made again after to_empty (uninitialized memory gave NaN losses here), in fp32
    rope = model.base_model.model.model.rotary_emb
    with torch.device("cpu"):
        fresh = type(rope)(rope.config)
    assert rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq, fresh.inv_freq.float())
    ids = torch.randint(0, bench.SHAPES["tiny"]["vocab_size"], (2, 16))
    loss = step_loss(ids)
    loss.backward()
    assert abs(loss.item() - torch.log(torch.tensor(1000.0)).item()) < 0.5
    assert mods[name].lora_B["default"].weight.grad.abs().sum() > 0


def snuggle_args(**kw) -> Namespace:
    base = dict(
        model="tiny", batch=2, seq=16, quantize="none", no_lora=False, no_kernels=True, ckpt="none", tile=0,
        offload=False, offload_blocks=None, recompute_product=False, recompute_norm=False,
        recompute_gate_up=False,
    )  # fmt: skip
    return Namespace(**{**base, **kw})


def test_no_lora_bound_trains_one_norm_and_back_propagates_through_every_block():
    """--no-lora: no adapters, every weight frozen but block 0's input norm (fp32), whose gradient exists
    only if backward ran through every later block."""
    model, step_loss, _ = bench.build_snuggle(snuggle_args(no_lora=True), torch.device("cpu"))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, _ in trainable] == ["model.layers.0.input_layernorm.weight"]
    assert trainable[0][1].dtype == torch.float32
    assert not any("lora" in n for n, _ in model.named_parameters())
    step_loss(torch.randint(0, bench.SHAPES["tiny"]["vocab_size"], (2, 16))).backward()
    assert trainable[0][1].grad.abs().sum() > 0
    lora, _, _ = bench.build_snuggle(snuggle_args(), torch.device("cpu"))
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_fp8_quantize_builds_an_fp8_base_that_trains():
    """--quantize fp8 (the CPU runs FP8's reference GEMMs): every block projection in FP8, LoRA learns."""
    from snuggle.quant.fp8 import FP8Weight

    model, step_loss, _ = bench.build_snuggle(snuggle_args(quantize="fp8"), torch.device("cpu"))
    fp8 = [m for m in model.modules() if isinstance(m, FP8Weight)]
    assert len(fp8) == 7 * model.args.num_layers
    step_loss(torch.randint(0, bench.SHAPES["tiny"]["vocab_size"], (2, 16))).backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n
    )


def ev(key, shapes, ms, device="DeviceType.CPU"):
    return Namespace(key=key, input_shapes=shapes, device_type=device, self_device_time_total=ms * 1e3)


def test_step_breakdown_puts_each_launching_op_in_one_category():
    """--profile's breakdown: GEMMs by what they multiply, kernel rows never counted twice."""
    V = 128256
    events = [
        ev("aten::mm", [[4096, 4096], [4096, 6144]], 3.0),  # q/k/v base
        ev("aten::addmm_", [[4096, 4096], [4096, 4096], [4096, 4096], [], []], 2.0),  # base onto low-rank
        ev("aten::mm", [[4096, 4096], [4096, 48]], 0.5),  # x A^T
        ev("aten::addmm_", [[4096, 4096], [4096, 16], [16, 4096], [], []], 0.25),  # xa B^T
        ev("aten::mm", [[4096, 4096], [4096, 16]], 0.125),  # dB = g^T xa
        ev("aten::mm", [[48, 4096], [4096, 4096]], 0.125),  # dA = gB^T x
        ev("aten::mm", [[1024, 4096], [4096, V]], 4.0),  # a loss chunk
        ev("aten::_cudnn_attention_forward", [[2, 32, 2048, 128]], 1.0),
        ev("LoRAGroupFunctionBackward", [], 0.75),
        ev("aten::_fused_adamw_", [], 0.1),
        ev("aten::copy_", [[16, 4096], [16, 4096], []], 0.05),
        ev("aten::mm", [[4096, 4096], [4096, 6144]], 0.0),  # no kernel time: skipped
        ev("nvjet_sm90_tst_256x128", [], 3.0, device="DeviceType.CUDA"),  # the kernel row of the first mm
    ]
    parts = bench.step_breakdown(events, V)
    assert parts == {
        "GEMM frozen base": 5.0,
        "GEMM lm_head (loss)": 4.0,
        "attention": 1.0,
        "GEMM LoRA K long (x A^T, g B, dA, dB)": 0.75,
        "GEMM LoRA K = r (xa B^T, gB A)": 0.25,
        "Triton kernels in Functions": 0.75,
        "optimizer": 0.1,
        "other ATen (casts, copies, adds)": 0.05,
    }
    assert list(parts)[0] == "GEMM frozen base"  # largest first


def test_kernel_gaps_sums_idle_time_between_kernels_by_gap_length():
    """--profile's idle time: overlapping kernels (two streams) are busy once, gaps go to their bucket."""
    kernels = [
        ("b", 12.0, 20.0),  # unsorted on purpose
        ("a", 0.0, 10.0),
        ("c", 15.0, 25.0),  # overlaps b: busy until 25
        ("d", 150.0, 160.0),  # 125 us after c
        ("e", 170.0, 171.0),  # 10 us after d
    ]
    g = bench.kernel_gaps(kernels)
    assert g["kernels"] == 5 and g["span_ms"] == 0.171
    assert g["busy_ms"] == 0.034  # a 10, b 8, c the 5 past b, d 10, e 1
    assert g["idle_ms"] == {"<5us": 0.002, "5-20us": 0.01, "20-100us": 0.0, ">=100us": 0.125}
    assert g["longest_gaps_us"][0] == (125.0, "c", "d")
    assert bench.kernel_gaps([])["kernels"] == 0
