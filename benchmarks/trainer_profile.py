"""Profile `snuggle train` itself, not a stand-in step: torch.profiler over a window of optimizer steps.

The window is stepped by a global optimizer post-hook, so the trainer runs unchanged (its data,
document masks, logging and syncs included). Prints the kernels by GPU time and the ops by host
time; with TRACE=FILE also writes a gzipped Chrome trace with Python stacks (FILE.gz), which shows
where a step's host time goes frame by frame.

  usage: python benchmarks/trainer_profile.py train CONFIG [k=v ...]
  environment: WAIT (default 12), ACTIVE (default 3), TRACE=out/trace.json (optional)

WAIT steps run unprofiled first (compilation, warm-up), then 2 warm-up steps of the profiler, then
ACTIVE profiled steps: the run needs at least WAIT + 2 + ACTIVE steps.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule


def report(p: profile) -> None:
    trace = os.environ.get("TRACE")
    if trace:
        p.export_chrome_trace(trace)
        with open(trace, "rb") as f, gzip.open(trace + ".gz", "wb") as g:
            shutil.copyfileobj(f, g)
        os.remove(trace)
    events = p.key_averages()
    gpu = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(events.table(sort_by=gpu, row_limit=25, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))


def main() -> None:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    wait, active = int(os.environ.get("WAIT", 12)), int(os.environ.get("ACTIVE", 3))
    prof = profile(
        activities=activities,
        schedule=schedule(wait=wait, warmup=2, active=active, repeat=1),
        on_trace_ready=report,
        with_stack=bool(os.environ.get("TRACE")),
    )
    register_optimizer_step_post_hook(lambda *_: prof.step())
    from snuggle.cli import main as snuggle_main

    sys.argv = ["snuggle", *sys.argv[1:]]
    prof.start()
    try:
        rc = snuggle_main()
    finally:
        prof.stop()
    raise SystemExit(rc)


if __name__ == "__main__":
    main()
