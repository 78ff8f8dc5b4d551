"""`snuggle train | eval | export | generate`. Bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import traceback
import warnings
from pathlib import Path

from snuggle.errors import SnuggleError

__all__ = ["main"]

# snuggle.io.gguf_export.EXPORT_DTYPES, spelled out so that parsing arguments does not import gguf
GGUF_DTYPES = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "f32")
HF_DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}  # export --format hf --dtype
_TORCHRUN_WORKER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
EVAL_SEQ_LEN = 2048  # eval's default row length, capped at the model's positions


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
    import numpy as np

    from snuggle.config import DataConfig
    from snuggle.data import iterate_eval
    from snuggle.rebuild import load_with_adapter
    from snuggle.train.evaluate import evaluate
    from snuggle.train.setup import data_files, pack_rows

    if a.max_rows is not None and a.max_rows < 1:
        # zero rows would report loss 0 / perplexity 1 over 0 tokens, a result rather than an error
        raise SnuggleError(f"--max-rows must be >= 1, got {a.max_rows}")
    # named as the user typed it, before any model is read; a row of 1 token has nothing to predict
    for flag, value, least in (("--seq-len", a.seq_len, 2), ("--batch-size", a.batch_size, 1)):
        if value is not None and value < least:
            raise SnuggleError(f"{flag} must be >= {least}, got {value}")
    fmt, template = _eval_format(a.format, a.adapter)
    # the data as training reads it (its token cache too); seq_len is settled once the model is read
    dc = DataConfig(
        train=a.data,
        format=fmt,
        text_field=a.text_field,
        chat_template=template,
        split=a.split,
        cache_dir=a.cache_dir,
    )
    files = data_files(dc)  # before the model: bad paths fail fast
    model, tok = load_with_adapter(a.model, a.adapter, dtype=a.dtype, device=a.device)
    limit = model.args.max_position_embeddings
    if a.seq_len is None:  # a small model's own limit rather than an error about a flag not typed
        a.seq_len = min(EVAL_SEQ_LEN, limit)
    elif a.seq_len > limit:
        raise SnuggleError(f"--seq-len {a.seq_len} is above the model's limit of {limit} positions")
    dc.seq_len = a.seq_len
    # a cache another tokenizer wrote would index past the embedding: refused, naming both sizes
    rows = pack_rows(dc, files, tok, model.args.vocab_size)
    idx = np.arange(len(rows))
    res = evaluate(model, iterate_eval(rows, idx, a.batch_size, a.max_rows), model.lm_head.weight.device)
    print(json.dumps({**res, "format": fmt}))
    return 0


def _eval_format(flag: str | None, adapter: str | None) -> tuple[str, str | None]:
    """eval's data format and chat template: --format, else the adapter run's data.format (an instruct
    run's held-out records score its replies as training did), else text. The template is the run's
    data.chat_template; None lets tokenize_instruct take the tokenizer's, then the fallback, as training
    does."""
    from snuggle.run_dir import is_run_dir, run_config

    run = run_config(adapter).data if adapter is not None and is_run_dir(Path(adapter)) else None
    fmt = flag or (run.format if run is not None else "text")
    template = run.chat_template if run is not None and run.format == "instruct" else None
    return fmt, template


def _hf_export_dtype(flag: str | None, source: dict):
    """The dtype a merged HF export is written in: --dtype, else the source checkpoint's own (its
    config.json's torch_dtype / dtype), else None (as loaded). The run is read on the CPU, where
    `dtype: auto` means fp32: a bf16 base would otherwise come back twice its size."""
    import torch

    name = HF_DTYPES[flag] if flag is not None else source.get("torch_dtype") or source.get("dtype")
    return getattr(torch, name) if name in HF_DTYPES.values() else None


def _cmd_export(a: argparse.Namespace) -> int:
    from snuggle.io.hf import check_chat_template_names
    from snuggle.rebuild import load_run

    out = Path(a.out)
    if a.with_base and a.format != "peft":
        raise SnuggleError("--with-base applies to --format peft (hf and gguf exports hold the whole model)")
    if a.dtype is not None and a.format == "peft":
        raise SnuggleError("--dtype applies to --format hf and gguf (a PEFT adapter keeps its fp32 factors)")
    if a.format == "hf" and a.dtype not in (None, *HF_DTYPES):
        raise SnuggleError(f"--format hf writes {', '.join(HF_DTYPES)} (got --dtype {a.dtype})")
    if a.format == "gguf":
        if out.exists():
            raise SnuggleError(f"--out {out} exists; give a new .gguf file name")
        if not out.parent.is_dir():
            raise SnuggleError(f"--out {out}: directory {out.parent} does not exist")
    elif out.exists() and not out.is_dir():
        raise SnuggleError(f"--out {out} is a file; give a new directory name")
    elif out.exists() and any(out.iterdir()):
        raise SnuggleError(f"--out {out} exists and is not empty")
    model, tok, cfg = load_run(a.run_dir, device="cpu", model_path=a.model)
    check_chat_template_names(tok, a.run_dir)  # named templates become files in the export: before writing
    try:
        _write_export(a, model, tok, cfg, out)
    except OSError as e:  # a read-only or full destination: the run is untouched, nothing half-written
        raise SnuggleError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    written = {"format": a.format, "out": str(out)}
    print(json.dumps({**written, "dtype": a.dtype or "f16"} if a.format == "gguf" else written))
    return 0


def _write_export(a: argparse.Namespace, model, tok, cfg, out: Path) -> None:
    from snuggle.io.hf import copy_generation_config, save_hf_checkpoint
    from snuggle.io.peft_format import merged_state_dict, save_peft_adapter

    if a.format == "gguf":
        from snuggle.io.gguf_export import write_gguf

        # LoRA merged in; written to a temp file and renamed, so no half-written .gguf is ever left
        write_gguf(model, tok, out, dtype=a.dtype or "f16")
        return
    # write beside the target, then rename: an interrupted export leaves no half-written model, and a
    # failed one (a full or read-only disk) leaves nothing
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if a.format == "hf":
            state = merged_state_dict(model)
            dtype = _hf_export_dtype(a.dtype, model.args.hf_config)
            if dtype is not None:
                state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
            save_hf_checkpoint(state, model.args.hf_config, tmp, tokenizer=tok)
            copy_generation_config(Path(cfg.model.path), tmp)  # load_run put --model there
        else:
            if not cfg.use_lora:
                raise SnuggleError(
                    "--format peft needs a LoRA run; this run was full fine-tuning (use --format hf)"
                )
            base_path = str(Path(cfg.model.path).resolve())
            if a.with_base:
                base_path = _write_base(cfg, tok, tmp / "base", final=out.resolve() / "base")
            elif Path(base_path).suffix.lower() == ".gguf":
                warnings.warn(_gguf_base_note(base_path), stacklevel=1)
            save_peft_adapter(model, cfg.lora, base_path, tmp)
            tok.save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_base(cfg, tok, where: Path, final: Path) -> str:
    """The run's base as an HF checkpoint in `where` (a GGUF base dequantized, in the dtype it loads in
    on the CPU), for `export --format peft --with-base`; returns `final`, the absolute path it will have
    once the export is renamed into place: PEFT loads the base from `base_model_name_or_path` as is,
    relative to the working directory, not to the adapter."""
    from snuggle.io.hf import copy_generation_config, save_hf_checkpoint
    from snuggle.io.peft_format import merged_state_dict
    from snuggle.load import load

    # no LoRA: the frozen weights as the run loaded them
    base, _ = load(cfg.model.path, dtype=cfg.model.dtype, device="cpu", with_tokenizer=False)
    save_hf_checkpoint(merged_state_dict(base), base.args.hf_config, where, tokenizer=tok)
    copy_generation_config(Path(cfg.model.path), where)
    return str(final)


def _gguf_base_note(base: str) -> str:
    # PEFT (AutoPeftModelForCausalLM) reads base_model_name_or_path with AutoModelForCausalLM, which
    # takes no .gguf path; transformers' own GGUF reader (gguf_file=) is not snuggle's, and its weights
    # can differ from the ones the adapter was trained on
    return (
        f"the base is a GGUF file ({Path(base).name}), which AutoPeftModelForCausalLM cannot load from "
        "base_model_name_or_path: export with --with-base to write the base beside the adapter as an HF "
        "model (dequantized, as snuggle trained on it) and record that instead"
    )


def _chat_template(tok, adapter: str | None, explicit: bool) -> str | None:
    """The template `generate --chat` renders with, chosen as training chose it: the adapter run's
    data.chat_template, else the tokenizer's, else (an instruct run, or --chat asked for) the fallback."""
    from snuggle.data.instruct import FALLBACK_TEMPLATE, has_chat_template, resolve_template
    from snuggle.run_dir import is_run_dir, run_config

    instruct_run = False
    if adapter is not None and is_run_dir(Path(adapter)):
        data = run_config(adapter).data
        instruct_run = data.format == "instruct"
        if instruct_run and data.chat_template is not None:
            return data.chat_template
    if has_chat_template(tok):
        return resolve_template(tok)
    return FALLBACK_TEMPLATE if instruct_run or explicit else None


def _cmd_generate(a: argparse.Namespace) -> int:
    import torch

    from snuggle.data.instruct import end_of_turn_ids, prompt_ids
    from snuggle.generate import generate
    from snuggle.rebuild import load_with_adapter

    if a.max_new_tokens < 1:
        raise SnuggleError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if not 0.0 <= a.temperature < math.inf:
        # NaN made every probability NaN (a traceback from multinomial), a negative one meant greedy
        # unannounced, inf uniform sampling
        raise SnuggleError(f"--temperature must be a finite number >= 0 (0: greedy), got {a.temperature}")
    if not 0.0 < a.top_p <= 1.0:
        # top-p 0 keeps no token at all, and multinomial would fail on the all-zero distribution
        raise SnuggleError(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.system is not None and a.chat is False:
        raise SnuggleError("--system needs chat mode (drop --no-chat)")
    model, tok = load_with_adapter(a.model, a.adapter, dtype=a.dtype, device=a.device)
    device = model.lm_head.weight.device
    template = _chat_template(tok, a.adapter, explicit=a.chat is True) if a.chat is not False else None
    chat = template is not None
    if a.system is not None and not chat:
        raise SnuggleError("--system needs chat mode, and the tokenizer has no chat template (add --chat)")
    stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    if chat:
        # the prompt is one user turn; the reply ends at the template's end-of-turn token
        messages = [{"role": "system", "content": a.system}] if a.system is not None else []
        messages.append({"role": "user", "content": a.prompt})
        ids = torch.tensor([prompt_ids(tok, messages, template)], device=device)
        stop |= end_of_turn_ids(tok, template)
    else:
        ids = tok(a.prompt, return_tensors="pt")["input_ids"].to(device)
    if ids.shape[1] == 0:
        # an empty prompt (or one the tokenizer drops entirely) gives no position to continue from:
        # start from BOS as HF generate does, or say so instead of failing inside the model
        if tok.bos_token_id is None:
            raise SnuggleError("--prompt encodes to no tokens and the tokenizer has no BOS token either")
        ids = torch.tensor([[tok.bos_token_id]], device=device)
    limit = model.args.max_position_embeddings
    if ids.shape[1] >= limit:
        raise SnuggleError(
            f"--prompt is {ids.shape[1]} tokens; the model has {limit} positions, so no token is left to add"
        )
    if ids.shape[1] + a.max_new_tokens > limit:
        warnings.warn(
            f"the prompt ({ids.shape[1]} tokens) and --max-new-tokens {a.max_new_tokens} exceed the model's "
            f"{limit} positions: generation stops after {limit - ids.shape[1]} tokens",
            stacklevel=1,
        )
    gen = torch.Generator(device=device).manual_seed(a.seed)
    out: list[int] = []
    printed = ""

    def stream(token: int) -> None:
        # decode the whole continuation each time: byte-level BPE pieces only form text in groups
        nonlocal printed
        out.append(token)
        text = tok.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text

    if not a.no_echo and not chat:  # a chat reply is printed alone: the prompt is a question, not its start
        sys.stdout.write(a.prompt)
    generate(
        model, ids, a.max_new_tokens, a.temperature, a.top_p, stop or None, on_token=stream, generator=gen
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
