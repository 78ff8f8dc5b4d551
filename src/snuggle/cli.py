"""`snuggle train | eval | export | generate`. Bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import traceback
import warnings
from pathlib import Path

from snuggle.api import EVAL_SEQ_LEN, GGUF_DTYPES
from snuggle.errors import SnuggleError

__all__ = ["main"]

_TORCHRUN_WORKER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _cmd_train(a: argparse.Namespace) -> int:
    from snuggle.config import load_config

    if a.max_restarts is not None:
        a.overrides = [*a.overrides, f"train.max_restarts={a.max_restarts}"]  # the workers see it too
    cfg = load_config(a.config, a.overrides)  # bad input fails here, once, before any process starts
    # already a worker that torchrun started: it sets all of these (a stray LOCAL_WORLD_SIZE left in a
    # shell alone must not turn --nproc N into one silent process)
    worker = all(k in os.environ for k in _TORCHRUN_WORKER_ENV)
    if a.nproc is not None and a.nproc < 1:
        raise SnuggleError(f"--nproc must be >= 1, got {a.nproc}")
    if worker and a.nproc is not None and int(os.environ["LOCAL_WORLD_SIZE"]) != a.nproc:
        raise SnuggleError(
            f"--nproc {a.nproc} but torchrun started {os.environ['LOCAL_WORLD_SIZE']} processes "
            "per node; give the count to one of them"
        )
    nproc = a.nproc or 1
    if not worker and (nproc > 1 or cfg.train.max_restarts):
        # restarts need a launcher that outlives the workers: torchrun's agent, even for one process
        from snuggle.train.loop import grad_accum_for_config

        grad_accum_for_config(cfg, nproc)  # a global batch N processes cannot divide: one line, now
        return _launch(nproc, [a.config, *a.overrides], cfg.train.max_restarts)
    from snuggle.train.loop import train

    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(_finite_or_null(summary), allow_nan=False))
    return int(summary.get("exit_status", 0))  # 128 + signal when SIGTERM/SIGINT stopped the run


def _finite_or_null(summary: dict) -> dict:
    """NaN and inf are not JSON (jq and JSON.parse refuse them): a non-finite number is null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}


def _launch(nproc: int, train_args: list[str], max_restarts: int = 0) -> int:
    """`snuggle train --nproc N`: torchrun on this machine, in this process, with the same arguments.

    The elastic agent watches the workers: when one exits with an error, it stops the others, and
    either starts them all again (`max_restarts` times; they resume from `latest`) or returns. A
    SIGTERM / SIGINT to the launcher (Ctrl-C, a scheduler) is passed on to the workers, which
    checkpoint the step and stop, rank 0 saying so in one line; the launcher then exits 128 + the
    signal, as one process does.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun would set 1 with a four-line banner; the host's cores shared out keep CPU runs fast
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if "LOGLEVEL" not in os.environ:
        # the agent's own notes on a signal ("Received 2 death signal", "Sending process ... closing
        # signal") and on a failed worker ("failed (exitcode: 2) local_rank: ...") are torch's wording
        # of the one line snuggle prints (rank 0's error, or the rank that ended first)
        for name in (
            "torch.distributed.elastic.agent.server.api",
            "torch.distributed.elastic.multiprocessing.api",
            "torch.distributed.elastic.multiprocessing.errors",
        ):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}",
            "-m",
            "snuggle",
            "train",
            *train_args,
        ]
    )
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        status = failure.exitcode
        if status == 2:
            return 2  # a worker's own one-line error (bad input), printed by rank 0: the only line
        how = f"exit status {status}" if status >= 0 else f"signal {-status}"
        print(
            f"snuggle: error: training failed: rank {rank} ended first ({how}); see its output above",
            file=sys.stderr,
        )
        return status if status > 0 else 1
    except SignalException as e:
        # the agent has sent the signal on and waited for the workers to checkpoint and exit
        return 128 + int(e.sigval)
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from snuggle.api import evaluate

    res = evaluate(
        a.model,
        a.data,
        adapter=a.adapter,
        seq_len=a.seq_len,
        batch_size=a.batch_size,
        max_rows=a.max_rows,
        format=a.format,
        text_field=a.text_field,
        split=a.split,
        cache_dir=a.cache_dir,
        dtype=a.dtype,
        device=a.device,
    )
    print(json.dumps(res))
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from snuggle.api import export

    print(
        json.dumps(
            export(a.run_dir, a.out, format=a.format, model=a.model, dtype=a.dtype, with_base=a.with_base)
        )
    )
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from snuggle.api import generate

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    generate(
        a.model,
        a.prompt,
        adapter=a.adapter,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        seed=a.seed,
        chat=a.chat,
        system=a.system,
        dtype=a.dtype,
        device=a.device,
        on_text=show,
        echo=not a.no_echo,
    )
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from snuggle import __version__

    p = argparse.ArgumentParser(prog="snuggle", description="Continued pretraining and LoRA fine-tuning.")
    p.add_argument("--version", action="version", version=f"snuggle {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML config")
    t.add_argument("config", help="YAML config file (see docs/config.md)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 lora.r=64")
    t.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes on this machine (one per GPU): torchrun in one step",
    )
    t.add_argument(
        "--max-restarts",
        type=int,
        default=None,
        help="restart the workers up to this many times when one fails; they resume from latest "
        "(train.max_restarts)",
    )
    t.set_defaults(fn=_cmd_train)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", required=True, help="HF model directory or .gguf file")
        sp.add_argument("--adapter", help="snuggle run directory or PEFT adapter directory")
        sp.add_argument(
            "--dtype",
            default=None,
            help="float32, bfloat16, float16 or auto (default: auto; with a run directory as --adapter, "
            "the run's model.dtype)",
        )
        sp.add_argument(
            "--device",
            default="auto",
            help="auto (a CUDA GPU when there is one, else cpu), cpu, cuda or cuda:N",
        )

    e = sub.add_parser("eval", help="held-out loss and perplexity of a model on a corpus")
    model_args(e)
    e.add_argument("--data", required=True, help="file, directory or glob")
    e.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help=f"row length in tokens (default {EVAL_SEQ_LEN}, or the model's limit when that is smaller)",
    )
    e.add_argument("--batch-size", type=int, default=1, help="rows per forward (default 1)")
    e.add_argument("--max-rows", type=int, default=None, help="evaluate at most this many rows")
    e.add_argument(
        "--format",
        choices=("text", "instruct"),
        default=None,
        help="data.format of --data: text scores every token, instruct only the replies, rendered with "
        "the chat template training uses (default: the --adapter run's data.format, else text)",
    )
    e.add_argument("--text-field", default="text", help="--format text: the field holding the text")
    e.add_argument("--split", default=None, help="split of a datasets DatasetDict directory (default train)")
    e.add_argument(
        "--cache-dir", default=None, help="token cache directory (default $SNUGGLE_CACHE or ~/.cache/snuggle)"
    )
    e.set_defaults(fn=_cmd_eval)

    x = sub.add_parser(
        "export", help="write a trained run as a merged HF model, a PEFT adapter or a merged GGUF file"
    )
    x.add_argument(
        "run_dir", help="a snuggle run directory (train.output_dir); its latest checkpoint is exported"
    )
    x.add_argument(
        "--format",
        choices=("hf", "peft", "gguf"),
        default="hf",
        help="hf: the LoRA merged into the base, safetensors and tokenizer (default); peft: the adapter "
        "alone, for PEFT; gguf: the merged model as one .gguf file (llama.cpp, Ollama)",
    )
    x.add_argument("--out", required=True, help="directory (hf, peft) or .gguf file (gguf)")
    x.add_argument(
        "--model",
        default=None,
        help="the base model, where it is now (default: the model.path the run recorded; for a run "
        "moved to another machine)",
    )
    x.add_argument(
        "--dtype",
        choices=GGUF_DTYPES,
        default=None,
        help="gguf: type of the matrices (default f16); hf: f16, bf16 or f32 (default: the base's own)",
    )
    x.add_argument(
        "--with-base",
        action="store_true",
        help="peft: also write the base model as an HF checkpoint in OUT/base (a GGUF base dequantized) and "
        "record it as base_model_name_or_path, so AutoPeftModelForCausalLM.from_pretrained(OUT) loads",
    )
    x.set_defaults(fn=_cmd_export)

    g = sub.add_parser("generate", help="continue a prompt")
    model_args(g)
    g.add_argument("--prompt", required=True, help="the text to continue (chat mode: the user's message)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add at most (default 64)")
    g.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)"
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample from the smallest set of tokens of this mass (default 1)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    g.add_argument("--no-echo", action="store_true", help="print only the continuation")
    g.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap --prompt as one user message in the chat template and print the reply "
        "(default: on when the tokenizer or the adapter run has a chat template); --no-chat sends raw text",
    )
    g.add_argument("--system", default=None, help="chat mode: a system message before the prompt")
    g.set_defaults(fn=_cmd_generate)
    return p


_PACKAGE_DIR = Path(__file__).resolve().parent


def one_line(msg: str) -> str:
    """A message as one line: names and values quoted from input files may hold line breaks (a tensor
    name, a split name, a foreign library's message), and an error is one line whatever it quotes."""
    return " ".join(part.strip() for part in msg.splitlines() if part.strip())


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """snuggle's own warnings (truncated examples, GGUF fallbacks, ...) are messages to the user, not code
    locations: one line, as errors are. Warnings raised elsewhere keep Python's format."""
    if issubclass(category, UserWarning) and Path(filename).resolve().is_relative_to(_PACKAGE_DIR):
        return f"snuggle: warning: {one_line(str(message))}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # snuggle loads local paths only; never reach for a hub
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse stops filling `overrides` at the first option: `train C.yaml --nproc 2 a=1` leaves
        # `a=1` over, and it is an override like the ones before the option
        if args.command != "train" or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        status = args.fn(args)
    except SnuggleError as e:
        # in a multi-process run every rank raises an error the ranks agreed on; rank 0 prints it
        if not getattr(e, "silent", False):
            rank = int(os.environ.get("RANK", "0"))
            where = f"[rank {rank}] " if rank else ""
            print(f"snuggle: error: {where}{one_line(str(e))}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("snuggle: interrupted", file=sys.stderr)
        status = 130
    except Exception:
        if not _group_left_open():
            raise
        traceback.print_exc()  # a bug: its traceback, then the same exit as any failed worker
        status = 1
    if _group_left_open():
        # a worker that failed without its peers: its process group cannot be torn down with them
        from snuggle.train.parallel import leave_now

        leave_now(status)
    return status


def _group_left_open() -> bool:
    # only a training worker ever joins a group, and it has imported torch.distributed by then
    if "snuggle.train.parallel" not in sys.modules:
        return False
    from snuggle.train.parallel import group_left_open

    return group_left_open()


if __name__ == "__main__":
    sys.exit(main())
