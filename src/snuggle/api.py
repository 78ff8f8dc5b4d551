"""train, evaluate, generate and export from Python: what the `snuggle` verbs do, returning their results.

The command line is a thin layer over these functions, so a notebook and a shell run the same code:

    from snuggle import api
    summary = api.train("config.yaml", {"train.steps": 50})   # or a dict, or a RunConfig
    api.evaluate(model="/models/base", adapter=summary["output_dir"], data="heldout.jsonl")

Bad input raises SnuggleError with a one-line message, as the command line prints it. Arguments carry the
names of the command-line flags, so messages name them as `--flag`.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from snuggle.config import RunConfig, make_config
from snuggle.errors import SnuggleError

__all__ = ["train", "evaluate", "generate", "export", "EVAL_SEQ_LEN", "HF_DTYPES", "GGUF_DTYPES"]

# snuggle.io.gguf_export.EXPORT_DTYPES, spelled out so that parsing arguments does not import gguf
GGUF_DTYPES = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "f32")
HF_DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}  # export format hf, dtype
EVAL_SEQ_LEN = 2048  # evaluate's default row length, capped at the model's positions

ConfigSource = RunConfig | Mapping[str, Any] | str | Path


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # snuggle loads local paths only; never reach for a hub


def train(config: ConfigSource, overrides: Mapping[str, Any] | Iterable[str] = ()) -> dict[str, Any]:
    """Train as `snuggle train` does; returns the run's summary (output_dir, steps, final_loss, eval losses
    before and after; exit_status 128 + N when signal N stopped the run after a checkpoint).

    `config`: a RunConfig, a nested dict (the YAML's shape) or a YAML path. `overrides`: dotted keys,
    `{"train.steps": 50, "lora.r": 64}`, or the command line's `["train.steps=50"]`. Under torchrun every
    process calls it; rank 0 writes the run's files."""
    from snuggle.train.loop import train as run_training

    _offline()
    return run_training(make_config(config, overrides))


def evaluate(
    model: str | Path,
    data: str | Path | list[str],
    *,
    adapter: str | Path | None = None,
    seq_len: int | None = None,
    batch_size: int = 1,
    max_rows: int | None = None,
    format: str | None = None,
    text_field: str = "text",
    split: str | None = None,
    cache_dir: str | Path | None = None,
    dtype: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Held-out loss and perplexity of a model (plus an adapter: a snuggle run or a PEFT directory) on a
    corpus, as `snuggle eval` reports them: {loss, perplexity, tokens, format}.

    `format`: text scores every token, instruct only the replies (default: the adapter run's data.format,
    else text). `seq_len` defaults to 2048, or the model's limit when that is smaller."""
    import numpy as np

    from snuggle.config import DataConfig
    from snuggle.data import iterate_eval
    from snuggle.rebuild import load_with_adapter
    from snuggle.train.evaluate import evaluate as evaluate_rows
    from snuggle.train.setup import data_files, pack_rows

    _offline()
    if max_rows is not None and max_rows < 1:
        # zero rows would report loss 0 / perplexity 1 over 0 tokens, a result rather than an error
        raise SnuggleError(f"--max-rows must be >= 1, got {max_rows}")
    # named before any model is read; a row of 1 token has nothing to predict
    for flag, value, least in (("--seq-len", seq_len, 2), ("--batch-size", batch_size, 1)):
        if value is not None and value < least:
            raise SnuggleError(f"{flag} must be >= {least}, got {value}")
    adapter = None if adapter is None else str(adapter)
    fmt, template = _eval_format(format, adapter)
    # the data as training reads it (its token cache too); seq_len is settled once the model is read
    dc = DataConfig(
        train=[str(d) for d in data] if isinstance(data, list) else str(data),
        format=fmt,
        text_field=text_field,
        chat_template=template,
        split=split,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    files = data_files(dc)  # before the model: bad paths fail fast
    net, tok = load_with_adapter(str(model), adapter, dtype=dtype, device=device)
    limit = net.args.max_position_embeddings
    if seq_len is None:  # a small model's own limit rather than an error about a length not asked for
        seq_len = min(EVAL_SEQ_LEN, limit)
    elif seq_len > limit:
        raise SnuggleError(f"--seq-len {seq_len} is above the model's limit of {limit} positions")
    dc.seq_len = seq_len
    # a cache another tokenizer wrote would index past the embedding: refused, naming both sizes
    rows = pack_rows(dc, files, tok, net.args.vocab_size)
    idx = np.arange(len(rows))
    res = evaluate_rows(net, iterate_eval(rows, idx, batch_size, max_rows), net.lm_head.weight.device)
    return {**res, "format": fmt}


def _eval_format(flag: str | None, adapter: str | None) -> tuple[str, str | None]:
    """evaluate's data format and chat template: `format`, else the adapter run's data.format (an instruct
    run's held-out records score its replies as training did), else text. The template is the run's
    data.chat_template; None lets tokenize_instruct take the tokenizer's, then the fallback, as training
    does."""
    from snuggle.run_dir import is_run_dir, run_config

    if flag not in (None, "text", "instruct"):
        raise SnuggleError(f"--format is text or instruct, got {flag!r}")
    run = run_config(adapter).data if adapter is not None and is_run_dir(Path(adapter)) else None
    fmt = flag or (run.format if run is not None else "text")
    template = run.chat_template if run is not None and run.format == "instruct" else None
    return fmt, template


def generate(
    model: str | Path,
    prompt: str,
    *,
    adapter: str | Path | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool | None = None,
    system: str | None = None,
    dtype: str | None = None,
    device: str = "auto",
    on_text: Callable[[str], None] | None = None,
    echo: bool = False,
) -> str:
    """Continue `prompt` as `snuggle generate` does and return the new text (without the prompt).

    `chat` None: wrap the prompt as one user turn when the tokenizer (or the adapter run) has a chat
    template; the reply stops at the template's end-of-turn token. `temperature` 0 is greedy.
    `on_text` receives each piece of text as it forms (for streaming); with `echo` it receives the prompt
    first, in raw-text mode (a chat reply comes alone: the prompt is a question, not its start)."""
    import torch

    from snuggle.data.instruct import end_of_turn_ids, prompt_ids
    from snuggle.generate import generate as sample
    from snuggle.rebuild import load_with_adapter

    _offline()
    if max_new_tokens < 1:
        raise SnuggleError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 <= temperature < math.inf:
        # NaN made every probability NaN (a traceback from multinomial), a negative one meant greedy
        # unannounced, inf uniform sampling
        raise SnuggleError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        # top-p 0 keeps no token at all, and multinomial would fail on the all-zero distribution
        raise SnuggleError(f"--top-p must be in (0, 1], got {top_p}")
    if system is not None and chat is False:
        raise SnuggleError("--system needs chat mode (drop --no-chat)")
    adapter = None if adapter is None else str(adapter)
    net, tok = load_with_adapter(str(model), adapter, dtype=dtype, device=device)
    where = net.lm_head.weight.device
    template = _chat_template(tok, adapter, explicit=chat is True) if chat is not False else None
    if system is not None and template is None:
        raise SnuggleError("--system needs chat mode, and the tokenizer has no chat template (add --chat)")
    stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    if template is not None:
        # the prompt is one user turn; the reply ends at the template's end-of-turn token
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": prompt})
        ids = torch.tensor([prompt_ids(tok, messages, template)], device=where)  # (1, T)
        stop |= end_of_turn_ids(tok, template)
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"].to(where)  # (1, T)
    if ids.shape[1] == 0:
        # an empty prompt (or one the tokenizer drops entirely) gives no position to continue from:
        # start from BOS as HF generate does, or say so instead of failing inside the model
        if tok.bos_token_id is None:
            raise SnuggleError("--prompt encodes to no tokens and the tokenizer has no BOS token either")
        ids = torch.tensor([[tok.bos_token_id]], device=where)
    limit = net.args.max_position_embeddings
    if ids.shape[1] >= limit:
        raise SnuggleError(
            f"--prompt is {ids.shape[1]} tokens; the model has {limit} positions, so no token is left to add"
        )
    if ids.shape[1] + max_new_tokens > limit:
        warnings.warn(
            f"the prompt ({ids.shape[1]} tokens) and --max-new-tokens {max_new_tokens} exceed the model's "
            f"{limit} positions: generation stops after {limit - ids.shape[1]} tokens",
            stacklevel=1,
        )
    gen = torch.Generator(device=where).manual_seed(seed)
    out: list[int] = []
    shown = ""

    def stream(token: int) -> None:
        # decode the whole continuation each time: byte-level BPE pieces only form text in groups
        nonlocal shown
        out.append(token)
        text = tok.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            if on_text is not None:
                on_text(text[len(shown) :])
            shown = text

    if echo and template is None and on_text is not None:
        on_text(prompt)
    sample(net, ids, max_new_tokens, temperature, top_p, stop or None, on_token=stream, generator=gen)
    return tok.decode(out, skip_special_tokens=True)


def _chat_template(tok, adapter: str | None, explicit: bool) -> str | None:
    """The template chat mode renders with, chosen as training chose it: the adapter run's
    data.chat_template, else the tokenizer's, else (an instruct run, or chat asked for) the fallback."""
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


def export(
    run_dir: str | Path,
    out: str | Path,
    *,
    format: str = "hf",
    model: str | Path | None = None,
    dtype: str | None = None,
    with_base: bool = False,
) -> dict[str, str]:
    """Write a trained run as `snuggle export` does: a merged HF model (`format="hf"`), a PEFT adapter
    (`"peft"`) or a merged GGUF file (`"gguf"`); returns {format, out[, dtype]}.

    `model`: the base where it is now, for a run moved to another machine. `dtype`: hf f16|bf16|f32
    (default the base's own); gguf f16|bf16|q8_0|q5_1|q5_0|q4_1|q4_0|f32 (default f16). `with_base`
    (peft): the base written beside the adapter as an HF model (a GGUF base dequantized, as snuggle trained
    on it) in `out/base`, and recorded as base_model_name_or_path, so that
    `AutoPeftModelForCausalLM.from_pretrained(out)` loads the run."""
    from snuggle.io.hf import check_chat_template_names
    from snuggle.rebuild import load_run

    _offline()
    out = Path(out)
    if format not in ("hf", "peft", "gguf"):
        raise SnuggleError(f"--format is hf, peft or gguf, got {format!r}")
    if with_base and format != "peft":
        raise SnuggleError("--with-base applies to --format peft (hf and gguf exports hold the whole model)")
    if dtype is not None and format == "peft":
        raise SnuggleError("--dtype applies to --format hf and gguf (a PEFT adapter keeps its fp32 factors)")
    if format == "hf" and dtype not in (None, *HF_DTYPES):
        raise SnuggleError(f"--format hf writes {', '.join(HF_DTYPES)} (got --dtype {dtype})")
    if format == "gguf":
        if dtype not in (None, *GGUF_DTYPES):
            raise SnuggleError(f"--format gguf writes {', '.join(GGUF_DTYPES)} (got --dtype {dtype})")
        if out.exists():
            raise SnuggleError(f"--out {out} exists; give a new .gguf file name")
        if not out.parent.is_dir():
            raise SnuggleError(f"--out {out}: directory {out.parent} does not exist")
    elif out.exists() and not out.is_dir():
        raise SnuggleError(f"--out {out} is a file; give a new directory name")
    elif out.exists() and any(out.iterdir()):
        raise SnuggleError(f"--out {out} exists and is not empty")
    net, tok, cfg = load_run(run_dir, device="cpu", model_path=model)
    check_chat_template_names(tok, run_dir)  # named templates become files in the export: before writing
    try:
        _write_export(format, dtype, net, tok, cfg, out, with_base)
    except OSError as e:  # a read-only or full destination: the run is untouched, nothing half-written
        raise SnuggleError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    written = {"format": format, "out": str(out)}
    return {**written, "dtype": dtype or "f16"} if format == "gguf" else written


def _hf_export_dtype(flag: str | None, source: dict):
    """The dtype a merged HF export is written in: `dtype`, else the source checkpoint's own (its
    config.json's torch_dtype / dtype), else None (as loaded). The run is read on the CPU, where
    `dtype: auto` means fp32: a bf16 base would otherwise come back twice its size."""
    import torch

    name = HF_DTYPES[flag] if flag is not None else source.get("torch_dtype") or source.get("dtype")
    return getattr(torch, name) if name in HF_DTYPES.values() else None


def _write_export(
    fmt: str, dtype: str | None, net, tok, cfg: RunConfig, out: Path, with_base: bool = False
) -> None:
    from snuggle.io.hf import copy_generation_config, save_hf_checkpoint
    from snuggle.io.peft_format import merged_state_dict, save_peft_adapter

    if fmt == "gguf":
        from snuggle.io.gguf_export import write_gguf

        # LoRA merged in; written to a temp file and renamed, so no half-written .gguf is ever left
        write_gguf(net, tok, out, dtype=dtype or "f16")
        return
    # write beside the target, then rename: an interrupted export leaves no half-written model, and a
    # failed one (a full or read-only disk) leaves nothing
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if fmt == "hf":
            state = merged_state_dict(net)
            to = _hf_export_dtype(dtype, net.args.hf_config)
            if to is not None:
                state = {k: t.to(to) if t.is_floating_point() else t for k, t in state.items()}
            save_hf_checkpoint(state, net.args.hf_config, tmp, tokenizer=tok)
            copy_generation_config(Path(cfg.model.path), tmp)  # load_run put `model` there
        else:
            if not cfg.use_lora:
                raise SnuggleError(
                    "--format peft needs a LoRA run; this run was full fine-tuning (use --format hf)"
                )
            base_path = str(Path(cfg.model.path).resolve())
            if with_base:
                base_path = _write_base(cfg, tok, tmp / "base", final=out.resolve() / "base")
            elif Path(base_path).suffix.lower() == ".gguf":
                warnings.warn(_gguf_base_note(base_path), stacklevel=1)
            save_peft_adapter(net, cfg.lora, base_path, tmp)
            tok.save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_base(cfg: RunConfig, tok, where: Path, final: Path) -> str:
    """The run's base as an HF checkpoint in `where` (a GGUF base dequantized, in the dtype it loads in
    on the CPU), for a PEFT export with its base; returns `final`, the absolute path it will have once
    the export is renamed into place: PEFT loads the base from `base_model_name_or_path` as is,
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
