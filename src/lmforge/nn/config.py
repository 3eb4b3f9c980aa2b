"""Model configuration: a dense or mixture-of-experts decoder-only Transformer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lmforge.core.config import Config, FieldValueError

if TYPE_CHECKING:
    from lmforge.nn.transformer import Transformer


@dataclass
class MoEConfig(Config):
    n_experts: int = 4
    top_k: int = 2
    d_expert: int | None = None        # hidden size of each expert; None -> the dense d_ff. Smaller = fine-grained experts
    n_shared_experts: int = 0          # experts every token passes through (DeepSeekMoE-style)
    load_balance_weight: float = 0.01  # weight of the Switch load-balancing loss
    z_loss_weight: float = 0.001       # weight of the router z-loss
    every_n_layers: int = 1            # MoE in layers i with i % every_n_layers == every_n_layers - 1
    expert_compute: Literal["auto", "batched", "grouped_mm", "loop"] = "auto"  # experts' kernel, nn/moe.py; auto: grouped_mm for bf16 on CUDA, batched on CPU in bf16 for small experts and full batches (per step), loop elsewhere
    expert_rows_multiple: int | None = None  # loop/batched kernels: each expert's rows padded to a multiple (repeating matmul shapes); None: 64 on CPU in bf16, 1 (none) elsewhere

    def __post_init__(self) -> None:
        if self.n_experts < 1:
            raise ValueError("moe.n_experts must be >= 1")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"moe.top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if self.d_expert is not None and self.d_expert < 1:
            raise ValueError("moe.d_expert must be >= 1")
        if self.n_shared_experts < 0 or self.every_n_layers < 1:
            raise ValueError("moe.n_shared_experts must be >= 0 and moe.every_n_layers >= 1")
        if self.expert_rows_multiple is not None and self.expert_rows_multiple < 1:
            raise ValueError(f"moe.expert_rows_multiple must be >= 1 (1: no padding), got {self.expert_rows_multiple}")


@dataclass
class RopeScalingConfig(Config):
    """RoPE scaling, to run (and continue training) a model at a longer context than it was
    trained at; the frequencies are computed in nn/rope.py, as transformers computes them.

    - ``linear``: position interpolation (Chen et al. 2023): position p is read as p / factor.
    - ``ntk``: NTK-aware scaling: the base becomes rope_theta * factor^(d / (d - 2)).
    - ``yarn``: YaRN (Peng et al. 2023): high frequencies kept, low ones interpolated, a linear
      ramp between (set by beta_fast / beta_slow rotations over original_max_seq_len), and cos/sin
      scaled by ``attention_factor`` (attention logits by its square; default 0.1 ln(factor) + 1).
    """
    kind: Literal["linear", "ntk", "yarn"]
    factor: float                          # how many times longer the context is than original_max_seq_len
    original_max_seq_len: int | None = None  # context the model was trained at; required for yarn
    beta_fast: float = 32.0                # yarn: frequencies turning more often than this over the original context are kept
    beta_slow: float = 1.0                 # yarn: frequencies turning less often than this are fully interpolated
    attention_factor: float | None = None  # yarn: cos/sin multiplier; None -> 0.1 ln(factor) + 1

    def __post_init__(self) -> None:
        if not self.factor >= 1.0:
            raise FieldValueError("factor", f"must be >= 1 (1 leaves RoPE unchanged), got {self.factor}")
        if self.original_max_seq_len is not None and self.original_max_seq_len < 1:
            raise FieldValueError("original_max_seq_len", f"must be >= 1, got {self.original_max_seq_len}")
        if self.kind != "yarn":
            if self.attention_factor is not None:
                raise FieldValueError("attention_factor", f"is a YaRN setting; kind is {self.kind!r}")
            return
        if self.original_max_seq_len is None:
            raise FieldValueError("original_max_seq_len", "is required for kind 'yarn' (the context length "
                                  "the model was trained at)")
        if not 0 < self.beta_slow < self.beta_fast:
            raise FieldValueError("beta_fast", f"must be greater than beta_slow, and beta_slow > 0 (got beta_fast "
                                  f"{self.beta_fast}, beta_slow {self.beta_slow})")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise FieldValueError("attention_factor", f"must be > 0, got {self.attention_factor}")


@dataclass
class AttentionConfig(Config):
    """Which keys each query may attend to (``model.attention``); no field shapes a weight.

    - ``document_mask``: packed sequences hold several documents, each starting at an
      end-of-text token (id 0, the first special token of lmforge's tokenizers; the shards put
      one after every document); a token attends only within its own document.
    - ``restart_positions``: RoPE positions restart at 0 at each document's end-of-text token
      (as pipelines that reset position ids do). RoPE scores depend only on the distance between
      query and key, so under ``document_mask`` this changes results only by rounding; it needs
      ``document_mask``.
    - ``sliding_window``: local layers attend to the last ``sliding_window`` tokens (the query
      included), as transformers' ``sliding_window``. ``global_every`` k makes layers
      k-1, 2k-1, ... global (full causal attention; Gemma 3 uses k = 6); unset, every layer is local.
    - ``rope_theta_local``: the RoPE base of local layers (Gemma 3: 10k local, 1M global in
      ``model.rope_theta``); unset, local layers share the global layers' RoPE, scaling included.
      With it set, local layers get plain RoPE: they only see distances below the window.
    - ``kernel``: how full causal attention over a whole sequence is computed (training,
      evaluation, a prompt without cache): ``sdpa`` (``F.scaled_dot_product_attention``),
      ``explicit`` (matmuls and an fp32 softmax, nn/attention.py), ``auto`` (explicit for bf16 on
      CPU up to 1024 tokens, where SDPA's CPU flash kernel is slower; sdpa elsewhere). Masked,
      windowed and cached attention always use SDPA.
    """
    document_mask: bool = False
    restart_positions: bool = False
    sliding_window: int | None = None      # tokens a local layer sees; None: every layer global
    global_every: int | None = None        # one global layer every k (the last of each k); None: all local
    rope_theta_local: float | None = None  # RoPE base of local layers; None: model.rope_theta
    kernel: Literal["auto", "sdpa", "explicit"] = "auto"  # full causal attention's kernel; see above

    def __post_init__(self) -> None:
        if self.restart_positions and not self.document_mask:
            raise FieldValueError("restart_positions", "needs document_mask: true (positions restart at "
                                  "the documents the mask separates)")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise FieldValueError("sliding_window", f"must be >= 1 (tokens a local layer sees), got "
                                  f"{self.sliding_window}")
        if self.global_every is not None and self.global_every < 1:
            raise FieldValueError("global_every", f"must be >= 1, got {self.global_every}")
        if self.rope_theta_local is not None and not self.rope_theta_local > 0:
            raise FieldValueError("rope_theta_local", f"must be > 0, got {self.rope_theta_local}")
        if self.sliding_window is None:
            for key in ("global_every", "rope_theta_local"):
                if getattr(self, key) is not None:
                    raise FieldValueError(key, "applies to local layers; set sliding_window too")

    def window(self, index: int) -> int | None:
        """The window of layer ``index``: ``sliding_window`` for a local layer, None for a global one."""
        if self.sliding_window is None:
            return None
        k = self.global_every
        return None if k is not None and index % k == k - 1 else self.sliding_window


@dataclass
class ModelConfig(Config):
    family: str = "transformer"        # the model family (nn/families.py): transformer (dense/MoE), retro, ...
    vocab_size: int = 4096
    pad_vocab_to_multiple: int = 64    # embedding rows padded up for matmul efficiency; padded ids are never targets
    max_seq_len: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None      # grouped-query attention; None -> n_heads (plain multi-head)
    d_ff: int | None = None            # feed-forward hidden size; None -> SwiGLU: 8/3 d_model rounded up to a multiple of 64, ReLU²: 4 d_model
    mlp_activation: Literal["swiglu", "relu2"] = "swiglu"  # dense feed-forward: SwiGLU (3 matrices) or ReLU² (2: down(relu(up x)²)); nn/mlp.py
    qk_norm: bool = False
    tie_embeddings: bool = True
    fused_cross_entropy: bool = False  # training loss: LM head + cross-entropy per row chunk, no logits kept (nn/cross_entropy.py)
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2, modded-nanogpt); None: plain logits
    value_embeddings: bool = False     # every layer adds a token embedding of its own to attention's values (nn/transformer.py)
    skip_connections: bool = False     # U-net skips: block i's output joins block n_layers-1-i's input with a learned weight
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    moe: MoEConfig | None = None
    rope_scaling: RopeScalingConfig | None = None  # None: plain RoPE; see RopeScalingConfig
    attention: AttentionConfig = field(default_factory=AttentionConfig)  # masks, windows; see AttentionConfig

    def __post_init__(self) -> None:
        built_here = type(self).__dataclass_fields__["family"].default  # type: ignore[attr-defined]
        if self.family != built_here:
            raise ValueError(f"family {self.family!r} is not built by {type(self).__name__} (family {built_here!r}); "
                             "load model configs through lmforge.nn.families.model_config_from_dict")
        for key in ("vocab_size", "pad_vocab_to_multiple", "max_seq_len", "d_model", "n_layers", "n_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim (d_model / n_heads = {self.head_dim}) must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        if self.mlp_activation == "relu2" and self.moe is not None:
            raise FieldValueError("mlp_activation", "'relu2' applies to dense feed-forwards; MoE experts are SwiGLU "
                                  "(set moe: null, or mlp_activation: swiglu)")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise FieldValueError("logit_softcap", f"must be > 0 (logits are capped to (-cap, cap)), or null for "
                                  f"no cap; got {self.logit_softcap}")
        if self.family != "transformer":
            for key in ("value_embeddings", "skip_connections"):
                if getattr(self, key):
                    raise FieldValueError(key, f"is an option of the 'transformer' family; family {self.family!r} "
                                          "runs its own forward pass without it")
        if self.skip_connections and self.n_layers < 2:
            raise FieldValueError("skip_connections", f"U-net skips pair block i with block n_layers-1-i and need "
                                  f"n_layers >= 2, got {self.n_layers}")
        if self.rope_scaling is not None and self.rope_scaling.kind == "ntk" and self.head_dim <= 2:
            raise FieldValueError("rope_scaling.kind", f"'ntk' scales the base by factor^(d/(d-2)) and needs "
                                  f"head_dim > 2, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_to_multiple) * self.pad_vocab_to_multiple

    @property
    def resolved_d_ff(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp_activation == "relu2":
            return 4 * self.d_model
        return self.swiglu_d_ff

    @property
    def swiglu_d_ff(self) -> int:
        """The width of a SwiGLU feed-forward: ``d_ff``, or 8/3 d_model rounded up to 64 (the
        RETRO encoder is SwiGLU whatever ``mlp_activation`` the decoder uses)."""
        return self.d_ff if self.d_ff is not None else math.ceil(8 * self.d_model / 3 / 64) * 64

    @property
    def d_expert(self) -> int:
        return (self.moe.d_expert if self.moe and self.moe.d_expert else None) or self.resolved_d_ff

    def is_moe_layer(self, index: int) -> bool:
        return self.moe is not None and index % self.moe.every_n_layers == self.moe.every_n_layers - 1

    def build(self) -> "Transformer":
        from lmforge.nn.transformer import Transformer

        return Transformer(self)
