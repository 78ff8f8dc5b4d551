"""How a training process leaves its process group: never through interpreter shutdown.

A gloo worker thread drops its last reference to a finished collective's tensors a moment after the
caller returns; a process that exits right then (an error every rank raises at once, just after a
collective) could free those tensors after Python was torn down, which aborts it in C++ ("terminate
called without an active exception", signal 6) instead of exiting with its status. So a RankError
(raised by every rank together) tears the group down inside `train`, and any other failure ends the
process with `os._exit` once its output is flushed. Checked on a real one-process gloo group.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

from snuggle.config import RunConfig
from snuggle.train import loop
from snuggle.train.parallel import DistContext, RankError, group_left_open

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def own_group(monkeypatch):
    """A one-process gloo group that `train` owns, as it does the group torchrun's variables describe."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", world_size=1, rank=0)
    ctx = DistContext(world_size=1, owns_group=True)
    monkeypatch.setattr(loop, "init_distributed", lambda timeout_s, device: ctx)
    yield ctx
    if dist.is_initialized():
        dist.destroy_process_group()


def test_an_error_every_rank_raised_tears_the_group_down_inside_train(own_group, monkeypatch):
    def refuse(cfg, ctx, device):
        dist.broadcast_object_list([{"step": 2}], src=0)  # the collective just before a refusal
        raise RankError("trained with other settings")

    monkeypatch.setattr(loop, "_train", refuse)
    with pytest.raises(RankError, match="other settings") as info:
        loop.train(RunConfig())
    assert not dist.is_initialized() and not group_left_open()
    assert info.value.__traceback__.tb_next is None  # the run's frames were let go before the teardown


def test_another_failure_leaves_the_group_to_the_cli(own_group, monkeypatch):
    """A rank's own failure: a peer may be dead or inside a collective, so no teardown is attempted."""

    def fail(cfg, ctx, device):
        raise ValueError("a bug on this rank")

    monkeypatch.setattr(loop, "_train", fail)
    with pytest.raises(ValueError):
        loop.train(RunConfig())
    assert group_left_open()


_WORKER = textwrap.dedent(
    """
    import sys
    import torch.distributed as dist
    import snuggle.train.parallel  # a training worker has it loaded
    from snuggle.cli import main

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", world_size=1, rank=0)
    dist.broadcast_object_list([1], src=0)
    status = main({argv!r})
    print("interpreter shutdown reached", file=sys.stderr)  # never, while the group is open
    sys.exit(status)
    """
)


def test_a_worker_whose_group_is_open_exits_with_its_status_without_shutdown(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(port=_free_port(), argv=["train", str(tmp_path / "missing.yaml")]))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.count("snuggle: error: ") == 1  # its one line, flushed before leaving
    assert "interpreter shutdown reached" not in p.stderr
