"""The decoder we own: Llama-style blocks (RMSNorm, RoPE, GQA attention through SDPA, SwiGLU MLP).

Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so loading and
exporting HF checkpoints needs no renaming. Every weight is cast to the dtype of the activations at the
point of use: frozen weights live in the model dtype (bf16) while trainable copies (LoRA factors,
embeddings) may live in fp32, and the same module serves both.

Packed rows carry `doc_ids` (B, T): tokens attend only to earlier tokens of the same document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from snuggle.model.args import ModelArgs
from snuggle.model.checkpointing import run_block
from snuggle.model.flex import document_block_mask, flex_attention
from snuggle.model.loss import cross_entropy_sum
from snuggle.model.tiling import tiled_mlp
from snuggle.quant.base import frozen_linear

__all__ = [
    "Decoder",
    "Linear",
    "RMSNorm",
    "KVCache",
    "rope_inv_freq",
    "apply_rope",
    "rope_qk",
    "swiglu",
    "gate_up_down",
    "attention_mask",
]


class Linear(nn.Linear):
    """nn.Linear that casts its weight to the input's dtype (no-op when they already agree).

    The weight may also be a frozen quantized weight (`NF4Weight`, QLoRA's 4-bit base, dequantized per
    call; `FP8Weight`, multiplied in FP8).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return frozen_linear(x, self.weight, bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 whatever the activation dtype, as the reference implementations do
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * xf.to(dtype)


def rope_inv_freq(args: ModelArgs, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in fp32, with linear or llama3 scaling applied."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.int64).float() / d))
    sc = args.rope_scaling
    if sc is None:
        return inv
    kind = sc.get("rope_type", sc.get("type"))
    factor = float(sc["factor"])
    if kind == "linear":
        return inv / factor
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth ramp in between
    low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_ctx = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, T, head_dim) for per-token positions (B, T); computed in fp32."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by per-token angles; the half-split layout HF checkpoints use."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE on q (B, H, T, D) and k (B, Hkv, T, D); the reference the fused kernel replaces."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; the reference the fused kernel replaces."""
    return F.silu(gate) * up


def project(mods, x: torch.Tensor, norm: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """Each projection of one input (q/k/v, gate/up), of norm(x) when a norm is given; the fast path
    does a LoRA group, with its norm, as one Function."""
    if norm is not None:
        x = norm(x)
    return tuple(m(x) for m in mods)


def act_down(gate: torch.Tensor, up: torch.Tensor, act_fn, down: nn.Module) -> torch.Tensor:
    """down(act_fn(gate, up)); the fast path fuses SwiGLU into a LoRA down projection's Function."""
    return down(act_fn(gate, up))


def gate_up_down(mods, x: torch.Tensor, act_fn, norm: nn.Module | None = None) -> torch.Tensor:
    """down(act_fn(gate(x'), up(x'))) for mods = (gate, up, down), x' = norm(x) when a norm is given;
    the fast path runs it as one Function that keeps only x and makes gate and up again in backward."""
    gate, up = project(mods[:2], x, norm)
    return act_down(gate, up, act_fn, mods[2])


def attention_mask(
    doc_ids: torch.Tensor | None, T: int, window: int | None, device, past: int = 0
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, past + T) mask, True = may attend; None when SDPA needs no explicit mask.

    Queries sit at positions past..past+T-1 (past = tokens already in a KV cache). Block-diagonal
    causal over documents, so packed documents never see each other; `window` limits each token to the
    last `window` positions (Mistral's sliding window).
    """
    windowed = window is not None and window < past + T
    if doc_ids is None and not windowed and (past == 0 or T == 1):
        return None  # plain causal (past == 0) or one new token that sees the whole cache
    if doc_ids is not None and past:
        raise ValueError("packed documents (doc_ids) cannot be combined with a KV cache")
    q = torch.arange(past, past + T, device=device)[:, None]
    k = torch.arange(past + T, device=device)[None, :]
    mask = k <= q  # (T, past + T)
    if windowed:
        mask = mask & (q - k < window)
    mask = mask[None, None]  # (1, 1, T, past + T)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])  # (B, 1, T, T)
    return mask


@dataclass
class KVCache:
    """Keys and values of earlier positions, per layer, for incremental decoding."""

    k: list[torch.Tensor | None] = field(default_factory=list)
    v: list[torch.Tensor | None] = field(default_factory=list)

    def length(self) -> int:
        return 0 if not self.k or self.k[0] is None else self.k[0].shape[2]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        h, d = args.hidden_size, args.head_dim
        self.q_proj = Linear(h, self.n_heads * d, bias=args.attention_bias)
        self.k_proj = Linear(h, self.n_kv * d, bias=args.attention_bias)
        self.v_proj = Linear(h, self.n_kv * d, bias=args.attention_bias)
        self.o_proj = Linear(self.n_heads * d, h, bias=args.o_proj_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(d, args.rms_norm_eps)
            self.k_norm = RMSNorm(d, args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.rope_fn = rope_qk  # swap point: kernels.swap replaces it with the Triton kernel
        self.project = project  # swap point: q/k/v as one LoRA Function

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, norm: nn.Module | None = None):
        """(B, T, C) -> (B, T, C); of norm(x) when `norm` is given (see `Block.recompute_norm`)."""
        B, T, _ = x.shape
        q, k, v = self.project((self.q_proj, self.k_proj, self.v_proj), x, norm)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = self.rope_fn(q, k, cos, sin)
        causal = mask is None
        if cache is not None:
            i = self.layer_idx
            if cache.k[i] is not None:
                k, v = torch.cat((cache.k[i], k), dim=2), torch.cat((cache.v[i], v), dim=2)
                causal = False  # no mask here means one new token that sees every cached one
            cache.k[i], cache.v[i] = k, v
        if hasattr(mask, "kv_num_blocks"):  # a FlexAttention BlockMask (packed documents on CUDA)
            y = flex_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, f = args.hidden_size, args.intermediate_size
        self.gate_proj = Linear(h, f, bias=args.mlp_bias)
        self.up_proj = Linear(h, f, bias=args.mlp_bias)
        self.down_proj = Linear(f, h, bias=args.mlp_bias)
        self.act_fn = swiglu  # swap point for the fused kernel
        self.project = project  # swap points: gate/up as one LoRA Function, SwiGLU inside down's
        self.act_down = act_down
        # make the SwiGLU product again in backward instead of keeping it (through act_down, when the
        # fast path provides one): set by the memory plan, as it costs time and is only worth it where
        # memory is short
        self.recompute_product = False
        # tokens per tile on long sequences (0: untiled); set by the memory plan, see model.tiling
        self.tile_tokens = 0
        # keep only the MLP's input and make gate and up again in backward (through gate_up_down, when
        # the fast path provides one): frees 2 x intermediate a token for the gate/up GEMMs once more
        self.recompute_gate_up = False
        self.gate_up_down = gate_up_down  # swap point: kernels.mlp's Function

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:  # (B, T, C)
        """MLP(x), or MLP(norm(x)) when `norm` is given (see `Block.recompute_norm`)."""
        if self.tile_tokens:
            params = [*self.parameters(), *(norm.parameters() if norm is not None else ())]
            return tiled_mlp(partial(self._forward, norm=norm), x, self.tile_tokens, params)
        return self._forward(x, norm)

    def _forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        if self.recompute_gate_up:
            return self.gate_up_down((self.gate_proj, self.up_proj, self.down_proj), x, self.act_fn, norm)
        gate, up = self.project((self.gate_proj, self.up_proj), x, norm)
        fn = self.act_down if self.recompute_product else act_down  # the module's swap, or the reference
        return fn(gate, up, self.act_fn, self.down_proj)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)
        # hand each norm to the projections after it instead of applying it first, so the fast path's
        # LoRA group Function normalizes inside and keeps the block's residual stream (alive anyway)
        # rather than the norm's output: set by the memory plan, as its backward does a few more small
        # products and it is only worth it where memory is short
        self.recompute_norm = False

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        if self.recompute_norm:
            x = x + self.self_attn(x, cos, sin, mask, cache, norm=self.input_layernorm)
            return x + self.mlp(x, norm=self.post_attention_layernorm)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Decoder(nn.Module):
    """Causal LM. `forward` gives logits (B, T, V), or with `labels` the summed token loss for training."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # activations run in this dtype; set by the loader (weights may be stored wider)
        self.compute_dtype = torch.float32
        # blocks recomputed in backward instead of storing their activations, and where their inputs
        # wait meanwhile (None: on the GPU); see checkpointing.configure_checkpointing
        self.checkpoint_layers: set[int] = set()
        self.offloader = None
        # blocks whose saved activations wait in CPU memory between forward and backward (None: none)
        self.saved_offloader = None
        # (hidden (B,T,C), lm_head weight (V,C), labels (B,T)) -> summed loss; swap point for the fused kernel
        self.loss_fn = cross_entropy_sum
        # packed documents: "sdpa" with a boolean mask, or "flex" (block-sparse, memory-linear; CUDA)
        self.attention = "sdpa"

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T); restarts at each document when packed
        doc_ids: torch.Tensor | None = None,  # (B, T); equal ids = same document
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        past = cache.length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        if cache is not None and not cache.k:
            cache.k, cache.v = [None] * self.args.num_layers, [None] * self.args.num_layers
        emb = self.model.embed_tokens.weight
        x = F.embedding(input_ids, emb).to(self.compute_dtype)  # (B, T, C)
        inv_freq = rope_inv_freq(self.args, device=input_ids.device)
        cos, sin = rope_cos_sin(inv_freq, position_ids, x.dtype)
        if doc_ids is not None and cache is None and bool((doc_ids == doc_ids[:, :1]).all()):
            doc_ids = None  # one document a row: plain causal attention, SDPA's flash kernel
        windows = [self.args.layer_window(i) for i in range(len(self.model.layers))]
        masks = {}
        for w in dict.fromkeys(windows):  # one mask per distinct window (Qwen mixes full and sliding)
            if doc_ids is not None and cache is None and self.attention == "flex":
                masks[w] = document_block_mask(doc_ids, w)
            else:
                masks[w] = attention_mask(doc_ids, T, w, input_ids.device, past)
        if self.offloader is not None and torch.is_grad_enabled() and not x.requires_grad:
            # an offloaded block is an autograd Function: it only gets a backward if an input needs grad
            x.requires_grad_(True)
        for i, layer in enumerate(self.model.layers):
            x = run_block(layer, i, x, cos, sin, masks[windows[i]], cache, self)
        return self.model.norm(x)  # (B, T, C)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,  # (B, T) aligned targets: return the summed loss instead
    ) -> torch.Tensor:
        """Logits (B, T, V), or with `labels` the summed token loss (fp32 scalar, see `loss_sum`).

        The loss lives in `forward` rather than beside it because data-parallel wrappers act through
        `forward`: DDP arms its gradient hooks there, and FSDP unshards the root's parameters (the
        lm_head / tied embedding the loss reads) only for the duration of the root forward.
        """
        if labels is not None:
            if cache is not None:
                raise ValueError("labels (training loss) cannot be combined with a KV cache")
            return self.loss_sum(input_ids, labels, position_ids, doc_ids)
        return self.lm_head(self.hidden_states(input_ids, position_ids, doc_ids, cache))  # (B, T, V)

    def loss_sum(self, input_ids, labels, position_ids=None, doc_ids=None) -> torch.Tensor:
        """Sum over valid tokens (labels != -100) of the next-token loss, fp32 scalar.

        `labels` (B, T) are already aligned with `input_ids` (labels[t] is the target at position t),
        as the packer produces them. The caller divides by the number of valid tokens of the whole
        (accumulated, all-rank) batch, so accumulation and world size do not change the mean.
        Training calls it through `forward(..., labels=labels)` (see there); calling it directly skips
        the hooks of a DDP/FSDP wrapper and is only right on an unwrapped model.
        """
        h = self.hidden_states(input_ids, position_ids, doc_ids)
        return self.loss_fn(h, self.lm_head.weight, labels)
