"""`snuggle.load`: a model and its tokenizer from an HF directory or a GGUF file, local paths only.

The decoder is built on the meta device (no memory), then each checkpoint tensor is converted and
assigned as it is read, so peak memory stays at about one copy of the weights. With `quantize="nf4"`
each block projection is quantized as it arrives (on the target device), so host and device hold
about the 4-bit size plus one 16/32-bit tensor in flight; `quantize="fp8"` likewise, to float8 e4m3.

`load_deferred` is the loader of FSDP's sharded load: it reads only the root (embeddings, final norm,
lm_head) and leaves the decoder blocks on the meta device; `model.deferred_blocks` then reads one block
when asked (`apply_parallel` shards each block right after), so a process never holds more than one
block of the base besides the root and its own shards.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from snuggle.errors import SnuggleError
from snuggle.io import hf
from snuggle.model.args import ModelArgs
from snuggle.model.decoder import Decoder
from snuggle.quant.base import QuantizedWeight
from snuggle.quant.bnb import bnb_dense_stream, bnb_index, is_bnb_4bit
from snuggle.quant.fp8 import FP8Weight, check_fp8_device
from snuggle.quant.nf4 import QUANTIZABLE, NF4Weight

__all__ = [
    "load",
    "load_deferred",
    "DeferredBlocks",
    "load_model_args",
    "resolve_dtype",
    "resolve_device",
    "QUANTIZE",
    "QUANTIZABLE",
]

QUANTIZE = ("none", "nf4", "fp8")
_QUANTIZED = {"nf4": NF4Weight, "fp8": FP8Weight}  # the frozen weight each format stores

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# tensors some checkpoints carry that are derived, not learned
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_BLOCK_NAME = re.compile(r"model\.layers\.(\d+)\.")
Reader = Callable[[], torch.Tensor]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SnuggleError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SnuggleError(f"device {device!r} asked for, but this torch build sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SnuggleError(
            f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible"
        )
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None/'auto': bf16 on a GPU that has it, else fp32 (CPU bf16 matmuls are slow and lossy)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise SnuggleError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, auto")
    return _DTYPES[dtype]


def _source(path: str | Path) -> tuple[Path, str]:
    p = Path(path).expanduser()
    if not p.exists():
        raise SnuggleError(f"model path not found: {p}")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return p, "gguf"
        raise SnuggleError(f"{p}: unsupported model file (expected a .gguf file or an HF model directory)")
    ggufs = sorted(p.glob("*.gguf"))
    if not (p / "config.json").is_file() and len(ggufs) == 1:
        return ggufs[0], "gguf"
    return p, "hf"


def load_model_args(path: str | Path) -> ModelArgs:
    p, kind = _source(path)
    if kind == "gguf":
        from snuggle.io.gguf import read_gguf_config

        return ModelArgs.from_hf(read_gguf_config(p))
    return ModelArgs.from_hf(hf.read_hf_config(p))


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, quant: QuantizedWeight | None = None) -> bool:
    """Put `tensor` (or its quantized form `quant`) in place of the (meta) parameter `name`.

    False if the model has no such parameter.
    """
    mod_name, _, leaf = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        return False
    old = mod._parameters.get(leaf)
    if old is None:
        return False
    if tuple(old.shape) != tuple(tensor.shape):
        raise SnuggleError(
            f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the config implies {tuple(old.shape)}"
        )
    if quant is not None:
        del mod._parameters[leaf]
        setattr(mod, leaf, quant)  # a submodule in the Parameter's place, under the same name
    elif old.requires_grad:
        # a trainable copy made while the weight was still on the meta device (full fine-tuning of a
        # deferred block): the checkpoint value in the model dtype, then copied to the trainable's own
        # dtype (fp32), as lora.enable_full_finetune copies a loaded weight
        mod._parameters[leaf] = nn.Parameter(tensor.to(old.dtype, copy=True), requires_grad=True)
    else:
        mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    return True


def _skipped(name: str, args: ModelArgs) -> bool:
    """Checkpoint tensors that are not read at all: derived ones, and a tied lm_head stored twice."""
    return name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and args.tie_word_embeddings)


def _quant_device(device: torch.device, quantize: str) -> torch.device:
    # quantize where it is fast: a model built on the CPU (FSDP shards it from there) on a machine with
    # a GPU quantizes each weight on this process's GPU and keeps the codes on the CPU (an 8B model:
    # seconds instead of minutes), as a single-GPU run quantizes on its GPU
    quant_dev = torch.device(device)
    if quant_dev.type == "cpu" and quantize in _QUANTIZED and torch.cuda.is_available():
        quant_dev = torch.device("cuda", torch.cuda.current_device())
    return quant_dev


def _fill(
    model: Decoder, tensors: Iterable[tuple[str, torch.Tensor]], dtype, device, quantize: str
) -> list[str]:
    """Assign each checkpoint tensor to its parameter (quantized where asked); the names nothing took."""
    unexpected = []
    quant_dev = _quant_device(device, quantize)
    for name, t in tensors:
        if _skipped(name, model.args):
            continue
        quant = None
        if quantize in _QUANTIZED and QUANTIZABLE.fullmatch(name) and t.ndim == 2:
            # from the checkpoint's own precision, on the target device (fast on a GPU); the dense
            # tensor is dropped as soon as its codes exist
            quant = _QUANTIZED[quantize].from_dense(t.to(quant_dev), dtype=dtype).to(device)
        if not _assign(model, name, t if quant is not None else t.to(device=device, dtype=dtype), quant):
            unexpected.append(name)
    return unexpected


def _missing_error(missing: list[str]) -> SnuggleError:
    more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
    return SnuggleError(f"checkpoint is missing tensors: {', '.join(missing[:5])}{more}")


def _warn_unexpected(unexpected: list[str]) -> None:
    if unexpected:
        warnings.warn(
            f"ignored {len(unexpected)} checkpoint tensors the model does not use: {unexpected[:5]}",
            stacklevel=3,
        )


def fill_weights(
    model: Decoder, tensors: Iterable[tuple[str, torch.Tensor]], dtype, device, quantize: str = "none"
) -> None:
    unexpected = _fill(model, tensors, dtype, device, quantize)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise _missing_error(missing)
    _warn_unexpected(unexpected)


def _open(
    p: Path, kind: str, with_tokenizer: bool, lazy: bool
) -> tuple[ModelArgs, Iterable[tuple[str, torch.Tensor]] | dict[str, Reader], object]:
    """(ModelArgs, tensors, tokenizer) of the source `_source` found: tensors as a stream of
    (name, tensor), or with `lazy` as `name -> read()` (nothing read yet)."""
    if kind == "gguf":
        from snuggle.io import gguf

        args = ModelArgs.from_hf(gguf.read_gguf_config(p))
        if lazy:
            tensors = gguf.gguf_tensor_index(p, torch.float32)
        else:
            tensors = gguf.iter_gguf_tensors(p, torch.float32)
        tokenizer = gguf.load_gguf_tokenizer(p) if with_tokenizer else None
    else:
        hf_cfg = hf.read_hf_config(p)
        args = ModelArgs.from_hf(hf_cfg)
        tensors = hf.hf_tensor_index(p) if lazy else hf.iter_hf_tensors(p)
        if is_bnb_4bit(hf_cfg):
            tensors = bnb_index(tensors) if lazy else bnb_dense_stream(tensors)
        tokenizer = hf.load_hf_tokenizer(p) if with_tokenizer else None
    return args, tensors, tokenizer


def _check_quantize(quantize: str) -> None:
    if quantize not in QUANTIZE:
        raise SnuggleError(f"unknown model.quantize {quantize!r}; use one of {', '.join(QUANTIZE)}")


def _begin(path, dtype, device, with_tokenizer: bool, quantize: str, lazy: bool):
    """`load` and `load_deferred` start here: (path, device, dtype, ModelArgs, tensors, tokenizer)."""
    _check_quantize(quantize)
    p, kind = _source(path)
    dev = resolve_device(device)
    if quantize == "fp8":
        check_fp8_device(dev)  # one line here rather than at the first GEMM
    dt = resolve_dtype(dtype, dev)
    args, tensors, tokenizer = _open(p, kind, with_tokenizer, lazy)
    return p, dev, dt, args, tensors, tokenizer


def _meta_decoder(args: ModelArgs) -> Decoder:
    with torch.device("meta"):
        model = Decoder(args)
    # frozen until the run says what trains: a parameter that requires grad when its tensor arrives
    # is a trainable copy made on the meta model (see _assign)
    return model.requires_grad_(False)


def _finish(model: Decoder, dt: torch.dtype, p: Path) -> None:
    model.compute_dtype = dt
    model.source = str(p)
    model.eval()


def load(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    with_tokenizer: bool = True,
    quantize: str = "none",
):
    """Load `(model, tokenizer)` from an HF model directory or a `.gguf` file.

    `model(input_ids)` returns logits (B, T, V). dtype None picks bf16 on a GPU, fp32 on CPU.
    `quantize="nf4"` stores every block projection in 4 bits (QLoRA's frozen base; `dtype` is then the
    dtype they compute in); `quantize="fp8"` stores them in float8 e4m3 with a scale per output channel
    (`snuggle.quant.fp8`: FP8 GEMMs on GPUs of compute capability 8.9+, an fp32 reference on the CPU).
    A pre-quantized bitsandbytes 4-bit checkpoint loads either way: kept in
    4 bits with "nf4", else dequantized to `dtype`.
    """
    p, dev, dt, args, tensors, tokenizer = _begin(path, dtype, device, with_tokenizer, quantize, lazy=False)
    model = _meta_decoder(args)
    fill_weights(model, tensors, dt, dev, quantize)
    _finish(model, dt, p)
    return model, tokenizer


@dataclass
class DeferredBlocks:
    """The decoder blocks of a model from `load_deferred`, read one block at a time by `fill`.

    `fill(model, i)` reads block i's tensors (quantizing as `load` does) into the block's meta
    parameters, keeping whatever was made on the meta model since: LoRA wrappers (whose factors are
    real already), trainable fp32 copies of full fine-tuning, the fast-path modules.
    """

    readers: dict[int, dict[str, Reader]]  # layer -> its tensors by name
    dtype: torch.dtype
    device: torch.device
    quantize: str
    done: set[int] = field(default_factory=set)

    def fill(self, model: Decoder, i: int) -> None:
        if i in self.done:
            return
        _trim_host_heap()  # the previous block's whole tensors are gone (sharded): return their pages
        tensors = ((name, read()) for name, read in self.readers.get(i, {}).items())
        _fill(model, tensors, self.dtype, self.device, self.quantize)
        block = model.model.layers[i]
        missing = [f"model.layers.{i}.{n}" for n, p in block.named_parameters() if p.is_meta]
        if missing:  # load_deferred checked the names: a gap here is a bug, not a bad checkpoint
            raise _missing_error(missing)
        block.to(self.device)  # LoRA factors drawn while the block was on meta live on the CPU
        self.done.add(i)

    def fill_all(self, model: Decoder) -> None:
        for i in range(len(model.model.layers)):
            self.fill(model, i)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def _trim_host_heap() -> None:
    """Give freed heap memory back to the OS (glibc only; elsewhere a no-op).

    A block's tensors (a few MB each) come from the heap, not from their own mappings, and the shards
    kept from them are allocated in between: without a trim the holes they leave add up to a tenth of
    the model in resident memory over a sharded load (measured on a 16-block model).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def load_deferred(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    with_tokenizer: bool = True,
    quantize: str = "none",
):
    """`load`, except that the decoder blocks stay on the meta device: `(model, tokenizer)`, with
    `model.deferred_blocks` (a `DeferredBlocks`) to read them later, one block at a time.

    Only the root's tensors (embeddings, final norm, lm_head) are read here. Every failure a checkpoint
    can be known to cause from its names (missing tensors) is raised here, before any block is read.
    """
    p, dev, dt, args, index, tokenizer = _begin(path, dtype, device, with_tokenizer, quantize, lazy=True)
    model = _meta_decoder(args)
    params = {n for n, _ in model.named_parameters()}
    readers: dict[int, dict[str, Reader]] = {}
    root: dict[str, Reader] = {}
    for name, read in index.items():
        if _skipped(name, args):
            continue
        m = _BLOCK_NAME.match(name)
        if m is not None and name in params:
            readers.setdefault(int(m.group(1)), {})[name] = read
        else:
            root[name] = read  # the root's tensors, and names no parameter has (warned about below)
    deferred = {n for block in readers.values() for n in block}
    unexpected = _fill(model, ((n, read()) for n, read in root.items()), dt, dev, quantize)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and n not in deferred]
    if missing:
        raise _missing_error(missing)
    _warn_unexpected(unexpected)
    _finish(model, dt, p)
    model.deferred_blocks = DeferredBlocks(readers, dt, dev, quantize)
    return model, tokenizer
