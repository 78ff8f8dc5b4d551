"""`snuggle.load`: a model and its tokenizer from an HF directory or a GGUF file, local paths only.

The decoder is built on the meta device (no memory), then each checkpoint tensor is converted and
assigned as it is read, so peak memory stays at about one copy of the weights. With `quantize="nf4"`
each block projection is quantized as it arrives (on the target device), so host and device hold
about the 4-bit size plus one 16/32-bit tensor in flight.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from snuggle.errors import SnuggleError
from snuggle.io import hf
from snuggle.model.args import ModelArgs
from snuggle.model.decoder import Decoder
from snuggle.quant.bnb import bnb_dense_stream, is_bnb_4bit
from snuggle.quant.nf4 import QUANTIZABLE, NF4Weight

__all__ = ["load", "load_model_args", "resolve_dtype", "resolve_device", "QUANTIZE", "QUANTIZABLE"]

QUANTIZE = ("none", "nf4")

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


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, nf4: NF4Weight | None = None) -> bool:
    """Put `tensor` (or its 4-bit form `nf4`) in place of the (meta) parameter `name`.

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
    if nf4 is not None:
        del mod._parameters[leaf]
        setattr(mod, leaf, nf4)  # a submodule in the Parameter's place, under the same name
    else:
        mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    return True


def fill_weights(
    model: Decoder, tensors: Iterable[tuple[str, torch.Tensor]], dtype, device, quantize: str = "none"
) -> None:
    unexpected = []
    # quantize where it is fast: a model built on the CPU (FSDP shards it from there) on a machine with
    # a GPU quantizes each weight on this process's GPU and keeps the codes on the CPU (an 8B model:
    # seconds instead of minutes), as a single-GPU run quantizes on its GPU
    quant_dev = torch.device(device)
    if quant_dev.type == "cpu" and quantize == "nf4" and torch.cuda.is_available():
        quant_dev = torch.device("cuda", torch.cuda.current_device())
    for name, t in tensors:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and model.args.tie_word_embeddings:
            continue  # some tied checkpoints store the shared matrix twice
        nf4 = None
        if quantize == "nf4" and QUANTIZABLE.fullmatch(name) and t.ndim == 2:
            # from the checkpoint's own precision, on the target device (fast on a GPU); the dense
            # tensor is dropped as soon as its codes exist
            nf4 = NF4Weight.from_dense(t.to(quant_dev), dtype=dtype).to(device)
        if not _assign(model, name, t if nf4 is not None else t.to(device=device, dtype=dtype), nf4):
            unexpected.append(name)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise SnuggleError(f"checkpoint is missing tensors: {', '.join(missing[:5])}{more}")
    if unexpected:
        warnings.warn(
            f"ignored {len(unexpected)} checkpoint tensors the model does not use: {unexpected[:5]}",
            stacklevel=2,
        )


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
    dtype they compute in). A pre-quantized bitsandbytes 4-bit checkpoint loads either way: kept in
    4 bits with "nf4", else dequantized to `dtype`.
    """
    if quantize not in QUANTIZE:
        raise SnuggleError(f"unknown model.quantize {quantize!r}; use one of {', '.join(QUANTIZE)}")
    p, kind = _source(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if kind == "gguf":
        from snuggle.io import gguf

        args = ModelArgs.from_hf(gguf.read_gguf_config(p))
        tensors = gguf.iter_gguf_tensors(p, torch.float32)
        tokenizer = gguf.load_gguf_tokenizer(p) if with_tokenizer else None
    else:
        hf_cfg = hf.read_hf_config(p)
        args = ModelArgs.from_hf(hf_cfg)
        tensors = hf.iter_hf_tensors(p)
        if is_bnb_4bit(hf_cfg):
            tensors = bnb_dense_stream(tensors)
        tokenizer = hf.load_hf_tokenizer(p) if with_tokenizer else None
    with torch.device("meta"):
        model = Decoder(args)
    fill_weights(model, tensors, dt, dev, quantize)
    model.compute_dtype = dt
    model.source = str(p)
    model.eval()
    return model, tokenizer
