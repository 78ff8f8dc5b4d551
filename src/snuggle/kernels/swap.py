"""Plug the fast paths into a `Decoder` in place, through its swap points, keeping every parameter as is.

Modules are replaced by subclasses built around the very same Parameter objects (`from_module`), so
parameter names, state dicts, optimizer parameter lists and isinstance checks (LoRA merge, PEFT export)
are unchanged. Functions are swapped only where the model still holds the reference, so a second call,
or a swap point someone else already customised, is left alone.
"""

from __future__ import annotations

from torch import nn

from snuggle.kernels.capabilities import triton_available

__all__ = ["apply_fast_path"]


def apply_fast_path(model: nn.Module) -> list[str]:
    """Swap Triton kernels into `model` (a `snuggle.model.decoder.Decoder`); returns what was swapped.

    RMSNorm modules (the Qwen3 q_norm/k_norm included) become FastRMSNorm, LoRALinear modules without
    dropout become FastLoRALinear, each Attention.rope_fn and MLP.act_fn the fused kernels, the
    projections that share an input one LoRA Function (`project`), SwiGLU part of the LoRA down
    projection's Function (`act_down`, which then keeps gate and up but not their product), the whole
    MLP one Function that keeps only its input where `MLP.recompute_gate_up` asks for it (`gate_up_down`), and
    `model.loss_fn` the fused linear cross-entropy, and, on CUDA, packed documents' attention goes
    through FlexAttention (`model.attention = "flex"`); CUDA NF4 weights dequantize with the Triton
    kernel (`NF4Weight.cuda_dequantize`). Without triton (or without CUDA and
    TRITON_INTERPRET=1) nothing changes and the list is empty.
    """
    if not triton_available():
        return []
    # imported here: these modules import triton, which `snuggle.kernels` itself must not need
    from snuggle.kernels.linear_ce import fused_linear_cross_entropy
    from snuggle.kernels.lora import FastLoRALinear, fast_project
    from snuggle.kernels.mlp import fast_gate_up_down
    from snuggle.kernels.nf4 import dequantize_nf4
    from snuggle.kernels.reference import LoRALinear, RMSNorm, cross_entropy_sum, rope_qk, swiglu
    from snuggle.kernels.rmsnorm import FastRMSNorm
    from snuggle.kernels.rope import fast_rope_qk
    from snuggle.kernels.swiglu import fast_act_down, fast_swiglu
    from snuggle.model.decoder import MLP, Attention, act_down, gate_up_down, project
    from snuggle.model.flex import flex_available
    from snuggle.quant.nf4 import NF4Weight, dequantize_nf4_reference

    if NF4Weight.cuda_dequantize is dequantize_nf4_reference:
        # class-wide (see NF4Weight.cuda_dequantize): also the 4-bit weights FSDP's sharded load makes later;
        # not listed in the result, which names what changed in this model
        NF4Weight.cuda_dequantize = staticmethod(dequantize_nf4)
    swapped: list[str] = []
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            if type(child) is RMSNorm:
                setattr(parent, name, FastRMSNorm.from_module(child))
                swapped.append(path)
            elif type(child) is LoRALinear and isinstance(child.dropout, nn.Identity):
                setattr(parent, name, FastLoRALinear.from_module(child))
                swapped.append(path)
        if isinstance(parent, Attention) and parent.rope_fn is rope_qk:
            parent.rope_fn = fast_rope_qk
            swapped.append(f"{prefix}.rope_fn")
        if isinstance(parent, MLP) and parent.act_fn is swiglu:
            parent.act_fn = fast_swiglu
            swapped.append(f"{prefix}.act_fn")
        if isinstance(parent, MLP) and parent.act_down is act_down:
            parent.act_down = fast_act_down
            swapped.append(f"{prefix}.act_down")
        if isinstance(parent, MLP) and parent.gate_up_down is gate_up_down:
            parent.gate_up_down = fast_gate_up_down
            swapped.append(f"{prefix}.gate_up_down")
        if isinstance(parent, (Attention, MLP)) and parent.project is project:
            parent.project = fast_project
            swapped.append(f"{prefix}.project")
    if getattr(model, "loss_fn", None) is cross_entropy_sum:
        model.loss_fn = fused_linear_cross_entropy
        swapped.append("loss_fn")
    weight = getattr(getattr(model, "lm_head", None), "weight", None)
    flex_ok = weight is not None and flex_available(weight.device) and model.args.head_dim >= 16
    if getattr(model, "attention", None) == "sdpa" and flex_ok:  # its CUDA kernel needs head_dim >= 16
        model.attention = "flex"  # packed documents through block-sparse FlexAttention
        swapped.append("attention")
    return swapped
