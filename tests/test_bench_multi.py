"""benchmarks/multi_gpu.py: its arithmetic, and one real run of the multi-process mode on CPU (gloo).

The run is the trainer's own code path (`train()` under torchrun, DDP at 2 processes) on the `tiny`
Llama shape in fp32: the table must carry tokens/s per process and the scaling efficiency, and the loss
curves of 1 and 2 processes with the same global batch must agree within 1e-5. Also one CPU run of
benchmarks/trainer_world1.py: plain vs torchrun world size 1 (auto, ddp, fsdp), the same curve.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import multi_gpu  # noqa: E402

pytestmark = pytest.mark.distributed


def test_world_sizes_beyond_the_visible_gpus_are_skipped_with_a_reason():
    run, skipped = multi_gpu.plan_world_sizes([1, 2, 4, 8], "cuda", 2)
    assert run == [1, 2]
    assert skipped == {
        4: "skipped: needs 4 GPUs, 2 visible on this machine",
        8: "skipped: needs 8 GPUs, 2 visible on this machine",
    }
    assert multi_gpu.plan_world_sizes([1, 4], "cpu", 2) == ([1, 4], {})  # gloo: processes, not GPUs


def test_peak_table_and_flops():
    assert multi_gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert multi_gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert multi_gpu.peak_tflops("NVIDIA H200") == 989.0
    assert multi_gpu.peak_tflops("cpu") is None
    assert multi_gpu.peak_tflops("NVIDIA H100 80GB HBM3", override=500.0) == 500.0
    n = multi_gpu.matmul_params("8b")
    assert 7.4e9 < n < 7.6e9  # 8B minus the embedding lookup table
    full, lora = multi_gpu.flops_per_token("8b", 8192, True), multi_gpu.flops_per_token("8b", 8192, False)
    assert full - lora == 2 * n


def test_efficiency_and_curve_difference_against_the_smallest_world_that_ran():
    def ranks(step_s: list[list[float]], losses: list[float]) -> list[dict]:
        return [{"step_s": s, "losses": losses, "peak_gib": 1.0 + i} for i, s in enumerate(step_s)]

    one = multi_gpu.summarize(ranks([[9.0, 1.0, 1.0]], [3.0, 2.0, 1.0]), warmup=1, tokens_per_step=100)
    # two ranks, the slower one sets the pace: 200 tokens a step over 2 + 2.5 s
    two = multi_gpu.summarize(ranks([[9.0, 1.0, 1.0], [9.0, 1.25, 1.25]], [3.0, 2.0, 1.5]), 1, 200)
    assert one["tokens_per_s"] == 100.0 and two["tokens_per_s"] == 160.0
    assert two["tokens_per_s_per_gpu"] == 80.0 and two["peak_gib"] == 2.0
    rows = [
        {"gpus": 1, "global_batch": 2, **one},
        {"gpus": 2, "global_batch": 2, **two},
        {"gpus": 4, "global_batch": 2, "error": "out of memory"},
    ]
    multi_gpu.add_comparisons(rows)
    assert rows[1]["scaling_efficiency"] == pytest.approx(0.8)
    assert rows[1]["curve_max_abs_diff"] == pytest.approx(0.5)
    assert "scaling_efficiency" not in rows[2]
    # when one GPU did not run (8B full fine-tuning does not fit), the smallest world that ran is the base
    rows = [{"gpus": 2, "global_batch": 2, **two}, {"gpus": 4, "global_batch": 4, **two}]
    multi_gpu.add_comparisons(rows)
    assert rows[1]["baseline_gpus"] == 2 and rows[1]["scaling_efficiency"] == 1.0
    assert "curve_max_abs_diff" not in rows[1]  # another global batch: the curves do not compare


def test_cpu_gloo_run_with_1_and_2_processes(tmp_path):
    out = tmp_path / "bench"
    cmd = [
        sys.executable, str(BENCH / "multi_gpu.py"), "--case", "curves", "--device", "cpu",
        "--model-shape", "tiny", "--gpus", "1,2", "--warmup", "1", "--steps", "3", "--batch", "1",
        "--seq", "64", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SNUGGLE_COMMIT": "testcommit"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert p.returncode == 0, p.stderr[-4000:]
    (js,) = out.glob("multi_gpu-curves-tiny-cpu-testcommit.json")
    res = json.loads(js.read_text())
    assert res["env"]["commit"] == "testcommit" and res["env"]["gpu"] == "cpu"
    assert res["env"]["torch"]
    rows = res["rows"]
    assert [(r["gpus"], r["parallel"], r["global_batch"]) for r in rows] == [(1, "none", 2), (2, "ddp", 2)]
    for r in rows:
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s_per_gpu"])
        assert len(r["losses"]) == 4 and len(r["peak_gib_per_rank"]) == r["gpus"]
        assert r["mfu"] is None  # no peak for a CPU
    assert rows[0]["scaling_efficiency"] == 1.0 and 0 < rows[1]["scaling_efficiency"] < 10
    assert rows[1]["curve_max_abs_diff"] < 1e-5  # fp32: the same curve on 1 and 2 processes
    table = (out / "multi_gpu-curves-tiny-cpu-testcommit.md").read_text().splitlines()
    header = next(ln for ln in table if ln.startswith("| GPUs |"))
    assert "tokens/s per GPU" in header and "scaling eff. vs 1" in header and "loss diff" in header
    body = [ln for ln in table if ln.startswith("| 1 |") or ln.startswith("| 2 |")]
    assert len(body) == 2 and all(ln.count("|") == header.count("|") for ln in body)
    assert "100.0%" in body[0] and "n/a" in body[0]  # efficiency 1; MFU n/a on CPU
    assert p.stdout.count("| GPUs |") == 1  # the table is printed too


def test_trainer_world1_cpu_runs_plain_and_torchrun_ws1_with_one_curve(tmp_path):
    cmd = [
        sys.executable, str(BENCH / "trainer_world1.py"), str(tmp_path), "--device", "cpu",
        "--shape", "tiny", "--steps", "2", "--warmup", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SNUGGLE_COMMIT": "testcommit", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((tmp_path / "trainer_world1.json").read_text())
    assert res["env"]["commit"] == "testcommit"
    rows = res["results"]
    assert list(rows) == ["plain", "torchrun ws1 auto", "torchrun ws1 ddp", "torchrun ws1 fsdp"]
    plain = rows["plain"]
    for name, r in rows.items():
        assert r["tokens_per_s"] > 0 and r["peak_gib"] > 0
        # every launch is the plain trainer: the same losses, bit for bit on one CPU
        assert (r["loss_first"], r["loss_last"]) == (plain["loss_first"], plain["loss_last"]), name
        # a forced wrapper says once that it applies none; plain and auto have nothing to say
        assert r["one_process_note"] == name.endswith(("ddp", "fsdp")), name
    table = (tmp_path / "trainer_world1.md").read_text()
    assert "| run | tokens/s | vs plain |" in table and "| torchrun ws1 fsdp |" in table
    assert p.stdout.count("| run |") == 1
