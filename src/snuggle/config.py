"""Run configuration: one typed dataclass per component, loaded from YAML with dotted overrides.

Unknown keys and wrong types are errors that name the key; the resolved config is saved with every run
(`<output_dir>/config.yaml`) so a run can be resumed, exported or reproduced from its directory alone.
Every key is documented in docs/config.md.

Every field says whether its value shapes the loss curve: `curve_field(default)` for one that does (the
model, LoRA, data and optimization settings: a resume with another value continues another curve, so it
is refused unless train.allow_config_change), `run_field(default)` for one that does not (where output
goes, how it is logged, when checkpoints and evaluations happen, how the work is spread and computed).
The resume fingerprint (`snuggle.train.checkpoint.curve_fingerprint`) is built from these marks, and a
test refuses a field without one: a new field takes one of the two, e.g.
`reduce_dtype: str = curve_field("float32")` or `timeout_s: float = run_field(600.0)`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import reprlib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from snuggle.errors import SnuggleError

MAX_LR = 10.0  # train.lr / embedding_lr: AdamW moves a weight by about lr a step

__all__ = [
    "CURVE",
    "REPORTER_NAMES",
    "curve_field",
    "curve_keys",
    "run_field",
    "ModelConfig",
    "LoraConfig",
    "DataConfig",
    "TrainConfig",
    "RunConfig",
    "load_config",
    "make_config",
    "config_from_dict",
    "to_dict",
    "with_absolute_paths",
]


CURVE = "curve"  # the dataclass field metadata key: True if the field's value shapes the loss curve


def curve_field(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A config field whose value shapes the loss curve (part of the resume fingerprint)."""
    return field(default=default, metadata={CURVE: True}, **kw)


def run_field(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A config field that does not shape the loss curve (output, logging, scheduling, placement, speed)."""
    return field(default=default, metadata={CURVE: False}, **kw)


def curve_keys(section: type) -> list[str]:
    """The names of a config dataclass's fields that shape the loss curve, in their order. A field without
    a mark counts as one (a change to it is named on resume, never ignored); a test asks for the mark."""
    return [f.name for f in dataclasses.fields(section) if f.metadata.get(CURVE, True)]


# train.report_to values (snuggle.train.reporters implements them)
REPORTER_NAMES: tuple[str, ...] = ("tensorboard", "wandb")


@dataclass
class ModelConfig:
    path: str = curve_field("")  # HF model directory or .gguf file (local)
    dtype: str = curve_field("auto")  # auto | bfloat16 | float16 | float32 (auto: bf16 on GPU, fp32 on CPU)
    device: str = run_field("auto")  # auto | cpu | cuda | cuda:N
    # start from trained LoRA factors: a snuggle run directory (its latest checkpoint) or a PEFT adapter
    # directory; a new stage, so the optimizer and the step counter start afresh
    adapter: str | None = curve_field(None)
    # none | nf4 | fp8: a quantized frozen base (every block projection; LoRA trains on top in `dtype`):
    # nf4 is QLoRA's 4 bits, fp8 float8 e4m3 with FP8 GEMMs (GPUs of compute capability 8.9+, or the CPU)
    quantize: str = curve_field("none")


@dataclass
class LoraConfig:
    enabled: bool = curve_field(True)
    r: int = curve_field(16)
    alpha: float = curve_field(16.0)
    dropout: float = curve_field(0.0)
    rslora: bool = curve_field(False)
    targets: str | list[str] = curve_field("all-linear")
    # embed_tokens and lm_head as full trainable copies at embedding_lr
    train_embeddings: bool = curve_field(False)


@dataclass
class DataConfig:
    # file, directory or glob (.txt .jsonl .json .parquet, HF datasets dirs)
    train: str | list[str] = curve_field("")
    # instruct: Alpaca or chat records, loss on the replies
    format: Literal["text", "instruct"] = curve_field("text")
    # field holding the text in .jsonl/.json/.parquet/datasets (format text)
    text_field: str = curve_field("text")
    chat_template: str | None = curve_field(None)  # instruct: Jinja template overriding the tokenizer's
    split: str | None = curve_field(None)  # split of a DatasetDict directory (default: train)
    seq_len: int = curve_field(2048)
    val_fraction: float = curve_field(0.01)  # share of packed rows held out for evaluation
    cache_dir: str | None = run_field(None)  # token cache; default $SNUGGLE_CACHE or ~/.cache/snuggle


@dataclass
class TrainConfig:
    steps: int = curve_field(100)  # optimizer steps (shapes the curve through a decaying schedule)
    # batch_size and grad_accum shape the curve only through the global batch, their product with the
    # number of processes, which the resume fingerprint records by itself (train.global_batch)
    batch_size: int = run_field(1)  # rows per micro-batch per process
    grad_accum: int = run_field(1)  # micro-batches per optimizer step
    # rows (sequences) an optimizer step over every process; set, it derives grad_accum from the world size
    global_batch: int | None = run_field(None)
    global_batch_tokens: int | None = run_field(None)  # the same in tokens: global_batch x data.seq_len
    lr: float = curve_field(2e-4)
    embedding_lr: float | None = curve_field(None)  # lr of embed_tokens/lm_head when trained; default lr
    weight_decay: float = curve_field(0.0)
    betas: list[float] = curve_field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = curve_field(0)
    schedule: Literal["cosine", "linear", "constant"] = curve_field("cosine")
    min_lr_ratio: float = curve_field(0.0)  # lr at the end of the schedule, as a fraction of the peak
    max_grad_norm: float | None = curve_field(1.0)  # clip the global gradient norm; null disables
    # adamw8bit: 8-bit moments (2 bytes a trainable parameter, not 8); for full fine-tuning and embeddings
    optimizer: Literal["adamw", "adamw8bit"] = curve_field("adamw")
    # stop (with a checkpoint) after this many non-finite steps in a row; 0: never
    max_bad_steps: int = run_field(5)
    eval_every: int = run_field(0)  # steps between evaluations (0: only at the end)
    eval_rows: int | None = run_field(None)  # cap on held-out rows per evaluation (None: all)
    save_every: int = run_field(0)  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = run_field(2)  # newest checkpoints kept on disk
    log_every: int = run_field(1)  # steps between metrics.jsonl rows
    output_dir: str = run_field("runs/snuggle")
    seed: int = curve_field(3407)
    resume: bool | Literal["auto"] = run_field(
        False
    )  # auto: continue this run if output_dir holds it, else start
    allow_config_change: bool = run_field(False)  # resume even though settings that shape the curve changed
    # recompute blocks in backward (less memory, ~30% slower); null (auto): as the memory plan needs
    gradient_checkpointing: bool | None = run_field(None)
    # GiB this process may use on its GPU (null: the whole card); the plan fits checkpointing, offload
    # and MLP tiling into it, and the allocator is held to it
    memory_budget_gib: float | None = run_field(None)
    # with gradient_checkpointing: how many blocks (None: all)
    checkpoint_layers: int | None = run_field(None)
    offload_activations: bool = run_field(False)  # checkpointed blocks keep their inputs in pinned CPU memory
    # trained embeddings' optimizer state and fp32 master: gpu, cpu (updated there), auto (the memory plan)
    embedding_offload: Literal["auto", "gpu", "cpu"] = run_field("auto")
    # auto: Triton fast path on CUDA, PyTorch elsewhere
    kernels: Literal["auto", "triton", "torch"] = run_field("auto")
    progress: bool = run_field(True)  # progress bar on stderr
    parallel: Literal["auto", "none", "ddp", "fsdp"] = run_field("auto")  # data parallelism across processes
    # the dtype gradients are reduced in across processes: bfloat16 halves the bytes on the link (and
    # rounds each rank's gradient to bf16 before the sum, so it shapes the curve)
    reduce_dtype: Literal["float32", "bfloat16"] = curve_field("float32")
    # a collective waiting longer for a dead or hung rank fails the run
    dist_timeout_s: float = run_field(600.0)
    max_restarts: int = run_field(
        0
    )  # `snuggle train --nproc N`: restarts of the workers after one fails (resume auto)
    report_to: str | list[str] = run_field(default_factory=list)  # tensorboard, wandb (metrics.jsonl always)
    wandb_project: str = run_field("snuggle")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)  # null: full fine-tuning
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        if not self.model.path:
            raise SnuggleError("model.path is required")
        if not self.data.train:
            raise SnuggleError("data.train is required")
        for key, val in (("model.adapter", self.model.adapter), ("data.cache_dir", self.data.cache_dir)):
            if val is not None and not str(val).strip():
                # an empty path would mean the working directory, silently; null is how to say "none"
                raise SnuggleError(f"{key} is empty: give a path, or null for none")
        t = self.train
        for key, val, lo in (
            ("train.steps", t.steps, 1),
            ("train.batch_size", t.batch_size, 1),
            ("train.grad_accum", t.grad_accum, 1),
            ("data.seq_len", self.data.seq_len, 2),
            ("train.warmup_steps", t.warmup_steps, 0),
            ("train.eval_every", t.eval_every, 0),
            ("train.save_every", t.save_every, 0),
            ("train.log_every", t.log_every, 1),
            ("train.keep_checkpoints", t.keep_checkpoints, 1),
            ("train.max_restarts", t.max_restarts, 0),
            ("train.seed", t.seed, 0),  # numpy's generators take non-negative seeds only
        ):
            if val < lo:
                raise SnuggleError(f"{key} must be >= {lo}, got {val}")
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise SnuggleError(f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}")
        if t.lr <= 0 or (t.embedding_lr is not None and t.embedding_lr <= 0):
            raise SnuggleError("train.lr and train.embedding_lr must be > 0")
        for key, lr in (("lr", t.lr), ("embedding_lr", t.embedding_lr)):
            # AdamW moves each weight by about lr a step: far above 1 nothing trains, and near float32's
            # range torch's optimizer overflows in its first step
            if lr is not None and lr > MAX_LR:
                raise SnuggleError(
                    f"train.{key}={lr:g} is above {MAX_LR:g}: AdamW steps that large do not train"
                )
        # the checks below catch values that torch would reject with a traceback (dropout, betas) or,
        # worse, accept silently: negative decay/clip norm/min lr turn descent into ascent, eval_rows=0
        # reports an eval loss of 0, alpha=0 makes the adapter a constant no-op
        if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
            raise SnuggleError(f"train.betas must be a list of two numbers in [0, 1), got {t.betas}")
        if t.weight_decay < 0:
            raise SnuggleError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
        if not 0.0 <= t.min_lr_ratio <= 1.0:
            raise SnuggleError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
        if t.max_grad_norm is not None and t.max_grad_norm < 0:
            raise SnuggleError(f"train.max_grad_norm must be >= 0 (null disables), got {t.max_grad_norm}")
        if t.dist_timeout_s <= 0:
            raise SnuggleError(f"train.dist_timeout_s must be > 0, got {t.dist_timeout_s}")
        _check_global_batch(t, self.data.seq_len)
        if t.max_restarts and t.resume is False:
            raise SnuggleError(
                f"train.max_restarts={t.max_restarts} restarts the workers to continue from latest: "
                "set train.resume=auto"
            )
        if t.eval_rows is not None and t.eval_rows < 1:
            raise SnuggleError(f"train.eval_rows must be >= 1 (or null for all), got {t.eval_rows}")
        if isinstance(t.report_to, str):
            t.report_to = [t.report_to]  # `report_to: wandb` means the list of that one
        for name in t.report_to:
            if name not in REPORTER_NAMES:
                raise SnuggleError(
                    f"train.report_to: unknown reporter {name!r}; known: {', '.join(REPORTER_NAMES)}"
                )
        if len(set(t.report_to)) != len(t.report_to):
            raise SnuggleError(f"train.report_to names a reporter twice: {t.report_to}")
        if not t.wandb_project.strip():
            raise SnuggleError("train.wandb_project must not be empty")
        d = self.data
        if d.chat_template is not None and d.format != "instruct":
            raise SnuggleError("data.chat_template applies to data.format=instruct only")
        if d.chat_template is not None and not d.chat_template.strip():
            raise SnuggleError("data.chat_template must be a non-empty Jinja template (or null)")
        if d.split is not None and not d.split.strip():
            raise SnuggleError("data.split must be a split name (or null for 'train')")
        if self.model.adapter is not None and not self.use_lora:
            raise SnuggleError(
                "model.adapter needs LoRA (lora.enabled=true); to fully fine-tune a trained model, "
                "export it with `snuggle export RUN --format hf` and give that as model.path"
            )
        if self.model.quantize not in ("none", "nf4", "fp8"):
            raise SnuggleError(f"model.quantize must be none, nf4 or fp8, got {self.model.quantize!r}")
        if self.model.quantize != "none" and not self.use_lora:
            bits = "4 bits" if self.model.quantize == "nf4" else "8 bits"
            raise SnuggleError(
                f"model.quantize={self.model.quantize} freezes the base in {bits}: it needs LoRA "
                "(lora.enabled=true); full fine-tuning trains 16-bit weights"
            )
        if self.lora is not None and self.lora.enabled:
            if self.lora.r < 1:
                raise SnuggleError(f"lora.r must be >= 1, got {self.lora.r}")
            if self.lora.alpha <= 0:
                raise SnuggleError(f"lora.alpha must be > 0, got {self.lora.alpha}")
            if not 0.0 <= self.lora.dropout < 1.0:
                raise SnuggleError(f"lora.dropout must be in [0, 1), got {self.lora.dropout}")
        return self

    @property
    def use_lora(self) -> bool:
        return self.lora is not None and self.lora.enabled


def _check_global_batch(t: TrainConfig, seq_len: int) -> None:
    """train.global_batch / global_batch_tokens replace grad_accum: one of the three names the step."""
    if t.global_batch is not None and t.global_batch_tokens is not None:
        raise SnuggleError("set train.global_batch or train.global_batch_tokens, not both")
    key, value = (
        ("global_batch", t.global_batch)
        if t.global_batch is not None
        else ("global_batch_tokens", t.global_batch_tokens)
    )
    if value is None:
        return
    if value < 1:
        raise SnuggleError(f"train.{key} must be >= 1, got {value}")
    if t.grad_accum != 1:
        raise SnuggleError(
            f"train.{key} and train.grad_accum={t.grad_accum} both size the step: set one (with a global "
            "batch, grad_accum follows from the number of processes and batch_size)"
        )
    if key == "global_batch_tokens" and value % seq_len:
        raise SnuggleError(
            f"train.global_batch_tokens={value} is not a whole number of rows of data.seq_len={seq_len} "
            "tokens: use a multiple of it"
        )


# PyYAML implements YAML 1.1, whose float pattern needs a dot and a signed exponent: `lr: 1e-4` and
# `train.lr=1e-4` arrive as the *string* '1e-4'. Float fields accept that spelling (see _type_ok).
_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce: int -> float) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            ok, v = _type_ok(value, arm)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (arm,) = typing.get_args(tp)
        out = []
        for v in value:
            ok, v2 = _type_ok(v, arm)
            if not ok:
                return False, value
            out.append(v2)
        return True, out
    if tp is float:
        # NaN and inf are never meant: `lr: .nan` would pass every `<= 0` check and train on garbage
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(value), float(value) if _finite(value) else value
        if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
            return _finite(float(value)), float(value)
        return False, value
    if tp is int:
        # int64: every count, size and seed ends up in numpy or torch
        ok = isinstance(value, int) and not isinstance(value, bool) and _INT64[0] <= value <= _INT64[1]
        return ok, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        # a NUL byte is never part of a path, name or template (the OS rejects it in paths with a traceback)
        return isinstance(value, str) and "\x00" not in value, value
    return isinstance(value, tp), value


_INT64 = (-(2**63), 2**63 - 1)
# values quoted in error messages: a YAML alias bomb or a megabyte string still gives one short line
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 80, 80, 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_MAX_CONFIG_BYTES = 16 << 20  # a config is a small YAML file; reading stops here (think /dev/zero)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _quote(value: Any) -> str:
    r = _REPR.repr(value)
    return r if len(r) <= 160 else r[:157] + "..."


def _why(value: Any, tp: Any) -> str:
    """What is wrong with a value that failed _type_ok, beyond its type."""
    if isinstance(value, float) and not math.isfinite(value):
        return " (a finite number)"
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        return " (within the 64-bit integer range)"
    if isinstance(value, str) and "\x00" in value:
        return " (without NUL characters)"
    return ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):  # a section: say what it is, not our class's module path
        return "a mapping of its keys (see docs/config.md)"
    if (sub := _dataclass_arm(tp)) is not None:  # lora: LoraConfig | None
        return f"{_type_name(sub)} or null"
    if typing.get_origin(tp) is typing.Union:  # resume: bool | Literal["auto"] (a Literal makes a Union)
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise SnuggleError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            name = _quote(key)[1:-1] if isinstance(key, str) else _quote(key)
            raise SnuggleError(
                f"unknown config key '{prefix}{name}';{_did_you_mean(key, fields, prefix)} known: "
                f"{', '.join(fields)}"
            )
        tp = hints[key]
        sub = _dataclass_arm(tp)
        if sub is not None and isinstance(value, dict):
            kwargs[key] = _build(sub, value, f"{prefix}{key}.")
            continue
        ok, v = _type_ok(value, tp)
        if not ok:
            raise SnuggleError(
                f"config key '{prefix}{key}' must be {_type_name(tp)}{_why(value, tp)}, got {_quote(value)}"
            )
        kwargs[key] = v
    return cls(**kwargs)


def _did_you_mean(key: Any, fields: dict, prefix: str) -> str:
    """' did you mean 'train.steps'?' for a mistyped key (stpes, seqlen), or nothing when none is close."""
    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key.lower(), list(fields), n=1, cutoff=0.6)
    return f" did you mean '{prefix}{close[0]}'?" if close else ""


def _dataclass_arm(tp: Any) -> type | None:
    for arm in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(arm):
            return arm
    return None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    old = node.get(keys[-1])
    # a mapping over a mapping sets the keys it names, as `section.key=value` does for each: replacing
    # the section, `train={steps: 3}` silently dropped the file's lr and output_dir. null still replaces
    node[keys[-1]] = _merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value


def _merged(old: dict, new: dict) -> dict:
    out = dict(old)
    for k, v in new.items():
        out[k] = _merged(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _read_config(p: Path) -> str:
    try:
        with open(p, "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise SnuggleError(f"cannot read config {p}: {e.strerror or e}") from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise SnuggleError(f"{p}: larger than {_MAX_CONFIG_BYTES >> 20} MiB; a config is a small YAML file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SnuggleError(f"{p}: not UTF-8 text (invalid byte at offset {e.start})") from None


def _parse_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, every failure one line: syntax errors, but also what PyYAML lets escape from its
    constructors (an impossible date is a ValueError, 5000-digit integers too) and deep nesting."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SnuggleError(f"{where}: invalid YAML ({first})") from None
    except (ValueError, OverflowError) as e:
        raise SnuggleError(f"{where}: invalid YAML value ({' '.join(str(e).split())[:120]})") from None
    except RecursionError:
        raise SnuggleError(f"{where}: invalid YAML (nested too deeply)") from None
    _refuse_duplicate_keys(text, where)
    return tree


def _refuse_duplicate_keys(text: str, where: str) -> None:
    """A key given twice in one mapping is an error naming both lines. PyYAML keeps the last silently, so
    a second `train:` section would drop every setting of the first (its lr, its output_dir) unnoticed.

    Walks the composed node graph (nodes only, nothing constructed), each node once: an alias bomb
    stays linear, and the text already parsed, so composing it cannot fail differently."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return  # safe_load accepted it; nothing more to say than it did
    seen: set[int] = set()
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    ident = (key.tag, key.value)
                    if ident in first_line:
                        raise SnuggleError(
                            f"{where}:{line}: key {_quote(key.value)} given twice in one mapping "
                            f"(first at line {first_line[ident]}); YAML would keep only the last one"
                        )
                    first_line[ident] = line
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (may be None) + `a.b=value` overrides (values parsed as YAML) -> validated RunConfig."""
    return make_config(path, overrides)


def make_config(
    source: RunConfig | Mapping[str, Any] | str | Path | None,
    overrides: Mapping[str, Any] | Iterable[str] = (),
) -> RunConfig:
    """A validated RunConfig from a RunConfig, a nested mapping or a YAML path (None: all defaults), with
    overrides applied: `{"train.steps": 50}` (values as given) or `["train.steps=50"]` (values read as
    YAML, as the command line gives them). The source is never modified."""
    if isinstance(source, RunConfig):
        tree = to_dict(source)
    elif isinstance(source, Mapping):
        tree = copy.deepcopy(dict(source))
    elif source is None:
        tree = {}
    elif isinstance(source, (str, Path)):
        p = Path(source)
        tree = _parse_yaml(_read_config(p), str(p)) or {}
        if not isinstance(tree, dict):
            raise SnuggleError(f"{p}: the config must be a YAML mapping")
    else:
        raise SnuggleError(f"a config is a RunConfig, a mapping or a YAML path, got {type(source).__name__}")
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            if not isinstance(key, str) or not key.strip():
                raise SnuggleError(f"override key {_quote(key)} must look like section.key")
            _set_dotted(tree, key.strip(), copy.deepcopy(value))
    else:
        if isinstance(overrides, str):
            overrides = [overrides]  # one `k=v` string, not its characters
        for ov in overrides:
            key, value = _parse_override(ov)
            _set_dotted(tree, key, value)
    return config_from_dict(tree)


def _parse_override(ov: str) -> tuple[str, Any]:
    """`section.key=value` -> (dotted key, value read as YAML, or the text itself where it is not YAML)."""
    key, sep, raw = ov.partition("=")
    if not sep or not key.strip():
        raise SnuggleError(f"override {_quote(ov)} must look like section.key=value")
    if "\x00" in ov:
        raise SnuggleError(f"override {_quote(ov)} contains a NUL character")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except (yaml.YAMLError, ValueError, OverflowError):
        value = raw  # not YAML: the text itself (a path with a ': ' in it, ...)
    except RecursionError:
        raise SnuggleError(f"override {_quote(ov)}: value nested too deeply") from None
    return key.strip(), value


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from a nested dict (a parsed YAML file or a saved run's config)."""
    if not isinstance(tree, dict):
        raise SnuggleError(f"the config must be a mapping of sections, got {type(tree).__name__}")
    tree = dict(tree)
    if "lora" in tree and tree["lora"] is None:
        tree["lora"] = {"enabled": False}  # `lora: null` means full fine-tuning
    return _build(RunConfig, tree, "").validate()


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _absolute(p: str) -> str:
    return os.path.abspath(os.path.expanduser(p))


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy whose input paths (model.path, model.adapter, data.train, data.cache_dir) are absolute, as
    the run directory records them: `snuggle export RUN` and `generate --adapter RUN` read the run's
    config.yaml from any working directory, where a relative model.path would name nothing (or another
    model). Globs stay globs; output_dir is left as given."""
    m, d = cfg.model, cfg.data
    train = _absolute(d.train) if isinstance(d.train, str) else [_absolute(f) for f in d.train]
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            m, path=_absolute(m.path), adapter=None if m.adapter is None else _absolute(m.adapter)
        ),
        data=dataclasses.replace(
            d, train=train, cache_dir=None if d.cache_dir is None else _absolute(d.cache_dir)
        ),
    )
