"""Faults during training: killed runs, stop signals, full disks, non-finite steps, GPU OOM, changed resumes.

docs/reliability.md lists each fault tried here, how often, and what happened. The subprocess tests
run the real CLI (`python -m snuggle train`) through a small wrapper that records what the run is doing
(steps, checkpoint writes) in an events file and slows steps and checkpoint phases down a little, so
that kills can be aimed at moments (inside a checkpoint write) that would otherwise last microseconds.
Everything else calls `train()` in-process on the tiny models of test_train.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs
from safetensors.torch import load_file

import snuggle.train.checkpoint as ckpt_mod
import snuggle.train.loop as loop_mod
from conftest import build_tiny_hf_model
from snuggle.config import load_config
from snuggle.errors import SnuggleError
from snuggle.model.decoder import Decoder
from snuggle.train.checkpoint import (
    TRAINABLE_FILE,
    curve_fingerprint,
    fingerprint_changes,
    latest_checkpoint,
)
from snuggle.train.loop import oom_message, train
from snuggle.train.optim import lr_factor
from test_train import learnable_docs, make_cfg, read_metrics, replayable, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")

LAUNCH_TIMEOUT_S = 120
STEP_S = 0.04  # the wrapper's pause per step: a kill aimed at a step lands inside it
SAVE_S = 0.03  # ... and before each phase of a checkpoint write

# The CLI, instrumented: appends "step N" / "save N begin" / "phase NAME" / "save N end" to
# $SNUGGLE_TEST_EVENTS and sleeps a little before every step and before each phase of a checkpoint write.
_HOOK_SCRIPT = """
import os, signal, sys, time
import snuggle.train.checkpoint as ckpt
import snuggle.train.loop as loop
from snuggle.cli import main

EVENTS = os.environ["SNUGGLE_TEST_EVENTS"]
STEP_S = float(os.environ["SNUGGLE_TEST_STEP_S"])
SAVE_S = float(os.environ["SNUGGLE_TEST_SAVE_S"])
SIGNAL_AT = os.environ.get("SNUGGLE_TEST_SIGNAL_AT")  # "RANK:STEP": that rank sends itself SIGTERM


def event(text):
    with open(EVENTS, "a") as f:
        f.write(text + "\\n")


real_micro_batches = loop.BatchPlan.micro_batches


def micro_batches(self, step):
    event(f"step {step + 1}")
    if SIGNAL_AT == f"{self.rank}:{step + 1}":
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STEP_S)
    return real_micro_batches(self, step)


real_save = loop.save_checkpoint


def save_checkpoint(run_dir, step, *args, **kwargs):
    event(f"save {step} begin")
    out = real_save(run_dir, step, *args, **kwargs)
    event(f"save {step} end")
    return out


def slowed(name, fn):
    def wrapper(*args, **kwargs):
        event(f"phase {name}")
        time.sleep(SAVE_S)
        return fn(*args, **kwargs)
    return wrapper


loop.BatchPlan.micro_batches = micro_batches
loop.save_checkpoint = save_checkpoint
for name in ("_write_shards", "_write_state", "_publish", "_fsync_dir"):
    setattr(ckpt, name, slowed(name, getattr(ckpt, name)))
sys.exit(main(sys.argv[1:]))
"""


# --- shared setup ---------------------------------------------------------------------------------------


def run_overrides(setup: dict, out: Path, *extra: str) -> list[str]:
    """A 12-step LoRA run with dropout (so the RNG state must survive a resume) and evaluations."""
    return [
        f"model.path={setup['model']}",
        f"data.train={setup['corpus']}",
        f"data.cache_dir={setup['root'] / 'token-cache'}",
        "data.seq_len=16",
        "data.val_fraction=0.2",
        "lora.r=4",
        "lora.dropout=0.1",
        "train.steps=12",
        "train.batch_size=2",
        "train.lr=0.01",
        "train.warmup_steps=2",
        "train.eval_every=4",
        "train.eval_rows=4",
        "train.keep_checkpoints=2",
        "train.progress=false",
        f"train.output_dir={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reliability")
    model = root / "model"
    build_tiny_hf_model("llama", False, model)
    corpus = write_jsonl(root / "corpus.jsonl", learnable_docs(60))
    config = root / "config.yaml"
    config.write_text("{}\n")  # every setting is a dotted override
    hook = root / "snuggle_hooked.py"
    hook.write_text(_HOOK_SCRIPT)
    return {"root": root, "model": model, "corpus": corpus, "config": config, "hook": hook}


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    """The uninterrupted run, in-process, on one thread as the subprocesses run."""
    out = setup["root"] / "reference"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(None, run_overrides(setup, out, "train.save_every=4")))
    finally:
        torch.set_num_threads(n)
    return out


def hook_env(events: Path) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "SNUGGLE_TEST_EVENTS": str(events),
        "SNUGGLE_TEST_STEP_S": str(STEP_S),
        "SNUGGLE_TEST_SAVE_S": str(SAVE_S),
    }


def launch(setup: dict, out: Path, events: Path, *extra: str) -> subprocess.Popen:
    env = hook_env(events)
    cmd = [
        sys.executable,
        str(setup["hook"]),
        "train",
        str(setup["config"]),
        *run_overrides(setup, out, *extra),
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_events(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def wait_for_event(p: subprocess.Popen, events: Path, wanted: str, timeout_s: float = 60) -> bool:
    """True once `wanted` is in the events file; False if the process ended first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if wanted in read_events(events):
            return True
        if p.poll() is not None:
            return False
        time.sleep(0.002)
    p.kill()
    raise AssertionError(f"no {wanted!r} within {timeout_s} s: {read_events(events)[-5:]}")


def assert_complete_checkpoint(ckpt: Path) -> int:
    """Everything a resume reads is there and parses; returns the checkpoint's step."""
    meta = json.loads((ckpt / "meta.json").read_text())
    assert ckpt.name == f"checkpoint-{meta['step']:07d}"
    assert load_file(str(ckpt / TRAINABLE_FILE))
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert {"scheduler", "rng"} <= set(state)
    assert (ckpt / "optimizer" / ".metadata").is_file()
    return meta["step"]


def named_checkpoint(out: Path) -> Path | None:
    """The directory `latest` names (not latest_checkpoint(), which hides a torn one as None)."""
    pointer = out / "latest"
    return out / pointer.read_text().strip() if pointer.exists() else None


def assert_same_curve(out: Path, ref: Path) -> None:
    """Same rows, same order, every value equal to 1e-6 (fp32 on one thread: in practice bit-equal)."""
    got, want = replayable(read_metrics(out)), replayable(read_metrics(ref))
    assert [(r["step"], "loss" in r) for r in got] == [(r["step"], "loss" in r) for r in want]
    for r, w in zip(got, want, strict=True):
        assert set(r) == set(w), (r, w)
        for k, v in w.items():
            assert r[k] == pytest.approx(v, rel=0, abs=1e-6), (k, r, w)


def assert_same_trainables(out: Path, ref: Path) -> None:
    got, want = (
        load_file(str(latest_checkpoint(out) / TRAINABLE_FILE)),
        load_file(str(latest_checkpoint(ref) / TRAINABLE_FILE)),
    )
    assert set(got) == set(want)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=1e-6, msg=name)


def ok(p: subprocess.Popen) -> tuple[str, str]:
    stdout, stderr = p.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert p.returncode == 0, f"exit {p.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return stdout, stderr


# --- 1. kill anywhere ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_instants_never_loses_or_tears_a_checkpoint(setup, reference, tmp_path):
    """10 SIGKILLs at seeded random instants (starting up, mid-step, inside checkpoint writes), each
    followed by a resume; the last attempt finishes. Every kill leaves `latest` naming a complete
    checkpoint no older than the one before, every restart resumes from it, and the finished run's
    metrics.jsonl (every step once, in order) and parameters are the uninterrupted run's."""
    rng = random.Random(20240611)
    out = tmp_path / "run"
    events = tmp_path / "events.log"
    kills, in_save, newest = 0, 0, 0
    log = []
    while True:
        events.unlink(missing_ok=True)
        named = named_checkpoint(out)
        p = launch(setup, out, events, "train.save_every=1", "train.resume=true")
        if kills == 10:
            _, stderr = ok(p)
            break
        mode = rng.choices(["startup", "step", "save"], weights=[1, 3, 5])[0]
        target = min(12, newest + rng.randint(1, 2))  # walk through the run: every part gets kills
        if mode == "startup":
            # imports, model building, tokenizing (first launch), resume: anything before step 1
            time.sleep(rng.uniform(0.0, 4.0))
            alive = p.poll() is None
        elif mode == "step":
            alive = wait_for_event(p, events, f"step {target}")
            time.sleep(rng.uniform(0.0, STEP_S + 0.02))
        else:
            alive = wait_for_event(p, events, f"save {target} begin")
            # within the wrapper's six pauses of a write (plus its real work): the kill lands inside it
            time.sleep(rng.uniform(0.0, 6 * SAVE_S))
        if not alive or p.poll() is not None:
            # finished before the kill could land (a fast machine, a kill aimed late): a complete run
            _, stderr = ok(p)
            break
        p.send_signal(signal.SIGKILL)
        _, stderr = p.communicate(timeout=LAUNCH_TIMEOUT_S)
        assert p.returncode == -signal.SIGKILL
        kills += 1
        seen = read_events(events)
        opened = [e.split()[1] for e in seen if e.endswith("begin")]
        closed = [e.split()[1] for e in seen if e.endswith("end")]
        inside = len(opened) > len(closed)
        in_save += inside
        log.append(f"{mode} {target}: last event {seen[-1] if seen else None!r}, inside save: {inside}")

        # a launch that got as far as training resumed from what `latest` named when it started
        if any(e.startswith("step ") for e in seen):
            resumed = f"resumed from {named.name}" if named is not None else "resumed from"
            assert (resumed in stderr) == (named is not None), stderr[-2000:]
        # what `latest` names now is complete, and no older than before the kill
        now = named_checkpoint(out)
        if now is not None:
            step = assert_complete_checkpoint(now)
            assert step >= newest, log
            newest = step
        else:
            assert newest == 0, log
        rows = read_metrics_tolerant(out / "metrics.jsonl")
        steps = [r["step"] for r in rows if "loss" in r]
        assert steps == list(range(1, len(steps) + 1)), (steps, log)

    assert f"resumed from checkpoint-{newest:07d}" in stderr or newest == 0
    assert_same_curve(out, reference)
    assert_same_trainables(out, reference)
    assert not list(out.glob(".tmp-*")) and not (out / "latest.tmp").exists()
    # the seed's instants put several kills inside checkpoint writes (the point of the test)
    assert in_save >= 3, log
    print("\n".join(log))  # where the kills landed (pytest -s shows it; docs/reliability.md counts it)


def read_metrics_tolerant(path: Path) -> list[dict]:
    """metrics.jsonl as a reader after a kill sees it: a torn last line is not a row."""
    from snuggle.train.metrics import MetricsLog

    return MetricsLog.read(path) if path.exists() else []


# --- 1b. SIGTERM / SIGINT -------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_checkpoints_the_current_step_and_exits_cleanly(setup, reference, tmp_path, sig):
    out = tmp_path / "run"
    events = tmp_path / "events.log"
    p = launch(setup, out, events)  # save_every 0: the only checkpoint before the end is the stop's
    assert wait_for_event(p, events, "step 5")
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert p.returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("snuggle: stopped")]
    assert len(lines) == 1, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    step = summary["stopped_at_step"]
    assert summary["stopped_by"] == sig.name and 5 <= step < 12
    assert lines[0] == (
        f"snuggle: stopped by {sig.name} at step {step} of 12; checkpoint saved in {out}: continue with "
        "train.resume=true"
    )
    assert [c.name for c in out.glob("checkpoint-*")] == [f"checkpoint-{step:07d}"]
    assert assert_complete_checkpoint(named_checkpoint(out)) == step
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, step + 1))

    train(load_config(None, run_overrides(setup, out, "train.resume=true")))
    assert_same_curve(out, reference)
    assert_same_trainables(out, reference)


@pytest.mark.distributed
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(setup, tmp_path):
    """Rank 1 alone gets SIGTERM during step 3: the flag travels with the step's loss all-reduce, so
    both ranks finish step 3, write one checkpoint together and stop; rank 0 says why."""
    out = tmp_path / "run"
    events = tmp_path / "events.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(setup["hook"]), "train", str(setup["config"])]
    cmd += run_overrides(setup, out, "train.batch_size=1", "train.dist_timeout_s=30")
    p = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**hook_env(events), "SNUGGLE_TEST_SIGNAL_AT": "1:3"},
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert p.returncode != 0  # a stopped run is not a finished one
    assert "]: Traceback" not in p.stderr, p.stderr[-3000:]  # no worker traceback, only torchrun's report
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("snuggle: stopped")]
    assert lines == [
        f"snuggle: stopped by a signal to another process at step 3 of 12; checkpoint saved in {out}: "
        "continue with train.resume=true"
    ], p.stderr[-3000:]
    assert [c.name for c in out.glob("checkpoint-*")] == ["checkpoint-0000003"]
    meta = json.loads((out / "checkpoint-0000003" / "meta.json").read_text())
    assert (meta["step"], meta["world_size"], meta["global_batch"]) == (3, 2, 2)
    assert_complete_checkpoint(named_checkpoint(out))
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]
    # both ranks ran exactly three steps
    assert (
        sorted(e for e in read_events(events) if e.startswith("step"))
        == ["step 1"] * 2 + ["step 2"] * 2 + ["step 3"] * 2
    )
    # one process continues it (the same global batch): every step once
    train(load_config(None, run_overrides(setup, out, "train.resume=true")))
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, 13))


def test_stop_signal_in_process_and_handlers_restored(tiny_hf_model, tmp_path, corpus, monkeypatch):
    """The handler only flags the signal: the step finishes, is checkpointed, and train() returns."""
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    ref = tmp_path / "ref"
    train(make_cfg(model_dir, corpus, ref, "train.steps=5"))

    real = loop_mod.BatchPlan.micro_batches

    def signal_at_step_3(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, step)

    out = tmp_path / "run"
    monkeypatch.setattr(loop_mod.BatchPlan, "micro_batches", signal_at_step_3)
    summary = train(make_cfg(model_dir, corpus, out, "train.steps=5"))
    monkeypatch.setattr(loop_mod.BatchPlan, "micro_batches", real)
    assert summary["stopped_by"] == "SIGTERM" and summary["stopped_at_step"] == 3
    assert summary["exit_status"] == 128 + signal.SIGTERM
    assert latest_checkpoint(out).name == "checkpoint-0000003"
    assert {s: signal.getsignal(s) for s in before} == before
    train(make_cfg(model_dir, corpus, out, "train.steps=5", "train.resume=true"))
    assert replayable(read_metrics(out)) == replayable(read_metrics(ref))


def test_stop_request_debounces_forwarded_signals_and_a_real_second_one_acts(monkeypatch):
    """A copy of the signal within a second (a launcher forwarding what the process group already got)
    keeps the graceful stop; a second signal later means "now" (SIGINT: KeyboardInterrupt)."""
    # Python's own SIGINT handler before, as in a terminal: a shell starts background jobs with SIGINT
    # ignored, and then "now" rightly does nothing (the previous handler is what acts)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _debounce_then_interrupt(monkeypatch)
    finally:
        signal.signal(signal.SIGINT, before)


def _debounce_then_interrupt(monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    with loop_mod._StopRequest(watchdog=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # handlers run between bytecodes of the main thread
        assert stop.signum == signal.SIGINT
        monkeypatch.setattr(loop_mod._StopRequest, "DUPLICATE_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) == before


def test_stop_request_watchdog_ends_a_rank_that_cannot_reach_a_step_boundary(monkeypatch):
    """Multi-process only: a rank stuck in a collective (its peer died) would never checkpoint; it
    ends after the grace instead of waiting for the launcher's SIGKILL. A step boundary that agrees
    to stop disarms it."""
    gave_up = []
    monkeypatch.setattr(loop_mod, "_give_up", lambda signum, grace: gave_up.append((signum, grace)))
    monkeypatch.setattr(loop_mod._StopRequest, "MIN_GRACE_S", 0.2)
    with loop_mod._StopRequest(watchdog=True) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)
    assert gave_up == [(signal.SIGTERM, 0.2)]
    gave_up.clear()
    with loop_mod._StopRequest(watchdog=True) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        stop.boundary(stop_agreed=True)
        time.sleep(0.6)
    assert gave_up == []


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", learnable_docs(60))


# --- 2. full disk ---------------------------------------------------------------------------------------


class _FullDiskStream:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        if len(data) > self._room:
            self._f.write(bytes(data[: self._room]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def inject_full_disk(mp: pytest.MonkeyPatch, where: str, at_step: int) -> None:
    """Make the checkpoint of `at_step` fail with ENOSPC while writing `where`."""
    import contextlib

    def failing_now(path) -> bool:
        return f"checkpoint-{at_step:07d}" in str(path) or (
            where == "latest" and Path(path).name == "latest.tmp"
        )

    if where in ("trainable", "optimizer"):
        real = dcp_fs.FileSystem.create_stream
        suffix = ".safetensors" if where == "trainable" else ".distcp"

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            with real(self, path, mode) as f:
                if failing_now(path) and str(path).endswith(suffix) and "w" in mode:
                    yield _FullDiskStream(f, room=100)
                else:
                    yield f

        mp.setattr(dcp_fs.FileSystem, "create_stream", create_stream)
    elif where == "state":
        real_write_bytes = Path.write_bytes

        def write_bytes(self, data):
            if self.name == "state.pt" and failing_now(self):
                real_write_bytes(self, data[:100])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write_bytes(self, data)

        mp.setattr(Path, "write_bytes", write_bytes)
    elif where == "latest":
        saves = {"n": 0}
        real_open = open

        def fake_open(path, *args, **kwargs):
            if Path(path).name == "latest.tmp":
                saves["n"] += 1
                if saves["n"] == 2:  # the second checkpoint (step 4)
                    f = real_open(path, *args, **kwargs)
                    f.close()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_open(path, *args, **kwargs)

        mp.setattr(ckpt_mod, "open", fake_open, raising=False)
    else:
        raise ValueError(where)


@pytest.mark.parametrize("where", ["trainable", "optimizer", "state", "latest"])
def test_full_disk_while_saving_is_one_clear_error_and_the_previous_checkpoint_stands(
    tiny_hf_model, tmp_path, corpus, where
):
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    ref = tmp_path / "ref"
    args = ("train.steps=4", "train.save_every=2", "lora.dropout=0.1")
    train(make_cfg(model_dir, corpus, ref, *args))

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        inject_full_disk(mp, where, at_step=4)
        with pytest.raises(SnuggleError) as info:
            train(make_cfg(model_dir, corpus, out, *args))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"cannot write the checkpoint of step 4 to {out}: No space left on device (")
    assert " free there); the partial checkpoint was removed" in msg
    assert "the previous checkpoint checkpoint-0000002 is intact" in msg and "train.resume=true" in msg
    # nothing of the failed checkpoint is left; the previous one is named and complete
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-0000002"]
    assert not (out / "latest.tmp").exists()
    assert assert_complete_checkpoint(named_checkpoint(out)) == 2

    train(make_cfg(model_dir, corpus, out, *args, "train.resume=true"))
    assert replayable(read_metrics(out)) == replayable(read_metrics(ref))
    assert_same_trainables(out, ref)


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    where.mkdir(exist_ok=True)
    probe = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=64k tmpfs {where}",
        ],
        capture_output=True,
    )
    return probe.returncode == 0


def _tmpfs_bytes(path: Path) -> int:
    """What files take on a tmpfs: whole 4 KiB pages."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in path.rglob("*") if f.is_file())


def test_full_disk_on_a_real_small_filesystem(setup, tmp_path):
    """The CLI on a tmpfs (in a user+mount namespace) sized so the first checkpoint fits, the second not."""
    if not _can_mount_tmpfs(tmp_path / "probe"):
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    args = ("train.steps=4", "train.save_every=2", "data.val_fraction=0", "train.keep_checkpoints=2")
    ref = tmp_path / "ref"
    train(load_config(None, run_overrides(setup, ref, *args)))
    ckpt = _tmpfs_bytes(ref / "checkpoint-0000002")
    others = sum(_tmpfs_bytes(ref / n) for n in ("config.yaml", "metrics.jsonl", "loss.png", "latest"))
    size = others + ckpt + ckpt // 2  # half a checkpoint short of the second one

    out, copy = tmp_path / "run", tmp_path / "copy"
    out.mkdir()
    copy.mkdir()
    cli = [sys.executable, "-m", "snuggle", "train", str(setup["config"]), *run_overrides(setup, out, *args)]
    script = (
        f'mount -t tmpfs -o size={size} tmpfs "{out}" || exit 99; '
        + " ".join(f"'{a}'" for a in cli)
        + f'; rc=$?; df -k "{out}" >&2; cp -a "{out}/." "{copy}/"; exit $rc'
    )
    p = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("snuggle: error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert errors[0].startswith(
        f"snuggle: error: cannot write the checkpoint of step 4 to {out}: No space left on device ("
    ), errors
    assert "the previous checkpoint checkpoint-0000002 is intact" in errors[0]
    assert sorted(p.name for p in copy.iterdir() if "checkpoint" in p.name) == ["checkpoint-0000002"]
    assert assert_complete_checkpoint(named_checkpoint(copy)) == 2

    # on a disk with room, the run continues from that checkpoint to the uninterrupted curve
    train(load_config(None, run_overrides(setup, copy, *args, "train.resume=true")))
    assert_same_curve(copy, ref)
    assert_same_trainables(copy, ref)


def test_metrics_write_failure_is_one_clear_error(tmp_path):
    from snuggle.train.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")

    class Full(io.StringIO):
        def write(self, s):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    log._fh = Full()
    with pytest.raises(
        SnuggleError, match=r"cannot write .*metrics.jsonl: No space left on device; [\d.]+ MiB free"
    ):
        log.write({"step": 1, "loss": 1.0})


# --- 3. non-finite loss or gradients --------------------------------------------------------------------


def poison(mp: pytest.MonkeyPatch, bad_steps: set[int], kind: str) -> dict[int, list[int]]:
    """Make the loss (kind 'loss') or only the gradient ('grad') of the 1-based `bad_steps` NaN.

    Returns the rows of each step as the loop's batch plan gave them.
    """
    rows: dict[int, list[int]] = {}
    current = {"step": 0}
    real_micro, real_loss_sum = loop_mod.BatchPlan.micro_batches, Decoder.loss_sum

    def micro_batches(self, step):
        current["step"] = step + 1
        out = real_micro(self, step)
        rows[step + 1] = [int(i) for mb in out for i in mb]
        return out

    def loss_sum(self, *args, **kwargs):
        out = real_loss_sum(self, *args, **kwargs)
        if current["step"] not in bad_steps:
            return out
        if kind == "loss":
            return out * float("nan")
        # a finite loss whose gradient is NaN: d sqrt(x)/dx at 0 is inf, times 0
        p = next(p for p in self.parameters() if p.requires_grad)
        return out + torch.sqrt((p * 0.0).sum())

    mp.setattr(loop_mod.BatchPlan, "micro_batches", micro_batches)
    mp.setattr(Decoder, "loss_sum", loss_sum)
    return rows


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


@pytest.mark.parametrize(
    ("kind", "clip"),
    [("loss", "1.0"), ("grad", "null"), ("grad", "1.0")],
    ids=["nan-loss", "nan-grad", "nan-grad-clip"],
)
def test_non_finite_steps_are_skipped_with_a_warning_naming_step_and_rows(
    tiny_hf_model, tmp_path, corpus, kind, clip
):
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    out = tmp_path / "run"
    args = ("train.steps=6", "train.save_every=2", "train.keep_checkpoints=3", "train.warmup_steps=2")
    cfg = make_cfg(model_dir, corpus, out, *args, f"train.max_grad_norm={clip}", "train.max_bad_steps=3")
    with pytest.MonkeyPatch.context() as mp:
        rows = poison(mp, {3, 4}, kind)
        with pytest.warns(UserWarning) as caught:
            summary = train(cfg)
    msgs = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(msgs) == 2
    for step, msg, streak in zip((3, 4), msgs, (1, 2), strict=True):
        rows_text = "[" + ", ".join(map(str, rows[step])) + "]"
        what = "loss nan and gradient norm nan" if kind == "loss" else "gradient norm nan"
        assert msg == (
            f"step {step} skipped: non-finite {what} on packed rows {rows_text} of the training data; no "
            f"update was made (parameters, optimizer state and lr schedule unchanged); {streak} in a row, "
            "train.max_bad_steps=3 in a row stop the run"
        )
    assert math.isfinite(summary["final_loss"])

    # strict JSON (jq, JSON.parse): the non-finite values of the skipped steps are null, not NaN
    lines = (out / "metrics.jsonl").read_text().splitlines()
    metrics = {r["step"]: r for r in (json.loads(ln, parse_constant=_no_constant) for ln in lines)}
    assert [s for s, r in metrics.items() if r.get("skipped")] == [3, 4]
    assert all(metrics[s]["grad_norm"] is None for s in (3, 4))
    assert (metrics[3]["loss"] is None) is (kind == "loss")
    # the schedule counts updates: steps 5 and 6 are the 3rd and 4th updates, at those lrs
    for step, update in ((2, 1), (3, 2), (4, 2), (5, 2), (6, 3)):
        assert metrics[step]["lr"] == pytest.approx(cfg.train.lr * lr_factor(update, cfg.train), rel=1e-12)
    # the skipped steps changed nothing: the checkpoint after step 4 is the one after step 2, bit for bit
    two, four = (load_file(str(out / f"checkpoint-{s:07d}" / TRAINABLE_FILE)) for s in (2, 4))
    for name, t in two.items():
        assert torch.equal(t, four[name]), name
    opt2, opt4 = (
        torch.load(out / f"checkpoint-{s:07d}" / "state.pt", weights_only=True)["scheduler"] for s in (2, 4)
    )
    assert opt2["last_epoch"] == opt4["last_epoch"] == 2


def test_max_bad_steps_in_a_row_stop_the_run_with_a_checkpoint(tiny_hf_model, tmp_path, corpus):
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    out = tmp_path / "run"
    cfg = make_cfg(
        model_dir, corpus, out, "train.steps=10", "train.save_every=2", "train.keep_checkpoints=5",
        "train.max_bad_steps=3",
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        poison(mp, set(range(3, 11)), "loss")
        with pytest.warns(UserWarning), pytest.raises(SnuggleError) as info:
            train(cfg)
    assert str(info.value).startswith(
        "training stopped: steps 3-5 (3 in a row, train.max_bad_steps=3) had a non-finite loss or gradient; "
        f"none of them changed the parameters, and the checkpoint of step 5 in {out} holds them as the "
        "update of step 2 left them."
    )
    assert latest_checkpoint(out).name == "checkpoint-0000005"
    two, five = (load_file(str(out / f"checkpoint-{s:07d}" / TRAINABLE_FILE)) for s in (2, 5))
    for name, t in two.items():
        assert torch.equal(t, five[name]), name
    assert [r["step"] for r in read_metrics(out) if r.get("skipped")] == [3, 4, 5]

    # max_bad_steps 0: the run never stops for them, and ends with the step-2 parameters
    never = tmp_path / "never"
    cfg = make_cfg(model_dir, corpus, never, "train.steps=10", "train.save_every=2", "train.max_bad_steps=0")
    with pytest.MonkeyPatch.context() as mp:
        poison(mp, set(range(3, 11)), "loss")
        with pytest.warns(UserWarning, match="train.max_bad_steps=0: the run goes on"):
            summary = train(cfg)
    assert summary["warning"] == "final training loss is not finite"
    for name, t in load_file(str(latest_checkpoint(never) / TRAINABLE_FILE)).items():
        assert torch.equal(t, two[name]), name

    with pytest.raises(SnuggleError, match="train.max_bad_steps must be >= 0"):
        train(make_cfg(model_dir, corpus, tmp_path / "x", "train.max_bad_steps=-1"))


# --- 5. GPU out of memory -------------------------------------------------------------------------------

TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
    "1.05 GiB is free. Including non-PyTorch memory, this process has 78.04 GiB memory in use. Of the "
    "allocated memory 76.50 GiB is allocated by PyTorch, and 1.01 GiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)


def test_oom_message_gives_the_figures_and_the_settings_to_change():
    cfg = make_cfg(
        Path("/m"), Path("c.jsonl"), Path("/o"), "train.batch_size=8", "data.seq_len=4096",
        "train.gradient_checkpointing=false",
    )  # fmt: skip
    msg = oom_message(
        TORCH_OOM,
        cfg,
        device="cuda:0",
        phase="step 12: forward/backward",
        free_bytes=30 * 2**30,  # read after the failure: the message's own figures win
        total_bytes=int(79.1 * 2**30),
        peak_bytes=int(76.5 * 2**30),
    )
    assert "\n" not in msg
    assert msg.startswith(
        "out of GPU memory on cuda:0 (step 12: forward/backward): needed 2.00 GiB more, 1.05 GiB of "
        "79.10 GiB free, peak allocated by this run 76.50 GiB; to fit: "
    )
    for setting in (
        "lower train.batch_size (now 8; raise train.grad_accum to keep the global batch)",
        "lower data.seq_len (now 4096)",
        "turn on train.gradient_checkpointing (and train.offload_activations)",
    ):
        assert setting in msg
    assert "train.memory_budget_gib" in msg

    # without torch's figures in the text, the ones read from the card; checkpointing already on
    cfg = make_cfg(Path("/m"), Path("c.jsonl"), Path("/o"), "train.gradient_checkpointing=true")
    msg = oom_message(
        "CUDA out of memory.",
        cfg,
        device="cuda:1",
        phase="evaluation at step 4",
        free_bytes=2**29,
        total_bytes=2**34,
    )
    assert "needed more than was free, 512.00 MiB of 16.00 GiB free;" in msg
    assert "turn on train.offload_activations" in msg and "gradient_checkpointing" not in msg
    assert "embedding_offload" not in msg  # no embeddings train in this run
    cfg = make_cfg(Path("/m"), Path("c.jsonl"), Path("/o"), "lora.train_embeddings=true")
    msg = oom_message(TORCH_OOM, cfg, device="cuda:0", phase="step 1: forward/backward")
    assert "train.embedding_offload=cpu (the embeddings' optimizer state in CPU memory)" in msg

    msg = oom_message(TORCH_OOM, cfg, device="cuda:0", phase="building the model")
    assert "the model does not fit: try model.dtype=bfloat16" in msg and "train.parallel=fsdp" in msg


def test_oom_in_training_and_in_model_building_is_one_line(tiny_hf_model, tmp_path, corpus, monkeypatch):
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(TORCH_OOM)

    with monkeypatch.context() as mp:
        mp.setattr(Decoder, "loss_sum", oom)
        with pytest.raises(SnuggleError) as info:
            train(make_cfg(model_dir, corpus, tmp_path / "a"))
    assert str(info.value).startswith(
        "out of GPU memory on cpu (step 1: forward/backward): needed 2.00 GiB more, "
        "1.05 GiB of 79.10 GiB free"
    )
    assert latest_checkpoint(tmp_path / "a") is None

    # cuBLAS failing to allocate its handle on a full card (seen on an H100) is the same fault
    def cublas(*args, **kwargs):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    with monkeypatch.context() as mp:
        mp.setattr(Decoder, "loss_sum", cublas)
        with pytest.raises(SnuggleError, match=r"^out of GPU memory on cpu \(step 1: forward/backward\): "):
            train(make_cfg(model_dir, corpus, tmp_path / "c"))

    with monkeypatch.context() as mp:
        mp.setattr(loop_mod, "build_model", oom)
        with pytest.raises(SnuggleError, match=r"\(building the model\): needed 2.00 GiB more.*does not fit"):
            train(make_cfg(model_dir, corpus, tmp_path / "b"))


# --- 6. resume with a changed config --------------------------------------------------------------------


def test_resume_with_settings_that_change_the_curve_is_refused_naming_each(
    tiny_hf_model, tmp_path, corpus, capfd
):
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    ref = tmp_path / "ref"
    base = ("train.steps=4", "train.save_every=2", "train.keep_checkpoints=3")
    train(make_cfg(model_dir, corpus, ref, *base))

    def rewound(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(ref, out)
        shutil.rmtree(out / "checkpoint-0000004")
        (out / "latest").write_text("checkpoint-0000002")
        return out

    out = rewound("changed")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    changed = ("train.lr=0.02", "data.seq_len=32", "train.batch_size=4", "lora.r=8", "train.steps=6")
    with pytest.raises(SnuggleError) as info:
        train(make_cfg(model_dir, corpus, out, *base, *changed, "train.resume=true"))
    msg = str(info.value)
    assert msg.startswith(f"train.resume: {out / 'checkpoint-0000002'} was trained with other settings")
    for change in (
        "lora.r: 4 -> 8",
        "data.seq_len: 16 -> 32",
        "global batch (processes x train.batch_size x train.grad_accum): 2 -> 4",
        "train.lr: 0.01 -> 0.02",
        "train.steps: 4 -> 6",
    ):
        assert change in msg
    assert "train.allow_config_change=true" in msg
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # refused before writing

    # settings that do not shape the curve may change freely, and the curve is the same
    out = rewound("benign")
    benign = ("train.save_every=1", "train.log_every=1", "train.eval_every=3", "train.keep_checkpoints=2")
    train(make_cfg(model_dir, corpus, out, *base, *benign, "train.resume=true"))
    assert replayable(read_metrics(out)) == replayable(read_metrics(ref))
    # the same global batch from another split: allowed (equal up to summation order)
    out = rewound("split")
    train(
        make_cfg(
            model_dir, corpus, out, *base, "train.batch_size=1", "train.grad_accum=2", "train.resume=true"
        )
    )
    # with a constant schedule, `steps` only says where to stop: extending the run is no change
    const = tmp_path / "const"
    train(make_cfg(model_dir, corpus, const, *base, "train.schedule=constant"))
    train(
        make_cfg(
            model_dir, corpus, const, *base, "train.schedule=constant", "train.steps=6", "train.resume=true"
        )
    )
    assert [r["step"] for r in read_metrics(const)] == [1, 2, 3, 4, 5, 6]

    # the explicit override continues with the new settings and says what changed
    out = rewound("allowed")
    capfd.readouterr()
    train(
        make_cfg(
            model_dir,
            corpus,
            out,
            *base,
            "train.lr=0.02",
            "train.resume=true",
            "train.allow_config_change=true",
        )
    )
    err = capfd.readouterr().err
    assert (
        "snuggle: note: resuming checkpoint-0000002 with changed settings" in err
        and "train.lr: 0.01 -> 0.02" in err
    )
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_resume_on_a_changed_corpus_behind_the_same_path_is_refused(tiny_hf_model, tmp_path, corpus):
    # data.train compared as a path only: a corpus that grew re-drew the held-out split (rows evaluated
    # before became training rows) and every batch, and the resume went on silently
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    out = tmp_path / "run"
    base = ("train.steps=4", "train.save_every=2", "train.keep_checkpoints=3")
    train(make_cfg(model_dir, corpus, out, *base))
    shutil.rmtree(out / "checkpoint-0000004")
    (out / "latest").write_text("checkpoint-0000002")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with corpus.open("a") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in learnable_docs(30)))
    with pytest.raises(SnuggleError) as info:
        train(make_cfg(model_dir, corpus, out, *base, "train.resume=true"))
    assert "packed rows of data.train (the data changed): " in str(info.value), info.value
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # refused before writing
    train(make_cfg(model_dir, corpus, out, *base, "train.resume=true", "train.allow_config_change=true"))
    assert latest_checkpoint(out).name == "checkpoint-0000004"


def test_fingerprint_ignores_what_does_not_shape_the_curve(tmp_path):
    def fp(*overrides: str, global_batch: int = 2, dtype: str = "float32") -> dict:
        cfg = make_cfg(Path("/m"), Path("c.jsonl"), tmp_path / "o", *overrides)
        return curve_fingerprint(cfg, dtype, global_batch)

    ref = json.loads(json.dumps(fp()))  # as meta.json stores it
    for benign in (
        "train.progress=true",
        "train.eval_every=5",
        "train.save_every=3",
        "train.keep_checkpoints=5",
        "train.log_every=2",
        "train.parallel=ddp",
        "train.kernels=torch",
        "train.gradient_checkpointing=true",
        "train.offload_activations=true",
        "train.dist_timeout_s=5",
        "train.max_bad_steps=0",
        "train.eval_rows=3",
        "data.cache_dir=/elsewhere",
        "model.device=cpu",
        "train.max_grad_norm=1.0",
    ):
        assert fingerprint_changes(ref, fp(benign)) == [], benign
    assert fingerprint_changes(ref, fp("train.output_dir=/x")) == []
    assert fingerprint_changes(ref, fp(dtype="bfloat16")) == ["model.dtype: float32 -> bfloat16"]
    assert fingerprint_changes(ref, fp("train.embedding_lr=0.01")) == []  # the default is lr
    assert fingerprint_changes(ref, fp("lora.targets=[q_proj,k_proj]")) == [
        "lora.targets: [down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj] -> [k_proj, q_proj]"
    ]
    assert fingerprint_changes(ref, fp("train.max_grad_norm=null")) == ["train.max_grad_norm: 1.0 -> null"]
    # a new seq_len changes the row count too: named once, as the seq_len it is, not as changed data
    saved, now = {**ref, "data.rows": 10}, {**fp("data.seq_len=32"), "data.rows": 5}
    assert fingerprint_changes(saved, now) == [f"data.seq_len: {ref['data.seq_len']} -> 32"]
    assert fingerprint_changes(saved, {**fp(), "data.rows": 5}) == [
        "packed rows of data.train (the data changed): 10 -> 5"
    ]
    # an old checkpoint records only its global batch
    assert fingerprint_changes({"train.global_batch": 2}, fp("train.seed=1", global_batch=4)) == [
        "global batch (processes x train.batch_size x train.grad_accum): 2 -> 4"
    ]


def test_resume_without_latest_beside_complete_checkpoints_is_refused(tiny_hf_model, tmp_path, corpus):
    # `latest` gone while checkpoints stand: resuming started a fresh run from step 0 in the directory,
    # which rewrote the curve and, at its first save, pruned the checkpoints it never read
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    out = tmp_path / "run"
    base = ("train.steps=4", "train.save_every=2", "train.keep_checkpoints=3")
    train(make_cfg(model_dir, corpus, out, *base))
    (out / "latest").unlink()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(SnuggleError) as info:
        train(make_cfg(model_dir, corpus, out, *base, "train.resume=true"))
    msg = str(info.value)
    assert "checkpoint-0000002, checkpoint-0000004 are" in msg and "echo checkpoint-0000004 >" in msg, msg
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # refused before writing
    (out / "latest").write_text("checkpoint-0000004")  # the fix the message gives
    train(
        make_cfg(
            model_dir,
            corpus,
            out,
            *base,
            "train.resume=true",
            "train.steps=5",
            "train.allow_config_change=true",
        )
    )
    assert latest_checkpoint(out).name == "checkpoint-0000005"


def test_torchs_zip_writer_failing_on_a_full_disk_is_a_write_failure():
    """On a real full tmpfs torch.save inside DCP fails as a RuntimeError of its zip writer, not an
    OSError: it must still be the one-line write failure (it was re-raised as a bug, with a traceback)."""
    from torch.distributed.checkpoint.api import CheckpointException

    zip_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    def save():
        raise CheckpointException("save failed", {0: (zip_error, None)})

    got = ckpt_mod._attempt(save)
    assert isinstance(got, ckpt_mod._WriteFailure) and "is the disk full?" in str(got)

    def bug():
        raise CheckpointException("save failed", {0: (KeyError("x"), None)})

    assert not isinstance(ckpt_mod._attempt(bug), ckpt_mod._WriteFailure)  # a bug stays a bug
