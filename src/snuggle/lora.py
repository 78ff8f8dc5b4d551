"""LoRA adapters and the choice of what trains: LoRA factors, full embedding copies, or everything.

Policy: frozen weights stay in the model dtype (bf16 on GPU); everything that trains is an fp32 copy,
because AdamW updates at lr 1e-5 vanish below bf16's resolution (~3 significant digits). Modules cast
weights to the activation dtype at use, so an fp32 embedding or LoRA factor needs no special path.

A `LoRALinear` keeps the frozen weight under its original name (`q_proj.weight`), so the base state
dict is unchanged and only `q_proj.lora_A` / `q_proj.lora_B` are added.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from snuggle.config import LoraConfig
from snuggle.errors import SnuggleError
from snuggle.model.decoder import Decoder, Linear
from snuggle.quant.base import QuantizedWeight, as_dense, frozen_linear

__all__ = [
    "LoRALinear",
    "ALL_LINEAR",
    "apply_lora",
    "enable_full_finetune",
    "merge_lora",
    "trainable_state",
    "count_parameters",
    "resolve_targets",
]

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


class LoRALinear(nn.Module):
    """y = x W^T + b + scale * dropout(x) A^T B^T, with W frozen and A (r, in), B (out, r) trainable.

    W is the base's weight as it is: a Parameter in the model dtype, or a `QuantizedWeight` (QLoRA's
    `NF4Weight`, or an `FP8Weight`).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev = base.weight.device
        if dev.type == "meta":
            # a base still to be read (FSDP's sharded load fills each block just before sharding it):
            # the factors are real now, on the CPU, drawn in the order a single process draws them
            dev = torch.device("cpu")
        # same init as PEFT: A kaiming-uniform, B zero, so the adapter starts as the identity. A is drawn
        # from the CPU generator whatever the device, so a run gets the same adapter on CPU, one GPU, or
        # N GPUs under FSDP (which builds on the CPU before sharding).
        a = torch.empty(r, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=torch.float32))
        self.r, self.alpha, self.rslora = r, alpha, rslora
        # rsLoRA (Kalajdzievski 2023): alpha/sqrt(r) keeps the update's scale stable as r grows
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = frozen_linear(x, self.weight, bias)
        # low-rank order: (x A^T) B^T never forms an out x in matrix
        return (
            y
            + F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
            * self.scale
        )

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale  # (out, in), fp32

    def merged(self) -> Linear:
        lin = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        # a quantized base merges into its 16-bit dtype: the weight training saw, dequantized
        w = as_dense(self.weight, torch.float32)
        lin.weight = nn.Parameter(
            (w + self.delta_weight().to(w.device)).to(self.weight.dtype), requires_grad=False
        )
        lin.bias = self.bias
        return lin


def resolve_targets(targets: str | list[str]) -> tuple[str, ...]:
    if targets == "all-linear":
        return ALL_LINEAR
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    bad = [t for t in names if t not in ALL_LINEAR]
    if bad:
        raise SnuggleError(f"unknown LoRA target(s) {bad}; use 'all-linear' or names from {list(ALL_LINEAR)}")
    if not names:
        raise SnuggleError("lora.targets is empty")
    return names


def _fp32_trainable(p: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(p.detach().to(torch.float32).clone(), requires_grad=True)


def _train_embeddings(model: Decoder) -> None:
    """embed_tokens and lm_head become full fp32 trainable copies; a tied pair stays one tensor."""
    model.model.embed_tokens.weight = _fp32_trainable(model.model.embed_tokens.weight)
    if model.args.tie_word_embeddings:
        model.tie_weights()
    else:
        model.lm_head.weight = _fp32_trainable(model.lm_head.weight)


def apply_lora(model: Decoder, lc: LoraConfig) -> Decoder:
    """Freeze the model, swap `lc.targets` for LoRALinear in place, train the embeddings if `lc` says so."""
    if lc.r < 1:
        raise SnuggleError(f"lora.r must be >= 1, got {lc.r}")
    names = resolve_targets(lc.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in names:
                base = getattr(parent, name, None)
                if isinstance(base, nn.Linear):
                    setattr(parent, name, LoRALinear(base, lc.r, lc.alpha, lc.dropout, lc.rslora))
    if lc.train_embeddings:
        _train_embeddings(model)
    return model


def enable_full_finetune(model: Decoder) -> Decoder:
    """Every parameter trains, as an fp32 copy (tied embeddings stay tied)."""
    if any(isinstance(m, QuantizedWeight) for m in model.modules()):
        raise SnuggleError(
            "full fine-tuning cannot train quantized weights: set model.quantize=none or enable LoRA"
        )
    for mod in model.modules():
        for leaf, p in list(mod._parameters.items()):
            if p is not None and not (mod is model.lm_head and model.args.tie_word_embeddings):
                mod._parameters[leaf] = _fp32_trainable(p)
    model.tie_weights()
    return model


def merge_lora(model: Decoder) -> Decoder:
    """Fold every LoRALinear into a plain Linear (in place); the result has the base model's layout."""
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.merged())
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors by name; a tied lm_head appears once, as model.embed_tokens.weight."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> int:
    """Weights of the model as a user counts them: a quantized (out, in) weight is out x in, not its bytes.

    Under FSDP a DTensor's numel is the global one, so every rank counts the whole model.
    """
    quant = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    parts = {id(p) for m in quant for p in m.parameters()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in parts)
    return dense + sum(m.shape.numel() for m in quant)
