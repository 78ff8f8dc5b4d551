"""Read pre-quantized bitsandbytes 4-bit HF checkpoints (`*-bnb-4bit`) without bitsandbytes.

Such a checkpoint stores each quantized linear weight `X.weight` as packed codes plus its quantization
state under the same prefix (bitsandbytes' `QuantState.as_dict(packed=True)`):

    X.weight                                 uint8 (n/2, 1) (or another storage dtype viewed as bytes):
                                             the flattened (out, in) weight's 4-bit codes, even index in
                                             the high nibble
    X.weight.absmax                          fp32 (n/blocksize,), or uint8 when double-quantized
    X.weight.quant_map                       fp32 (16,): the code's levels (NF4 or FP4)
    X.weight.nested_absmax / nested_quant_map    the second quantization of absmax (double quant)
    X.weight.quant_state.bitsandbytes__nf4   uint8: JSON with shape, blocksize, dtype, nested_offset, ...

`bnb_dense_stream` turns a stream of such tensors into plain (name, fp32 weight) pairs, one weight at a
time, so a loader sees an ordinary checkpoint; with `model.quantize: nf4` the loader requantizes each
one, which keeps every 4-bit code (each block's absmax is the largest element, reproduced exactly).
`bnb_index` does the same for a checkpoint read by name (`name -> read()`): one entry per weight, whose
read gathers and dequantizes its parts.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Iterator

import torch

from snuggle.errors import SnuggleError

__all__ = ["is_bnb_4bit", "bnb_dense_stream", "bnb_index", "dequantize_bnb"]

_STATE_KEY = ".quant_state.bitsandbytes__"
_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def is_bnb_4bit(hf_config: dict) -> bool:
    """True for a config.json written by transformers for a bitsandbytes 4-bit model."""
    qc = hf_config.get("quantization_config") or {}
    if qc.get("quant_method") != "bitsandbytes":
        return False
    if qc.get("load_in_8bit"):
        raise SnuggleError(
            "bitsandbytes 8-bit checkpoints are not supported; use the 16-bit model or its -bnb-4bit version"
        )
    return True


def _blockwise(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, blocksize: int, n: int):
    """Flat fp32 values: levels[codes[i]] * absmax[i // blocksize], for the first n codes."""
    vals = levels.float()[codes[:n].long()]
    nblocks = math.ceil(n / blocksize)
    if absmax.numel() < nblocks:
        raise SnuggleError(f"bitsandbytes state has {absmax.numel()} block scales, {nblocks} needed")
    pad = nblocks * blocksize - n
    vals = torch.nn.functional.pad(vals, (0, pad)).view(nblocks, blocksize) * absmax[:nblocks, None].float()
    return vals.reshape(-1)[:n]


def dequantize_bnb(
    name: str, packed: torch.Tensor, parts: dict[str, torch.Tensor], state: dict
) -> torch.Tensor:
    """One bitsandbytes 4-bit weight back to fp32 of its recorded shape."""
    try:
        shape = tuple(int(s) for s in state["shape"])
        blocksize = int(state["blocksize"])
        n = math.prod(shape)
        absmax = parts["absmax"]
        if "nested_absmax" in parts:
            absmax = _blockwise(
                absmax.reshape(-1).view(torch.uint8),
                parts["nested_absmax"].reshape(-1),
                parts["nested_quant_map"].reshape(-1),
                int(state["nested_blocksize"]),
                absmax.numel(),
            ) + float(state["nested_offset"])
        data = packed.reshape(-1).contiguous().view(torch.uint8)  # any storage dtype: the bytes are codes
        if data.numel() * 2 < n:
            raise SnuggleError(f"{name}: {data.numel()} packed bytes cannot hold {n} 4-bit codes")
        codes = torch.stack(((data >> 4) & 15, data & 15), dim=-1).view(-1)
        levels = parts["quant_map"].reshape(-1)
        if levels.numel() != 16:
            raise SnuggleError(f"{name}: a 4-bit code map has 16 levels, this one {levels.numel()}")
        return _blockwise(codes, absmax.reshape(-1), levels, blocksize, n).view(shape)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise SnuggleError(f"{name}: unreadable bitsandbytes 4-bit state ({e})") from None


def bnb_dense_stream(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass plain tensors through; gather each 4-bit weight's parts and yield it dequantized (fp32).

    A weight is complete once its codes, its JSON state and every part the state implies have been seen;
    checkpoints keep them adjacent, so at most one weight's parts are held at a time in practice.
    """
    pending: dict[str, dict] = {}

    def complete(prefix: str) -> bool:
        p = pending[prefix]
        if (
            "weight" not in p
            or "state" not in p
            or "absmax" not in p["parts"]
            or "quant_map" not in p["parts"]
        ):
            return False
        return "nested_offset" not in p["state"] or {"nested_absmax", "nested_quant_map"} <= p["parts"].keys()

    for name, t in tensors:
        prefix, part = None, None
        if _STATE_KEY in name:
            prefix = name.split(_STATE_KEY)[0]
            state = json.loads(bytes(t.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
            if state.get("quant_type", "nf4") not in ("nf4", "fp4"):
                raise SnuggleError(f"{name}: unknown bitsandbytes quant_type {state.get('quant_type')!r}")
            pending.setdefault(prefix, {"parts": {}})["state"] = state
        else:
            head, _, leaf = name.rpartition(".")
            if leaf in _PARTS and head.endswith(".weight"):
                prefix, part = head, leaf
                pending.setdefault(prefix, {"parts": {}})["parts"][part] = t
            elif name in pending or name.endswith(".weight") and t.ndim == 2 and t.shape[1] == 1:
                # packed codes are stored as a column (n/2, 1), in uint8 or another storage dtype
                prefix = name
                pending.setdefault(prefix, {"parts": {}})["weight"] = t
            else:
                yield name, t
                continue
        if complete(prefix):
            p = pending.pop(prefix)
            yield prefix, dequantize_bnb(prefix, p["weight"], p["parts"], p["state"])
    if pending:
        raise SnuggleError(f"bitsandbytes 4-bit weights with missing parts: {sorted(pending)[:3]}")


Reader = Callable[[], torch.Tensor]


def _read_group(prefix: str, parts: list[tuple[str, Reader]]) -> torch.Tensor:
    dense = list(bnb_dense_stream((name, read()) for name, read in parts))
    if [name for name, _ in dense] != [prefix]:
        raise SnuggleError(f"{prefix}: unreadable bitsandbytes 4-bit weight (parts of other weights)")
    return dense[0][1]


def bnb_index(index: dict[str, Reader]) -> dict[str, Reader]:
    """`name -> read()` of a bitsandbytes 4-bit checkpoint -> the same with every 4-bit weight as one entry
    (its name, e.g. `...q_proj.weight`) whose read returns it dequantized (fp32); other tensors pass."""
    # a 4-bit weight is the prefix of its quant_state key; its parts all start with that prefix
    prefixes = {name.split(_STATE_KEY)[0] for name in index if _STATE_KEY in name}
    groups: dict[str, list[tuple[str, Reader]]] = {}
    out: dict[str, Reader] = {}
    for name, read in index.items():
        if _STATE_KEY in name:
            prefix = name.split(_STATE_KEY)[0]
        else:
            prefix = name if name in prefixes else name.rsplit(".", 1)[0]  # X.weight, X.weight.absmax
        if prefix in prefixes:
            if prefix not in groups:
                groups[prefix] = []
                out[prefix] = functools.partial(_read_group, prefix, groups[prefix])
            groups[prefix].append((name, read))
        else:
            out[name] = read
    return out
