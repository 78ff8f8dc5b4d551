"""Small helpers shared by the kernel launchers (not public API)."""

from __future__ import annotations

import functools
import os

import torch

__all__ = [
    "interpreting",
    "use_triton",
    "num_warps_for",
    "reduction_programs",
    "rebind",
    "patch_interpreter",
]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether a kernel can take this tensor: compiled Triton needs CUDA memory; the interpreter takes CPU."""
    return t.is_cuda or interpreting()


def num_warps_for(elements: int) -> int:
    """Warps for a program that holds `elements` values in registers: ~16 values a thread, 4 to 32 warps."""
    return max(4, min(32, elements // 512))


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def reduction_programs(device: torch.device) -> int:
    """Programs for a grid-stride reduction: two per SM keeps every SM busy with few partial sums.

    Under the interpreter a handful is enough, and still more than one, so the partial-sum path is exercised.
    """
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 3


def rebind(cls: type, module: torch.nn.Module):
    """An instance of `cls` with `module`'s state: the same Parameter/buffer/child objects, in the same order.

    The registries (_parameters, _modules, hook dicts, ...) are copied as containers, not shared, so a later
    change to one module does not leak into the other; the tensors inside are the same objects, so state
    dicts, parameter names and optimizer parameter lists see no difference.
    """
    new = cls.__new__(cls)
    for key, value in vars(module).items():
        new.__dict__[key] = value.copy() if isinstance(value, (dict, set)) else value
    return new


def patch_interpreter() -> None:
    """Make triton 3.6's interpreter (TRITON_INTERPRET=1) run loops with runtime bounds under numpy >= 2.4.

    The interpreter turns a scalar kernel argument into a 1-element array and a `range(0, n, BLOCK)` bound
    into `int(array)`, which numpy 2.4 refuses for ndim > 0 (triton-lang/triton#9171, fixed upstream after
    3.6). We re-register that one conversion with `.item()`. A no-op outside the interpreter, and once done.
    """
    if not interpreting():
        return
    from triton.runtime import interpreter

    orig = interpreter._patch_lang_tensor
    if getattr(orig, "_snuggle_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._snuggle_patched = True
    interpreter._patch_lang_tensor = patched
