"""The rank-naming watchdog of train/parallel.py, which GPU (NCCL) runs use instead of a Python exception.

NCCL's timeout aborts the process from its own thread, so our watchdog must name the hung rank first.
It cannot be run with NCCL on a CPU machine; its logic is backend-independent, so it is checked here on
a fake store (in process) and forced onto a gloo job whose rank 1 hangs.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from snuggle.train import parallel
from snuggle.train.parallel import WATCHDOG_EXIT_STATUS, DistContext, watchdog_grace_s

pytestmark = pytest.mark.distributed


class FakeStore:
    """The three calls of the rendezvous store that the heartbeats use."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def get(self, key: str) -> bytes:
        return self.data[key]

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)


def job(world: int, timeout_s: float) -> list[DistContext]:
    store = FakeStore()
    ctxs = [DistContext(world_size=world, rank=r, timeout_s=timeout_s, _store=store) for r in range(world)]
    for c in ctxs:
        c.heartbeat("setup")
    return ctxs


def test_a_rank_behind_for_the_timeout_is_named_once():
    r0, r1, r2 = job(3, timeout_s=60)
    for c in (r0, r2):
        c.heartbeat("step 3: token count")
    t = r0._phase_t
    assert r0.check_stalled(now=t + 59) is None  # not yet waited the timeout
    msg, prints = r0.check_stalled(now=t + 61)
    assert msg.startswith("rank 1 (last seen ") and "in setup)" in msg
    assert "stopped responding; rank 0 gave up waiting in step 3: token count" in msg
    assert prints  # the lowest rank that is not behind prints; rank 2 sees the same and stays quiet
    assert r2.check_stalled(now=r2._phase_t + 61)[1] is False
    assert r1.check_stalled(now=r1._phase_t + 1000) is None  # the slow rank itself is behind nobody
    # a long phase that every rank is in (an evaluation, a checkpoint) is not a stall
    r1.heartbeat("step 3: token count")
    assert r0.check_stalled(now=t + 1000) is None


def test_the_watchdog_thread_prints_and_ends_the_process(monkeypatch, capsys):
    r0, r1 = job(2, timeout_s=0.2)
    r0.heartbeat("step 2: forward/backward")
    exits = []
    done = threading.Event()

    def fake_exit(status: int) -> None:
        exits.append(status)
        done.set()

    monkeypatch.setattr(parallel.os, "_exit", fake_exit)
    r0.start_watchdog(poll_s=0.05)
    assert done.wait(5.0)
    r0.stop_watchdog()
    assert exits[0] == WATCHDOG_EXIT_STATUS
    err = capsys.readouterr().err
    assert "snuggle: error: rank 1 (last seen" in err and "rank 0 gave up waiting in step 2" in err


def test_the_backend_timeout_stays_the_later_backstop():
    assert watchdog_grace_s(8) == 30.0 and watchdog_grace_s(600) == 60.0


# rank 1 hangs at step 2 (0-based) of a gloo job that uses the watchdog as an NCCL job would
_SCRIPT = """
import os, signal, sys, time
import snuggle.train.parallel as parallel
import snuggle.train.loop as loop
from snuggle.cli import main

parallel._use_watchdog = lambda device: True
real = loop.BatchPlan.micro_batches

def faulty(self, step):
    if self.rank == 1 and step == 2:
        # stuck as in a CUDA call, where the trainer's SIGTERM handler never runs: torchrun's stop works
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(600)
    return real(self, step)

loop.BatchPlan.micro_batches = faulty
sys.exit(main(sys.argv[1:]))
"""


def test_watchdog_names_the_hung_rank_in_a_real_job(tmp_path):
    from conftest import build_tiny_hf_model
    from test_distributed import LAUNCH_TIMEOUT_S, docs, overrides, torchrun

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs(60)))
    model = tmp_path / "model"
    build_tiny_hf_model("qwen2", True, model)
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    script = tmp_path / "hang.py"
    script.write_text(_SCRIPT)
    timeout_s = 8  # the gloo backend's own timeout is 30 s later: the watchdog must come first
    args = overrides(
        model, corpus, tmp_path / "run", "train.batch_size=2", f"train.dist_timeout_s={timeout_s}"
    )
    t0 = time.monotonic()
    p = torchrun(str(config), *args, script=script)
    elapsed = time.monotonic() - t0
    assert p.returncode != 0 and elapsed < min(LAUNCH_TIMEOUT_S, 60), p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("snuggle: error:")]
    assert len(lines) == 1, p.stderr[-3000:]
    assert "rank 1 (last seen" in lines[0] and "stopped responding" in lines[0], lines
    assert "rank 0 gave up waiting in step 3" in lines[0]
    assert f"exitcode  : {WATCHDOG_EXIT_STATUS}" in p.stderr  # torchrun's report: rank 0 left first
    assert "]: Traceback" not in p.stderr
    assert os.path.isdir(tmp_path / "run")


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR, MASTER_PORT are not set"),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "outside"),
        ({"WORLD_SIZE": "2", "RANK": "-1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "outside"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "not a TCP port"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "x"}, "not an integer"),
    ],
)
def test_hand_set_launch_env_is_refused_before_joining(monkeypatch, env, fragment):
    """A hand-set WORLD_SIZE without the rendezvous variables was torch's traceback, and a RANK past the
    world waited for peers forever: each is one line before any group is joined."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(parallel.SnuggleError, match=fragment):
        parallel.init_distributed(5.0, parallel.torch.device("cpu"))
    assert not parallel.dist.is_initialized()
