"""The distributed context of a run: the process group, the loop's collectives, and failure detection.

`init_distributed` joins the process group that `torchrun` (or `snuggle train --nproc N`) set up, or
does nothing in a single process; `DistContext` holds who this process is and the few collectives the
loop issues. Applying data parallelism to the model (DDP, FSDP2) is data_parallel.py.

Failure handling: every rank records its progress (a counter of the phases it entered, the same
sequence on every rank) in the rendezvous store before each phase that holds a collective. A
collective that fails or times out (`train.dist_timeout_s`) is then explained by the ranks that are
behind: "rank 1 stopped responding ...", instead of a bare backend error or a silent hang.

gloo raises the timeout in the waiting rank's Python thread, where `explain` turns it into that line.
NCCL does not: its own watchdog thread aborts the process ("Watchdog caught collective operation
timeout", naming only the rank that waited), and the main thread, blocked in a CUDA synchronisation,
never sees an exception. So on GPUs a small watchdog thread of ours (`start_watchdog`) reads the
heartbeats once this rank has been in one phase for `dist_timeout_s`: if a rank is behind, the lowest
rank that is not prints the same one-line error naming it, and every waiting rank exits (torchrun then
stops the rest). The backends' own timeout is set a grace period later (`watchdog_grace_s`), so ours
comes first; it stays the backstop for a hang that no heartbeat can place (every rank in the same phase).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from snuggle.errors import SnuggleError
from snuggle.train.gpu_link import configure_nccl_link

__all__ = [
    "DistContext",
    "RankError",
    "init_distributed",
    "rank_device",
    "group_left_open",
    "leave_now",
]

_HEARTBEAT_KEY = "snuggle/progress/{rank}"
WATCHDOG_EXIT_STATUS = 3  # a rank that gave up waiting for a hung peer (see start_watchdog)


def watchdog_grace_s(timeout_s: float) -> float:
    """How much later than our watchdog the backends' own timeout fires (NCCL's aborts the process)."""
    return max(30.0, 0.1 * timeout_s)


class RankError(SnuggleError):
    """A SnuggleError that every rank raises together; `silent` ranks leave the printing to rank 0."""

    def __init__(self, message: str, silent: bool = False):
        super().__init__(message)
        self.silent = silent


@dataclass
class DistContext:
    """Who this process is in the job, plus the few collectives the loop itself issues.

    With world_size 1 every method is a no-op or the identity, so the loop never branches on it.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    timeout_s: float = 600.0
    owns_group: bool = False  # we initialised the process group, so we tear it down
    link: str = ""  # how this machine's GPUs reach each other, for the plan line (gpu_link.py)
    _store: Any = field(default=None, repr=False)
    _seq: int = 0
    _phase: str = "setup"
    _phase_t: float = field(default_factory=time.monotonic)  # when this rank entered _phase
    _watchdog_stop: threading.Event | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives of the loop ------------------------------------------------------------------

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (decisions that read the shared filesystem are rank 0's)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed; call with each rank's own setup error (or None).

        Setup (output directory, model, data) is validated on every rank before the first collective
        that could block: a rank that fails alone would otherwise leave the others waiting in their
        first all-reduce until the timeout. The failing rank re-raises its own error (keeping its
        traceback when it is a bug); the others raise the first failing rank's message.
        """
        if not self.enabled:
            if error is not None:
                raise error
            return
        msg = None
        if error is not None:
            msg = str(error) if isinstance(error, SnuggleError) else f"{type(error).__name__}: {error}"
        msgs = self.all_gather_object(msg)
        failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
        if not failed:
            return
        first, first_msg = failed[0]
        if error is not None and isinstance(error, SnuggleError):
            # rank 0 prints; a rank that failed with a message of its own prints that one too
            raise RankError(str(error), silent=not self.is_main and msgs[0] == msg) from None
        if error is not None:
            raise error
        where = "" if first == 0 else f"rank {first}: "
        raise RankError(f"{where}{first_msg}", silent=not self.is_main)

    @contextlib.contextmanager
    def agreed(self, convert: Callable[[Exception], BaseException] | None = None) -> Iterator[None]:
        """Run the block, then `agree` on its error (or None): every rank raises if any rank's block failed.

        The block's exception is caught, so this rank still reaches the collective that the others are
        in; `convert` turns it into the error to report (an out-of-memory one into its one line).
        """
        error: BaseException | None = None
        try:
            yield
        except Exception as e:
            error = convert(e) if convert is not None else e
        self.agree(error)

    # -- progress and failure diagnosis -----------------------------------------------------------

    def heartbeat(self, phase: str) -> None:
        """Record that this rank entered `phase` (which may block in a collective)."""
        self._seq += 1
        self._phase = phase
        self._phase_t = time.monotonic()
        if self._store is not None:
            self._store.set(_HEARTBEAT_KEY.format(rank=self.rank), f"{self._seq}|{time.time():.3f}|{phase}")

    def explain(self, exc: BaseException) -> SnuggleError | None:
        """A one-line error naming the rank(s) at fault for a failed collective, or None (a plain bug).

        Ranks run the same sequence of phases, so a rank whose counter is behind ours is the one the
        collective waited for: it died or hangs. When nobody is behind, a backend error still gets
        its phase and rank; any other exception is left alone (it is this rank's own bug).
        """
        if not self.enabled:
            return None
        behind = self._behind()
        if behind:
            return SnuggleError(self._stalled_message(behind))
        if isinstance(exc, dist.DistError) or "gloo" in str(exc).lower() or "nccl" in str(exc).lower():
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return SnuggleError(
                f"a collective failed on rank {self.rank} in {self._phase}; another rank died or hung "
                f"inside this phase ({first})"
            )
        return None

    def _behind(self) -> dict[int, str]:
        """{rank: 'rank R (last seen ... in PHASE)'} for every rank whose phase counter is behind ours."""
        behind = {}
        now = time.time()
        for r in range(self.world_size):
            if r == self.rank:
                continue
            got = self._read_heartbeat(r)
            if got is None:
                continue
            seq, stamp, phase = got
            if seq < self._seq:
                behind[r] = f"rank {r} (last seen {now - stamp:.0f} s ago, in {phase})"
        return behind

    def _stalled_message(self, behind: dict[int, str]) -> str:
        return (
            f"{' and '.join(behind.values())} stopped responding; rank {self.rank} gave up waiting in "
            f"{self._phase} (train.dist_timeout_s={self.timeout_s:g})"
        )

    def check_stalled(self, now: float | None = None) -> tuple[str, bool] | None:
        """(the one-line error, whether this rank prints it) once this rank has waited `timeout_s` in
        its phase for a rank that is behind; None while nobody is behind or the wait is shorter.

        Of the ranks that see the stall, the lowest that is not behind prints, so the line appears once.
        """
        if not self.enabled or self._store is None:
            return None
        now = time.monotonic() if now is None else now
        if now - self._phase_t < self.timeout_s:
            return None
        behind = self._behind()
        if not behind:
            return None  # every rank is in this phase: a long phase, or a hang inside it (backstop)
        reporter = min(r for r in range(self.world_size) if r not in behind)
        return self._stalled_message(behind), reporter == self.rank

    def start_watchdog(self, poll_s: float = 1.0) -> None:
        """A daemon thread that ends this process with the rank-naming line when `check_stalled` says so.

        For NCCL, whose timeout never reaches Python (see the module doc). It only reads the store once
        the phase has outlasted the timeout, and then every few seconds, so it costs nothing per step.
        """
        if not self.enabled or self._store is None or self._watchdog_stop is not None:
            return
        stop = self._watchdog_stop = threading.Event()

        def watch() -> None:
            wait = poll_s
            while not stop.wait(wait):
                try:
                    stalled = self.check_stalled()
                except Exception:  # the store is gone: leave it to the backend's own timeout
                    return
                if stalled is None:
                    # past the timeout with nobody behind (a long phase): look again less often
                    wait = poll_s if time.monotonic() - self._phase_t < self.timeout_s else 5 * poll_s
                    continue
                message, prints = stalled
                if prints:
                    print(f"snuggle: error: {message}", file=sys.stderr, flush=True)
                # the main thread is blocked inside a collective or a CUDA synchronisation: only
                # leaving the process ends the wait; torchrun then stops the other ranks
                os._exit(WATCHDOG_EXIT_STATUS)

        threading.Thread(target=watch, name="snuggle-dist-watchdog", daemon=True).start()

    def stop_watchdog(self) -> None:
        if self._watchdog_stop is not None:
            self._watchdog_stop.set()

    def _read_heartbeat(self, r: int) -> tuple[int, float, str] | None:
        key = _HEARTBEAT_KEY.format(rank=r)
        try:
            if not self._store.check([key]):
                return None
            seq, stamp, phase = self._store.get(key).decode().split("|", 2)
            return int(seq), float(stamp), phase
        except Exception:  # the store itself is gone: no diagnosis, the original error stands
            return None

    def close(self) -> None:
        """Tear down the group we made, on every rank together: after success, or after an error that
        every rank raised at the same point (a RankError), never inside a collective.

        The group must not be left to interpreter shutdown. A backend's worker thread drops its last
        reference to a finished collective's tensors a moment after the waiting thread returns; when
        the process exits right after a collective (a refusal every rank raises at once), that release
        can come after Python is torn down, and freeing a tensor that has a Python object then aborts
        the process in C++ ("terminate called without an active exception", signal 6).
        `destroy_process_group` shuts the backends down, joining those threads, while Python is alive.

        FSDP and DDP state sits in reference cycles that refer to the group: collected first, so that
        it goes before the group. The barrier keeps a rank from tearing down while another still talks
        to it.
        """
        self.stop_watchdog()
        if not (self.owns_group and dist.is_initialized()):
            return
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def group_left_open() -> bool:
    """Whether this process still holds a process group: a failure its peers did not share left it.

    Read without importing torch.distributed, so that the CLI can ask after any command.
    """
    d = sys.modules.get("torch.distributed")
    return d is not None and d.is_available() and d.is_initialized()


def leave_now(status: int) -> NoReturn:
    """End a process whose group is still open after a failure, skipping interpreter shutdown.

    Its peers may be dead or blocked in a collective, so no rank can tear the group down with them
    (a barrier or a backend shutdown would wait on them). Left to interpreter shutdown, the backend's
    threads can free tensors after Python is gone and abort the process (see `DistContext.close`),
    turning the worker's exit status into signal 6. Output is flushed first; every file the run
    writes is already closed or atomically replaced by then.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise SnuggleError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def rank_device(requested: str) -> torch.device:
    """This process's device: `model.device`, with a GPU per rank (LOCAL_RANK) in a multi-process job."""
    from snuggle.load import resolve_device

    dev = resolve_device(requested)
    if dev.type != "cuda" or _env_int("WORLD_SIZE", 1) <= 1:
        return dev
    if dev.index is not None:
        raise SnuggleError(
            f"model.device={requested} would put every process on one GPU; use auto or cuda in a "
            "multi-process run (each process takes the GPU numbered by its LOCAL_RANK)"
        )
    local = _env_int("LOCAL_RANK", 0)
    if local >= torch.cuda.device_count():
        raise SnuggleError(
            f"local rank {local} has no GPU of its own: {torch.cuda.device_count()} visible; "
            "start at most that many processes per node"
        )
    return torch.device("cuda", local)


def _use_watchdog(device: torch.device) -> bool:
    """Our watchdog where the backend's timeout does not reach Python: NCCL, i.e. GPU training."""
    return device.type == "cuda"


def _check_launch_env(world: int) -> None:
    """The variables a hand-set multi-process job must give, checked before joining the group: without
    MASTER_ADDR / MASTER_PORT torch's env:// rendezvous raises a traceback, and a RANK outside the world
    would wait for peers that never come."""
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise SnuggleError(
            f"WORLD_SIZE={world} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
            "start multi-process training with `snuggle train --nproc N` or torchrun, which set them all"
        )
    rank, port = _env_int("RANK", 0), _env_int("MASTER_PORT", 0)
    if not 0 <= rank < world:
        raise SnuggleError(f"RANK={rank} is outside WORLD_SIZE={world}: ranks are 0 to {world - 1}")
    if not 0 < port < 65536:
        raise SnuggleError(f"MASTER_PORT={port} is not a TCP port (1 to 65535)")
    if _env_int("LOCAL_RANK", 0) < 0:
        raise SnuggleError(f"LOCAL_RANK={os.environ['LOCAL_RANK']} is negative")


def _attempt_store(world: int, timeout: timedelta) -> Any:
    """This worker group's own view of the store torchrun's agent keeps for the whole job, or None.

    The agent's store outlives a restart of the workers, and with it the keys of the group before:
    the addresses its dead ranks listened on (a restarted rank that read one would wait on it until
    the timeout) and their heartbeats. So each start of the group works under its own prefix: the
    restart count, and the world size for a restart that only admits or drops nodes.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # the store is made afresh for this group (env:// with rank 0 hosting it)
    addr, port = os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 0)
    store = dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"snuggle/start-{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}-of-{world}/", store)


def init_distributed(timeout_s: float, device: torch.device) -> DistContext:
    """Join the process group described by torchrun's environment (WORLD_SIZE, RANK, ...), if any.

    An existing default group (a caller that initialised it) is used as is and left open.
    """
    watchdog = _use_watchdog(device)
    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_world_size(), dist.get_rank(), _env_int("LOCAL_RANK", 0), timeout_s)
    else:
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return DistContext(timeout_s=timeout_s)
        if not dist.is_available():
            raise SnuggleError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        _check_launch_env(world)
        ctx = DistContext(world, _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), timeout_s, owns_group=True)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # GeForce cards without peer-to-peer need NCCL told so before its communicators start
            ctx.link = configure_nccl_link(single_node=_env_int("LOCAL_WORLD_SIZE", world) == world)
        # gloo beside NCCL: the few CPU-side collectives (object gathers) work whatever the device
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        # with our watchdog, the backends' own timeout is the later backstop (see the module doc)
        grace = watchdog_grace_s(timeout_s) if watchdog else 0.0
        timeout = timedelta(seconds=timeout_s + grace)
        store = _attempt_store(world, timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=ctx.rank, world_size=world, timeout=timeout)
    if ctx.world_size > 1:
        try:
            ctx._store = dist.distributed_c10d._get_default_store()
        except Exception:  # diagnosis is a courtesy; training works without it
            ctx._store = None
        ctx.heartbeat("setup")
        if watchdog:
            ctx.start_watchdog()
    return ctx
