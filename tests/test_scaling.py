"""benchmarks/scaling.py: its bytes per optimizer step against what two gloo processes really send.

One torchrun launch of 2 CPU processes trains a tiny model (odd vocabulary and widths, so FSDP pads)
through `apply_parallel` and `grad_sync` as the trainer does (2 micro-batches a step, 2 steps), under
DDP and FSDP2, with and without trained embeddings, 16-bit or 4-bit base, fp32 or bf16 reduction.
Every tensor that goes through torch.distributed's collectives is counted (numel x element size of
the all-reduce buffer, the all-gather output, the reduce-scatter input); the model's prediction must
equal the count exactly. The same launch trains 6 steps with fp32 and with bf16 gradient reduction
from the same start and data: the curve change of `train.reduce_dtype: bfloat16`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import scaling  # noqa: E402

from snuggle.model.args import ModelArgs  # noqa: E402

pytestmark = pytest.mark.distributed

TINY = dict(
    model_type="llama",
    vocab_size=101,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    tie_word_embeddings=False,
)
STEPS, ACCUM, CURVE_STEPS = 2, 2, 6
# (strategy, train_embeddings, quantize, reduce dtype, tied)
CASES = [
    ("ddp", False, "none", "float32", False),
    ("ddp", True, "none", "float32", False),
    ("ddp", True, "none", "bfloat16", False),
    ("ddp", True, "nf4", "float32", True),
    ("fsdp", False, "none", "float32", False),
    ("fsdp", True, "none", "float32", False),
    ("fsdp", True, "none", "bfloat16", True),
    ("fsdp", True, "nf4", "float32", False),
]

_WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist

sys.path.insert(0, os.environ["BENCH"])
import scaling
from snuggle.config import LoraConfig
from snuggle.lora import apply_lora
from snuggle.model.args import ModelArgs
from snuggle.model.decoder import Decoder
from snuggle.quant.nf4 import quantize_model
from snuggle.train.data_parallel import apply_parallel, grad_sync
from snuggle.train.parallel import DistContext

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
spec = json.loads(os.environ["SPEC"])

# payload bytes by collective, counted while `on`; anything else a step sends is counted as "other"
counted, on = {}, [False]
def wrap(name, payload):
    real = getattr(dist, name)
    def counting(*a, **kw):
        if on[0]:
            key = {"all_reduce": "all_reduce", "all_gather_single": "all_gather",
                   "reduce_scatter_single": "reduce_scatter"}.get(name, "other")
            t = payload(*a, **kw)
            counted[key] = counted.get(key, 0) + t.numel() * t.element_size()
        return real(*a, **kw)
    setattr(dist, name, counting)
def arg(i, name):  # the i-th positional argument, or the keyword `name`
    return lambda *a, **kw: a[i] if len(a) > i else kw[name]
wrap("all_reduce", arg(0, "tensor"))
wrap("all_gather_single", arg(0, "output_tensor"))
wrap("reduce_scatter_single", arg(1, "input"))
wrap("all_gather_into_tensor", arg(0, "output_tensor"))
wrap("reduce_scatter_tensor", arg(1, "input"))
for name in ("broadcast", "reduce"):
    wrap(name, arg(0, "tensor"))
# DDP's buffer broadcast before a step's first forward (C++ beneath, called through this module attribute)
real_coalesced = dist._broadcast_coalesced
def coalesced(group, tensors, *a, **kw):
    if on[0]:
        sent = sum(t.numel() * t.element_size() for t in tensors)
        counted["broadcast"] = counted.get("broadcast", 0) + sent
    return real_coalesced(group, tensors, *a, **kw)
dist._broadcast_coalesced = coalesced

def build(strategy, emb, quantize, tied):
    torch.manual_seed(0)
    args = ModelArgs.from_hf({**spec["tiny"], "tie_word_embeddings": tied})
    model = Decoder(args)
    if tied:
        model.tie_weights()
    if quantize == "nf4":
        quantize_model(model)
    apply_lora(model, LoraConfig(r=4, alpha=8, train_embeddings=emb))
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.1)  # gradients of A too, not only B
    return model

def train(model, strategy, reduce_dtype, steps):
    inventory = [[[p.name, p.unit], list(p.shape), [p.itemsize, p.floating, p.trainable, p.buffer]]
                 for p in scaling.inventory_of(model)]
    ctx = DistContext(world_size=world, rank=rank)
    engine = apply_parallel(model, strategy, ctx, torch.device("cpu"), getattr(torch, reduce_dtype))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    counted.clear()
    for step in range(steps):
        batches = [torch.randint(0, 101, (world, 9), generator=gen) for _ in range(spec["accum"])]
        total = torch.zeros(())
        for i, rows in enumerate(batches):
            ids = rows[rank : rank + 1]
            on[0] = True
            with grad_sync(engine, sync=i == len(batches) - 1):
                loss = engine(ids[:, :-1], labels=ids[:, 1:]) / (world * spec["accum"] * 8)
                loss.backward()
            on[0] = False
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(total)
        losses.append(float(total))
    return {"counted": dict(counted), "inventory": inventory, "losses": losses}

out = {}
for strategy, emb, quantize, reduce_dtype, tied in spec["cases"]:
    key = f"{strategy}-{emb}-{quantize}-{reduce_dtype}-{tied}"
    out[key] = train(build(strategy, emb, quantize, tied), strategy, reduce_dtype, spec["steps"])
for reduce_dtype in ("float32", "bfloat16"):
    model = build("ddp", True, "none", False)
    out[f"curve-{reduce_dtype}"] = train(model, "ddp", reduce_dtype, spec["curve_steps"])
if rank == 0:
    with open(os.environ["OUT"], "w") as f:
        json.dump(out, f)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def counted(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("scaling")
    script, out = tmp / "worker.py", tmp / "counted.json"
    script.write_text(_WORKER)
    spec = dict(tiny=TINY, cases=CASES, steps=STEPS, accum=ACCUM, curve_steps=CURVE_STEPS)
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "SPEC": json.dumps(spec), "OUT": str(out), "BENCH": str(BENCH),
    }  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    p = subprocess.run([*cmd, str(script)], capture_output=True, text=True, env=env, timeout=180)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(out.read_text())


def _key(case) -> str:
    strategy, emb, quantize, reduce_dtype, tied = case
    return f"{strategy}-{emb}-{quantize}-{reduce_dtype}-{tied}"


@pytest.mark.parametrize("case", CASES, ids=_key)
def test_predicted_bytes_equal_what_the_process_group_sends(counted, case):
    strategy, emb, quantize, reduce_dtype, tied = case
    run = counted[_key(case)]
    args = ModelArgs.from_hf({**TINY, "tie_word_embeddings": tied})
    # the model's shapes from the config alone are the built model's parameters, one for one
    predicted = scaling.inventory(args, 4, "all-linear", emb, quantize, weight_bytes=4)
    built = [scaling.Param(n, u, tuple(s), *rest) for (n, u), s, rest in run["inventory"]]
    assert sorted(predicted, key=lambda p: p.name) == sorted(built, key=lambda p: p.name)
    reduce_bytes = 2 if reduce_dtype == "bfloat16" else 4
    tr = scaling.traffic(predicted, strategy, 2, ACCUM, reduce_bytes=reduce_bytes, param_bytes=4)
    want = {k: STEPS * v for k, v in tr.as_dict().items() if v}
    assert run["counted"] == want  # nothing else went through the process group during the steps


def test_bf16_reduction_halves_the_ddp_bytes_exactly(counted):
    fp32 = counted[_key(("ddp", True, "none", "float32", False))]["counted"]["all_reduce"]
    bf16 = counted[_key(("ddp", True, "none", "bfloat16", False))]["counted"]["all_reduce"]
    assert 2 * bf16 == fp32


def test_bf16_reduction_moves_the_curve_by_bf16_rounding_only(counted):
    """Measured here: 6 steps of the tiny model at lr 1e-3, fp32 vs bf16 gradient all-reduce: the
    losses differ (the reduction did round) by under 1e-3 of the loss (bf16 keeps ~3 digits)."""
    fp32, bf16 = counted["curve-float32"]["losses"], counted["curve-bfloat16"]["losses"]
    assert fp32[0] == bf16[0]  # the first loss comes before any reduction
    diffs = [abs(a - b) / a for a, b in zip(fp32, bf16, strict=True)]
    print(f"bf16 vs fp32 reduction, relative loss difference by step: {[f'{d:.1e}' for d in diffs]}")
    assert 0 < max(diffs) < 1e-3


def test_the_named_configs_trainable_counts_and_bytes():
    cpt = scaling.CONFIGS["cpt"].params()
    lora = sum(p.numel for p in cpt if p.trainable and "lora_" in p.name)
    emb = sum(p.numel for p in cpt if p.trainable and "lora_" not in p.name)
    # r=128 on q,k,v,o (4096<->4096/1024) and gate,up,down (4096<->14336), 32 layers; 2 x 32768 x 4096
    assert lora == 32 * 128 * (2 * 8192 + 2 * 5120 + 3 * 18432) and emb == 2 * 32768 * 4096
    ddp = scaling.traffic(cpt, "ddp", 8, 8)
    assert ddp.all_reduce == 4 * (lora + emb) and ddp.tail == 4 * 32768 * 4096
    half = scaling.traffic(cpt, "ddp", 8, 8, reduce_bytes=2)
    assert half.all_reduce == 2 * (lora + emb) and half.tail == 2 * 32768 * 4096
    # FSDP sends per micro-batch: 8 micro-batches send 8 times one
    fsdp1, fsdp8 = scaling.traffic(cpt, "fsdp", 8, 1), scaling.traffic(cpt, "fsdp", 8, 8)
    assert fsdp8.all_gather == 8 * fsdp1.all_gather and fsdp8.reduce_scatter == 8 * fsdp1.reduce_scatter


def test_time_model_one_gpu_is_the_profile_and_a_faster_link_never_hurts():
    cfg = scaling.CONFIGS["8b-lora"]
    prof = scaling.Profile(200.0, 100.0, 1.0, "test")
    params = cfg.params()
    for strategy in ("ddp", "fsdp"):
        tr1 = scaling.traffic(params, strategy, 1, 1)
        assert scaling.predict(prof, tr1, strategy, 1, 1, scaling.LINKS["NVLink 4"])["step_ms"] == 201.0
        tr = scaling.traffic(params, strategy, 8, 1)
        steps = [
            scaling.predict(prof, tr, strategy, 8, 1, link)["step_ms"] for link in scaling.LINKS.values()
        ]
        assert steps == sorted(steps, reverse=True)


def test_a_measured_profile_replaces_the_estimate(tmp_path, capsys):
    """scaling_profile.py (a GPU's timing of the config's micro-batch) on CPU with the tiny shape: its JSON
    is what scaling.py --profile takes, and the table then says measured, not estimated."""
    out = tmp_path / "profile.json"
    cmd = [
        sys.executable, str(BENCH / "scaling_profile.py"), "--config", "cpt", "--shape", "tiny",
        "--seq", "32", "--device", "cpu", "--warmup", "1", "--steps", "1", "--out", str(out),
    ]  # fmt: skip
    p = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180
    )
    assert p.returncode == 0, p.stderr[-4000:]
    prof = json.loads(out.read_text())
    assert 0 < prof["backward_ms"] < prof["micro_batch_ms"] and prof["optimizer_ms"] > 0
    assert prof["source"].startswith("measured on one cpu, shape tiny, seq 32")
    scaling.main(["--config", "cpt", "--profile", str(out)])
    text = capsys.readouterr().out
    assert "measured on one cpu" in text and "estimated" not in text
