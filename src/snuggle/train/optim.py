"""AdamW over parameter groups, and the learning-rate schedule (warmup, then cosine or linear decay).

Groups: `decay` (LoRA factors and matrices), `no_decay` (norms and biases: decaying a gain towards 0 is
never what one wants), `embeddings` (embed_tokens / lm_head copies at `embedding_lr`; peers' CPT recipe
trains them 2-10x slower than the adapters because they move every token's representation). The
embeddings' optimizer may run on the host (`train.embedding_offload`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from snuggle.config import TrainConfig
from snuggle.errors import SnuggleError

__all__ = ["param_groups", "build_optimizer", "lr_factor", "build_scheduler"]

_EMBEDDING_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    decay, no_decay, emb = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in _EMBEDDING_NAMES:
            emb.append(p)
        elif p.ndim < 2 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        {"name": "embeddings", "params": emb, "lr": cfg.embedding_lr or cfg.lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, host_embeddings: bool = False
) -> torch.optim.Optimizer:
    """AdamW (or 8-bit AdamW) over `param_groups`; `host_embeddings`: the embeddings group's optimizer
    state and fp32 master live in CPU memory and are updated there (see embedding_offload)."""
    groups = param_groups(model, cfg)

    def make(groups: list[dict]) -> torch.optim.Optimizer:
        if cfg.optimizer == "adamw8bit":
            from snuggle.train.adamw8bit import AdamW8bit

            return AdamW8bit(groups, betas=tuple(cfg.betas), eps=1e-8)
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        # fused AdamW is one kernel for all tensors on CUDA; on CPU the foreach path is the fast one
        return torch.optim.AdamW(groups, betas=tuple(cfg.betas), eps=1e-8, fused=on_cuda or None)

    if not host_embeddings:
        return make(groups)
    emb = [g for g in groups if g["name"] == "embeddings"]
    if not emb:
        raise SnuggleError(
            "train.embedding_offload=cpu moves the trained embeddings' optimizer state to CPU memory, "
            "but no embeddings train: set lora.train_embeddings=true or embedding_offload=auto"
        )
    from snuggle.train.embedding_offload import HostOffloadOptimizer

    return HostOffloadOptimizer([g for g in groups if g["name"] != "embeddings"], emb[0], make)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of each group's peak lr at optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
