"""Two processes on CPU (gloo): the single-process curve, resume across world sizes, and failing ranks.

Every distributed run is a real launch (`torchrun -m snuggle train`, or `snuggle train --nproc 2`) of a
2-layer fp32 model on rows of 16 tokens. A launch costs seconds, nearly all of it imports, so the runs
are made once per module and shared by the tests that compare them. The reference is the same config
in one process with the same global batch (batch_size 4 there, 2 x 2 or 2 x 1 x grad_accum 2 here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_hf_model
from snuggle.config import load_config
from snuggle.rebuild import load_run
from snuggle.train.checkpoint import latest_checkpoint
from snuggle.train.loop import train

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("single_thread")]

TIMING_KEYS = ("tokens_per_s", "step_time_s", "mem_gib")
LAUNCH_TIMEOUT_S = 180  # a hung launch fails its test instead of the whole suite
_NOUNS = "cat dog bird fish".split()
_ADJS = "red green blue small big old".split()
_VERBS = "sees eats reads writes".split()

# Runs rank 1 of a torchrun job into a failure at one step: FAULT=exit dies, FAULT=hang sleeps.
_FAULT_SCRIPT = """
import os, sys, time
import snuggle.train.loop as loop
from snuggle.cli import main

real = loop.BatchPlan.micro_batches

def faulty(self, step):
    if self.rank == 1 and step == int(os.environ["FAULT_STEP"]):
        if os.environ["FAULT"] == "exit":
            os._exit(3)
        time.sleep(600)
    return real(self, step)

loop.BatchPlan.micro_batches = faulty
sys.exit(main(sys.argv[1:]))
"""

# sitecustomize.py for the workers of a job that torchrun restarts: SIGKILLs one rank once in each of
# the first KILL_ATTEMPTS attempts. The rank and the instant come from (KILL_SEED, attempt): the nth
# step this attempt runs (mid-step), or the entry to a phase of its first checkpoint write
# (mid-checkpoint: after the temp directory, after the DCP shards, before `latest` moves). Only
# instants every attempt reaches are drawn, so each armed attempt dies exactly once. Python imports
# sitecustomize in every process it starts, so this reaches workers that `snuggle train --nproc`
# starts as `python -m snuggle` too.
_KILL_SITECUSTOMIZE = """
import os

if "KILL_SEED" in os.environ and "RANK" in os.environ:
    import random, signal, sys
    import snuggle.train.checkpoint as ckpt
    import snuggle.train.loop as loop

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rng = random.Random(f"{os.environ['KILL_SEED']}/{attempt}")
    victim = rng.randrange(int(os.environ["WORLD_SIZE"]))
    # rank 0 alone writes state/meta and publishes; every rank writes shards
    where = rng.choice(["step", "_write_shards"] + (["_write_state", "_publish"] if victim == 0 else []))
    nth = rng.randint(1, 2) if where == "step" else 1
    armed = attempt < int(os.environ["KILL_ATTEMPTS"]) and int(os.environ["RANK"]) == victim
    calls = [0]

    def hooked(fn):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if armed and calls[0] == nth:
                print(f"KILL rank={victim} attempt={attempt} at {where} #{nth}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapper

    if where == "step":
        loop.BatchPlan.micro_batches = hooked(loop.BatchPlan.micro_batches)
    else:
        setattr(ckpt, where, hooked(getattr(ckpt, where)))
"""

# sitecustomize.py for the workers of a node that dies for good: at step KILL_STEP of the run, the
# worker of the node started with KILL_NODE=1 SIGKILLs its agent (torchrun of that node, its parent)
# and then itself.
_NODE_KILL_SITECUSTOMIZE = """
import os

if os.environ.get("KILL_NODE") == "1" and "RANK" in os.environ:
    import signal, sys
    import snuggle.train.loop as loop

    real = loop.BatchPlan.micro_batches

    def dying(self, step):
        if step + 1 == int(os.environ["KILL_STEP"]):
            print(f"KILL node of rank {self.rank} at step {step + 1}", file=sys.stderr, flush=True)
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, step)

    loop.BatchPlan.micro_batches = dying
"""


def docs(n: int) -> list[str]:
    import random

    rng = random.Random(0)
    return [
        " ".join(
            f"the {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}."
            for _ in range(rng.randint(1, 3))
        )
        for _ in range(n)
    ]


def overrides(model_dir: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    # lr 1e-3: Adam turns fp32 summation-order noise on near-zero gradients into ~1e-4 lr of parameter
    # difference (see test_train); 19 held-out rows, 5 evaluated: an uneven split over 2 ranks
    return [
        f"model.path={model_dir}",
        f"data.train={corpus}",
        f"data.cache_dir={out.parent / 'token-cache'}",
        "data.seq_len=16",
        "data.val_fraction=0.2",
        "lora.r=4",
        "lora.train_embeddings=true",
        "train.steps=4",
        "train.lr=0.001",
        "train.embedding_lr=0.002",
        "train.warmup_steps=1",
        "train.weight_decay=0.1",
        "train.eval_every=2",
        "train.eval_rows=5",
        "train.save_every=2",
        "train.keep_checkpoints=3",
        "train.progress=false",
        "train.dist_timeout_s=30",
        f"train.output_dir={out}",
        *extra,
    ]


def run_local(model_dir: Path, corpus: Path, out: Path, *extra: str) -> dict:
    return train(load_config(None, overrides(model_dir, corpus, out, "train.batch_size=4", *extra)))


def env() -> dict[str, str]:
    # one intra-op thread per process: two processes on a shared 2-core machine
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(
    *args: str, script: Path | None = None, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m snuggle train ...`; standalone picks a free port."""
    entry = [str(script)] if script is not None else ["-m", "snuggle"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *entry]
    return subprocess.run(
        [*cmd, "train", *args],
        capture_output=True,
        text=True,
        env={**env(), **(extra_env or {})},
        timeout=LAUNCH_TIMEOUT_S,
    )


def snuggle_nproc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snuggle", "train", *args],
        capture_output=True,
        text=True,
        env=env(),
        timeout=LAUNCH_TIMEOUT_S,
    )


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trainables(out: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(out)
    assert ckpt is not None, f"no complete checkpoint in {out}"
    return load_file(str(ckpt / "trainable.safetensors"))


def rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` as if it had been stopped right after its checkpoint at `step`."""
    shutil.copytree(src, dst)
    for ckpt in dst.glob("checkpoint-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    (dst / "latest").write_text(f"checkpoint-{step:07d}")
    return dst


def assert_same_curve(out: Path, ref: Path, atol: float = 1e-5, ignore: tuple[str, ...] = ()) -> None:
    got = [{k: v for k, v in r.items() if k not in ignore} for r in metrics(out)]
    want = metrics(ref)
    assert [(r["step"], "loss" in r) for r in got] == [(r["step"], "loss" in r) for r in want]
    for r, w in zip(got, want, strict=True):
        assert set(r) == set(w), (r, w)
        for k, v in w.items():
            if k in TIMING_KEYS:
                continue
            if k in ("step", "tokens", "eval_tokens"):
                assert r[k] == v, (k, r, w)
            else:
                assert r[k] == pytest.approx(v, rel=1e-5, abs=atol), (k, r, w)


def assert_same_trainables(out: Path, ref: Path, atol: float = 1e-5) -> None:
    got, want = trainables(out), trainables(ref)
    assert set(got) == set(want)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs(60)))
    tied = root / "tied"
    untied = root / "untied"
    build_tiny_hf_model("qwen2", True, tied)
    build_tiny_hf_model("llama", False, untied)
    config = root / "config.yaml"
    config.write_text("{}\n")  # every setting of these runs is a dotted override
    return {"root": root, "corpus": corpus, "tied": tied, "untied": untied, "config": str(config)}


@pytest.fixture(scope="module")
def lora_ref(setup) -> Path:
    """LoRA + trainable tied embeddings, one process, batch 4."""
    out = setup["root"] / "lora-ref"
    run_local(setup["tied"], setup["corpus"], out)
    return out


@pytest.fixture(scope="module")
def ddp_run(setup) -> tuple[Path, subprocess.CompletedProcess]:
    """The same run on 2 processes, 1 row x 2 micro-batches each (no_sync on the first), auto -> ddp."""
    out = setup["root"] / "ddp"
    args = overrides(setup["tied"], setup["corpus"], out, "train.batch_size=1", "train.grad_accum=2")
    return out, ok(torchrun(setup["config"], *args))


@pytest.fixture(scope="module")
def fsdp_run(setup) -> tuple[Path, subprocess.CompletedProcess]:
    """The same run under FSDP2, launched with the `--nproc 2` shortcut."""
    out = setup["root"] / "fsdp"
    args = overrides(setup["tied"], setup["corpus"], out, "train.batch_size=2", "train.parallel=fsdp")
    return out, ok(snuggle_nproc(setup["config"], "--nproc", "2", *args))


# --- the curve of one process -----------------------------------------------------------------------


def test_ddp_matches_single_process(lora_ref, ddp_run):
    out, p = ddp_run
    assert_same_curve(out, lora_ref)
    assert_same_trainables(out, lora_ref)
    # rank 0 alone reports: one summary line on stdout, one choice of strategy, one metrics row a step
    summary = json.loads(p.stdout.strip())
    assert (summary["world_size"], summary["parallel"]) == (2, "ddp")
    assert p.stderr.count("train.parallel=ddp (auto)") == 1
    assert p.stderr.count("step 4: eval loss") == 1
    meta = json.loads((latest_checkpoint(out) / "meta.json").read_text())
    assert (meta["world_size"], meta["parallel"], meta["global_batch"]) == (2, "ddp", 4)


def test_fsdp_matches_single_process_with_tied_trained_embeddings(lora_ref, fsdp_run):
    """The tied lm_head/embedding lives in the root unit and the loss reads it inside the root forward.

    A wrong lm_head gradient (sharded, averaged instead of summed, or missing the embedding's share of
    the tied tensor) shows in grad_norm at step 1 and in the trained embedding.
    """
    out, p = fsdp_run
    assert_same_curve(out, lora_ref)
    assert_same_trainables(out, lora_ref)
    emb = trainables(out)["model.embed_tokens.weight"]
    base = load_file(str(Path(load_config(out / "config.yaml").model.path) / "model.safetensors"))
    assert (emb - base["model.embed_tokens.weight"]).abs().max() > 1e-3  # it did train
    assert "lm_head.weight" not in trainables(out)  # tied: one tensor, saved once
    assert p.stderr.count("train.parallel=fsdp\n") == 1
    # export and load_run read a checkpoint written by 2 processes with no process group
    model, _, _ = load_run(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), emb, rtol=0, atol=0)


def test_fsdp_full_finetune_with_checkpointing_matches_single_process(setup):
    ref = setup["root"] / "full-ref"
    run_local(setup["untied"], setup["corpus"], ref, "lora=null")
    out = setup["root"] / "full-fsdp"
    args = overrides(
        setup["untied"], setup["corpus"], out, "lora=null", "train.batch_size=2",
        "train.gradient_checkpointing=true", "train.checkpoint_layers=1",
    )  # fmt: skip
    p = ok(torchrun(setup["config"], *args))
    assert "train.parallel=fsdp (auto)" in p.stderr  # full fine-tuning picks FSDP
    assert_same_curve(out, ref)
    assert_same_trainables(out, ref)
    every = {"lm_head.weight", "model.norm.weight", "model.layers.1.mlp.up_proj.weight"}
    assert every <= set(trainables(out))


def test_fsdp_full_finetune_with_adamw8bit_matches_one_process_and_resumes_on_any_world_size(setup):
    """8-bit AdamW codes each row's blocks alone, so FSDP2's row shards hold exactly the state one process
    holds; its state is DTensors laid out as the parameters, so DCP re-cuts it for another world size."""
    eight = ("lora=null", "train.optimizer=adamw8bit")
    ref = setup["root"] / "full-8bit-ref"
    run_local(setup["untied"], setup["corpus"], ref, *eight)
    out = setup["root"] / "full-8bit-fsdp"
    p = ok(
        torchrun(
            setup["config"], *overrides(setup["untied"], setup["corpus"], out, *eight, "train.batch_size=2")
        )
    )
    assert "train.parallel=fsdp (auto)" in p.stderr
    assert_same_curve(out, ref)
    assert_same_trainables(out, ref)
    # 2 -> 1: the sharded state read whole by one process
    back = rewind(out, setup["root"] / "full-8bit-2-1", step=2)
    run_local(setup["untied"], setup["corpus"], back, *eight, "train.resume=true")
    assert_same_curve(back, ref)
    assert_same_trainables(back, ref)
    # 1 -> 2: one process's state cut into row shards
    fwd = rewind(ref, setup["root"] / "full-8bit-1-2", step=2)
    args = overrides(setup["untied"], setup["corpus"], fwd, *eight, "train.batch_size=2", "train.resume=true")
    assert "resumed from checkpoint-0000002" in ok(torchrun(setup["config"], *args)).stderr
    assert_same_curve(fwd, ref)
    assert_same_trainables(fwd, ref)


def test_ddp_with_offloaded_checkpointing_matches_single_process(setup, lora_ref):
    """Offloaded blocks backpropagate through a nested (reentrant) backward inside DDP's backward."""
    out = setup["root"] / "ddp-offload"
    args = overrides(
        setup["tied"], setup["corpus"], out, "train.batch_size=2", "train.parallel=ddp",
        "train.gradient_checkpointing=true", "train.offload_activations=true",
    )  # fmt: skip
    ok(torchrun(setup["config"], *args))
    assert_same_curve(out, lora_ref)
    assert_same_trainables(out, lora_ref)


# Prints each rank's bytes of quantized weights as FSDP leaves them, then trains as the CLI would.
_QUANT_BYTES_SCRIPT = """
import sys
import snuggle.train.loop as loop
from snuggle.cli import main
from snuggle.quant.base import QuantizedWeight

real = loop.apply_parallel

def counting(model, strategy, ctx, device, *rest):
    engine = real(model, strategy, ctx, device, *rest)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    mine = sum(local(p).numel() * local(p).element_size()
               for m in model.modules() if isinstance(m, QuantizedWeight) for p in m.parameters())
    print(f"QUANT_BYTES rank={ctx.rank} bytes={mine}", file=sys.stderr, flush=True)
    return engine

loop.apply_parallel = counting
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("quantize", ["nf4", "fp8"])
def test_quantized_base_under_fsdp_is_sharded_and_matches_single_process(setup, tmp_path, quantize):
    """4-bit (NF4) and 8-bit (FP8) base weights are sharded like any parameter (each rank holds half)
    and the curve is the single-process curve: FSDP's bf16 cast must not touch the fp32 quantization
    scales, and FP8's per-token activation scales make a rank's half batch quantize as in one process."""
    ref = setup["root"] / f"{quantize}-ref"
    run_local(setup["untied"], setup["corpus"], ref, f"model.quantize={quantize}")
    out = setup["root"] / f"{quantize}-fsdp"
    script = tmp_path / "quant_bytes.py"
    script.write_text(_QUANT_BYTES_SCRIPT)
    args = overrides(
        setup["untied"], setup["corpus"], out, f"model.quantize={quantize}", "train.batch_size=2"
    )
    p = ok(torchrun(setup["config"], *args, "train.parallel=fsdp", script=script))
    assert_same_curve(out, ref)
    assert_same_trainables(out, ref)
    # two ranks write stderr at once: lines may interleave, so match the records, not the lines
    per_rank = sorted(int(b) for b in re.findall(r"QUANT_BYTES rank=\d+ bytes=(\d+)", p.stderr))
    from snuggle.load import load
    from snuggle.quant.base import QuantizedWeight

    model = load(setup["untied"], quantize=quantize, device="cpu", with_tokenizer=False)[0]
    whole = sum(
        t.numel() * t.element_size()
        for m in model.modules()
        if isinstance(m, QuantizedWeight)
        for t in m.parameters()
    )
    assert len(per_rank) == 2 and sum(per_rank) == whole
    assert max(per_rank) <= 0.6 * whole  # the saving survives sharding: no rank holds the whole base


def test_world_size_1_with_a_forced_wrapper_is_the_plain_run(setup, lora_ref, capsys):
    """One process has nothing to communicate or shard: a forced ddp/fsdp applies no wrapper, says so
    once, and trains (and checkpoints) exactly as the plain run."""
    out = setup["root"] / "ws1-fsdp"
    run_local(setup["tied"], setup["corpus"], out, "train.parallel=fsdp")
    err = capsys.readouterr().err
    assert err.count("one process: train.parallel=fsdp applies no wrapper") == 1
    assert_same_curve(out, lora_ref, atol=0)
    assert_same_trainables(out, lora_ref, atol=0)
    meta = json.loads((latest_checkpoint(out) / "meta.json").read_text())
    assert (meta["world_size"], meta["parallel"]) == (1, "none")


# --- resume on another world size -------------------------------------------------------------------


def test_resume_2_to_1_continues_the_curve(setup, lora_ref, ddp_run):
    out = rewind(ddp_run[0], setup["root"] / "resume-2-1", step=2)
    run_local(setup["tied"], setup["corpus"], out, "train.resume=true")
    assert_same_curve(out, lora_ref)
    assert_same_trainables(out, lora_ref)


def test_resume_1_to_2_continues_the_curve(setup, lora_ref):
    out = rewind(lora_ref, setup["root"] / "resume-1-2", step=2)
    args = overrides(
        setup["tied"], setup["corpus"], out, "train.batch_size=2", "train.parallel=fsdp", "train.resume=true"
    )
    p = ok(torchrun(setup["config"], *args))
    assert "resumed from checkpoint-0000002" in p.stderr
    assert_same_curve(out, lora_ref)
    assert_same_trainables(out, lora_ref)


def test_a_refused_resume_is_its_reason_on_every_world_size(setup, lora_ref):
    """Every rank refuses together; a peer a heartbeat behind at that instant used to be blamed as hung
    ("rank 1 ... stopped responding"), sometimes in place of the reason."""
    out = rewind(lora_ref, setup["root"] / "resume-refused", step=2)
    args = overrides(setup["tied"], setup["corpus"], out, "train.batch_size=1", "train.resume=true")
    p = snuggle_nproc(setup["config"], "--nproc", "2", *args)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if "snuggle: error:" in ln]
    assert len(lines) == 1 and "trained with other settings" in lines[0] and "global batch" in lines[0], lines
    assert "stopped responding" not in p.stderr


# --- failures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_a_failing_rank_stops_the_job_in_bounded_time_and_is_named(setup, tmp_path, fault):
    script = tmp_path / "faulty_snuggle.py"
    script.write_text(_FAULT_SCRIPT)
    out = tmp_path / "run"
    timeout_s = 8  # every collective waits at most this long for a peer
    args = overrides(
        setup["tied"], setup["corpus"], out, "train.batch_size=2", f"train.dist_timeout_s={timeout_s}"
    )
    t0 = time.monotonic()
    p = torchrun(setup["config"], *args, script=script, extra_env={"FAULT": fault, "FAULT_STEP": "2"})
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s"
    if fault == "exit":
        # the elastic agent sees rank 1 die and stops rank 0
        assert "rank      : 1 (local_rank: 1)\n  exitcode  : 3" in p.stderr, p.stderr[-3000:]
    else:
        # rank 1 is alive but silent: rank 0's collective times out and says who it waited for
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("snuggle: error:")]
        assert len(lines) == 1, p.stderr[-3000:]
        assert "rank 1 (last seen" in lines[0] and "stopped responding" in lines[0], lines
        assert "step 3" in lines[0]  # rank 0 was waiting at step 3 (0-based step 2)
    assert "]: Traceback" not in p.stderr  # no worker traceback, only torchrun's own report
    assert latest_checkpoint(out).name == "checkpoint-0000002"  # the last complete checkpoint stands


def test_a_setup_error_on_rank_0_alone_stops_every_rank(setup, lora_ref):
    """Only rank 0 judges the output directory; the other rank must not wait for it in a collective."""
    args = overrides(setup["tied"], setup["corpus"], lora_ref, "train.batch_size=2")
    t0 = time.monotonic()
    p = torchrun(setup["config"], *args)
    assert p.returncode != 0 and time.monotonic() - t0 < 60
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("snuggle: error:")]
    assert len(lines) == 1 and "holds another run" in lines[0], p.stderr[-3000:]
    assert "]: Traceback" not in p.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_nproc_launcher_checkpoints_and_exits_like_one_process(setup, tmp_path, sig):
    """`snuggle train --nproc 2` stopped by Ctrl-C or a scheduler: the workers checkpointed and said so,
    but the launcher ended in torch's SignalException traceback with exit status 1, not 130 / 143."""
    import signal

    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    args = overrides(setup["tied"], setup["corpus"], out, "train.batch_size=2", "train.steps=400")
    rows = out / "metrics.jsonl"
    with open(log, "w") as err_file:
        p = subprocess.Popen(
            [sys.executable, "-m", "snuggle", "train", setup["config"], "--nproc", "2", *args],
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            env=env(),
        )
        try:
            deadline = time.monotonic() + LAUNCH_TIMEOUT_S
            while not rows.is_file() or '"step": 3,' not in rows.read_text():
                assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            p.send_signal(getattr(signal, sig))
            p.wait(timeout=LAUNCH_TIMEOUT_S)
        finally:
            if p.poll() is None:
                p.kill()
    err = log.read_text()
    assert p.returncode == 128 + getattr(signal, sig), err[-3000:]
    assert "Traceback" not in err and "death signal" not in err, err[-3000:]  # our line, not torch's
    stopped = [ln for ln in err.splitlines() if ln.startswith(f"snuggle: stopped by {sig} at step")]
    assert len(stopped) == 1, err[-3000:]
    step = int(re.search(r"at step (\d+) ", stopped[0]).group(1))
    assert latest_checkpoint(out).name == f"checkpoint-{step:07d}"


# --- elastic: restarts and a changing world size -----------------------------------------------------


# (launcher, seed, kills): seed 5 kills rank 1 inside step 2; seed 2 kills rank 1 writing its DCP shards
# of checkpoint 2, then rank 0 with checkpoint 2 written but before `latest` names it
# the torchrun line with restarts is tried by the lost-node test below (its agent restarts the survivor)
@pytest.mark.parametrize(("launch", "seed", "kills"), [("nproc", 2, 2)])
def test_killed_ranks_are_restarted_and_the_job_finishes_the_uninterrupted_curve(
    setup, lora_ref, tmp_path, launch, seed, kills
):
    """A rank SIGKILLed at a seeded instant (mid-step or mid-checkpoint) in each of the first `kills`
    attempts of `torchrun --max-restarts 3` / `snuggle train --nproc 2 --max-restarts 3`: the agent
    restarts both workers, which resume from `latest` with no human step. The curve and the trained
    tensors are the uninterrupted run's; the restarts are counted in the log and metrics.jsonl."""
    (tmp_path / "sitecustomize.py").write_text(_KILL_SITECUSTOMIZE)
    out = tmp_path / "run"
    args = overrides(setup["tied"], setup["corpus"], out, "train.batch_size=2", "train.resume=auto")
    if launch == "torchrun":
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "3"]
        cmd += ["-m", "snuggle", "train", setup["config"], *args]
    else:
        cmd = ["-m", "snuggle", "train", setup["config"], "--nproc", "2", "--max-restarts", "3", *args]
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    p = subprocess.run(
        [sys.executable, *cmd],
        capture_output=True,
        text=True,
        env={**env(), "PYTHONPATH": path, "KILL_SEED": str(seed), "KILL_ATTEMPTS": str(kills)},
        timeout=LAUNCH_TIMEOUT_S,
    )
    ok(p)
    attempts = re.findall(r"KILL rank=\d attempt=(\d)", p.stderr)
    assert attempts == [str(a) for a in range(kills)], p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["restarts"] == kills
    assert f"; restart {kills} of 3" in p.stderr, p.stderr[-3000:]
    assert metrics(out)[-1]["restart"] == kills
    assert_same_curve(out, lora_ref, ignore=("restart",))
    assert_same_trainables(out, lora_ref)


def test_a_node_lost_for_good_leaves_the_job_on_one_process_with_the_same_curve(setup, lora_ref, tmp_path):
    """Two torchrun agents (`--nnodes 1:2`, one process each) train with `train.global_batch=4`
    (batch_size 2: grad_accum 1 on 2 processes). One node dies for good at step 3; the other agent's
    worker fails, the agent meets alone in the next rendezvous round and restarts it on 1 process,
    which derives grad_accum 2, resumes checkpoint 2 and ends on the uninterrupted curve."""
    from torch.distributed import TCPStore

    (tmp_path / "sitecustomize.py").write_text(_NODE_KILL_SITECUSTOMIZE)
    out = tmp_path / "run"
    args = overrides(
        setup["tied"], setup["corpus"], out, "train.batch_size=2", "train.global_batch=4", "train.resume=auto"
    )
    # the rendezvous store lives here, so that it outlives whichever node dies
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    rdzv = [
        "--nnodes=1:2",
        "--nproc-per-node=1",
        "--max-restarts=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{store.port}",
        "--rdzv-id=shrink",
        # a second node gets 10 s to join the first round; a lost one is dropped after 3 s of silence
        "--rdzv-conf=is_host=false,last_call_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=3",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, "-m", "snuggle", "train"]
    cmd += [setup["config"], *args]
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    nodes = []
    for kill in ("0", "1"):
        log = open(tmp_path / f"node{kill}.txt", "w+")
        node_env = {**env(), "PYTHONPATH": path, "KILL_NODE": kill, "KILL_STEP": "3"}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=node_env)
        nodes.append((proc, log))
    try:
        survivor, lost = (p.wait(timeout=LAUNCH_TIMEOUT_S) for p, _ in nodes)
    finally:
        for p, log in nodes:
            if p.poll() is None:
                p.kill()
            log.close()
    said = [(tmp_path / f"node{k}.txt").read_text() for k in ("0", "1")]
    assert (survivor, lost) == (0, -9), said[0][-3000:] + said[1][-3000:]
    assert "KILL node of rank" in said[1]
    assert "grad_accum 1 for a global batch of 4 rows" in said[0] + said[1]  # 2 processes
    assert "snuggle: 1 process; grad_accum 2 for a global batch of 4 rows" in said[0]
    summary = json.loads(said[0].strip().splitlines()[-1])
    assert summary["restarts"] >= 1 and "world_size" not in summary  # it ended on one process
    assert_same_curve(out, lora_ref, ignore=("restart",))
    assert_same_trainables(out, lora_ref)
