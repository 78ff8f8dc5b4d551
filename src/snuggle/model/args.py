"""Architecture hyper-parameters of the decoder families we own, read from an HF `config.json` dict.

One dataclass covers Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM and TinyLlama: they are the
same pre-norm decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP) and differ only in the switches below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from snuggle.errors import SnuggleError

__all__ = ["ModelArgs", "SUPPORTED_FAMILIES"]

# model_type -> the switches that family turns on (beyond what its config.json states explicitly).
# `o_proj_bias`: o_proj has a bias when config.json's attention_bias says so, as in transformers' Llama
# and Qwen3 (Qwen2 biases q/k/v only; Mistral has no biases at all).
SUPPORTED_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"o_proj_bias": True},
    "mistral": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True, "o_proj_bias": True},
}
_ROPE_TYPES = ("default", "linear", "llama3")
# the MLP is SwiGLU: silu(gate) * up (transformers' "swish" is the same function)
_ACTIVATIONS = ("silu", "swish")


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2, or attention_bias in Llama / Qwen3)
    o_proj_bias: bool = False  # bias on o_proj (attention_bias in Llama / Qwen3; never in Qwen2, Mistral)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # Mistral v0.1 attends to the last `sliding_window` tokens only
    # layers that attend to the whole context although the model has a window (Qwen2/Qwen3 with
    # use_sliding_window: the layers below max_window_layers, or config.json's layer_types)
    full_attention_layers: frozenset[int] = frozenset()
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)  # the source dict, for export

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelArgs:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_FAMILIES:
            arch = (cfg.get("architectures") or [model_type])[0]
            raise SnuggleError(
                f"unsupported architecture {arch!r} (model_type {model_type!r}); "
                f"supported: {', '.join(sorted(SUPPORTED_FAMILIES))}"
            )
        fam = SUPPORTED_FAMILIES[model_type]
        act = cfg.get("hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise SnuggleError(
                f"unsupported hidden_act {str(act)[:40]!r}: snuggle's MLP is SwiGLU "
                f"({' or '.join(_ACTIVATIONS)})"
            )
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            head_dim = cfg.get("head_dim") or hidden // heads
            rope_theta = cfg.get("rope_theta")
            rope_scaling = cfg.get("rope_scaling")
            # transformers 5 folds theta and scaling into `rope_parameters`
            rp = cfg.get("rope_parameters")
            if isinstance(rp, dict):
                rope_theta = rope_theta or rp.get("rope_theta")
                if rp.get("rope_type", "default") != "default":
                    rope_scaling = rp
            if rope_scaling is not None:
                kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
                if kind not in _ROPE_TYPES:
                    raise SnuggleError(
                        f"unsupported rope scaling {kind!r}; supported: {', '.join(_ROPE_TYPES)}"
                    )
                if kind == "default":
                    rope_scaling = None
            attention_bias = bool(cfg.get("attention_bias", fam.get("attention_bias", False)))
            window = cfg.get("sliding_window")
            if model_type != "mistral" and not cfg.get("use_sliding_window", False):
                window = None  # Qwen configs carry a window they do not use unless use_sliding_window
            full_layers = _full_attention_layers(cfg, model_type, int(cfg["num_hidden_layers"]))
            if window and len(full_layers) == int(cfg["num_hidden_layers"]):
                window = None  # no layer uses it
            args = cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta or 10000.0),
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=attention_bias,
                o_proj_bias=attention_bias and fam.get("o_proj_bias", False),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=fam.get("qk_norm", False),
                sliding_window=int(window) if window else None,
                full_attention_layers=frozenset(full_layers) if window else frozenset(),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                hf_config=dict(cfg),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SnuggleError(f"model config is missing or has a bad value for {e}") from None
        if args.num_heads % args.num_kv_heads:
            raise SnuggleError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads")
        return args

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i (None: it attends to the whole context)."""
        return None if i in self.full_attention_layers else self.sliding_window


def _full_attention_layers(cfg: dict[str, Any], model_type: str, num_layers: int) -> set[int]:
    """Layers of a Qwen2/Qwen3 model with use_sliding_window that still attend to everything, as
    transformers decides: config.json's `layer_types`, else the layers below `max_window_layers`
    (default 28). Mistral applies its window to every layer."""
    if model_type not in ("qwen2", "qwen3"):
        return set()
    types = cfg.get("layer_types")
    if types is not None:
        names = isinstance(types, list) and all(isinstance(t, str) for t in types)
        if not names or len(types) != num_layers:
            raise SnuggleError(f"model config layer_types must be a list of {num_layers} layer type names")
        return {i for i, t in enumerate(types) if t != "sliding_attention"}
    first = cfg.get("max_window_layers", 28)
    if isinstance(first, bool) or not isinstance(first, int):
        raise SnuggleError(f"model config max_window_layers must be an integer, got {str(first)[:40]}")
    return set(range(min(max(first, 0), num_layers)))
