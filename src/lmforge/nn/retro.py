"""RETRO: a decoder that reads retrieved text through chunked cross-attention (CCA).

The input of n tokens is cut into chunks of m = ``chunk_len``. For each chunk u the caller
supplies k neighbours retrieved with chunk u's text, each r tokens long (the retrieved
chunk followed by its continuation, r = 2m). Then:

1. A small **bidirectional neighbour encoder** embeds each neighbour (with the decoder's own
   token embedding), runs self-attention over its r tokens (no causal mask: a neighbour is
   all past data) and cross-attends to the decoder's hidden states of chunk u at the first
   CCA layer, so the neighbour is read in the light of the text that retrieved it.
2. In the **CCA layers** of the decoder, the tokens u·m + m - 1 … (u+1)·m + m - 2 attend to
   the encoded neighbours of chunk u. The span starts at the *last* token of chunk u
   because chunk u's neighbours were retrieved with all of chunk u's tokens: a token
   earlier in chunk u would otherwise see (through the retrieval) tokens after it.
   Tokens m - 1 positions before the first span (the first chunk but its last token) attend
   nothing.

CCA output projections start at zero, so adding retrieval to a trained model
(retrofitting) leaves its outputs unchanged at step 0; and without neighbours the model
is exactly its decoder.

Default CCA layers: the paper puts CCA in every third layer from layer 6 (1-indexed) of
deep models. A shallow lmforge model (fewer than 8 layers) gets CCA in every other layer
from the second (0-indexed 1, 3, 5): one attention layer first builds the context the
query needs, and a 4-layer model still reads its neighbours twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.config import Config, FieldValueError
from lmforge.nn.attention import add_projections
from lmforge.nn.config import AttentionConfig, ModelConfig
from lmforge.nn.mlp import SwiGLU
from lmforge.nn.norm import RMSNorm
from lmforge.nn.rope import RotaryEmbedding
from lmforge.nn.transformer import KVCache, ModelOutput, Transformer


@dataclass
class RetroConfig(Config):
    chunk_len: int = 64                   # m: tokens per retrieval chunk (must match the database)
    n_neighbours: int = 2                 # k: neighbours per chunk fed to the model
    neighbour_len: int | None = None      # r: tokens per neighbour; None -> 2 * chunk_len (chunk + continuation)
    encoder_layers: int = 2               # bidirectional neighbour-encoder blocks
    cca_layers: list[int] | None = None   # decoder layers (0-indexed) with CCA; None -> see module docstring
    base_checkpoint: str | None = None    # retrofit: load the decoder's weights from this lmforge checkpoint
    freeze_decoder: bool = False          # retrofit: train only the encoder and CCA
    align_neighbours: bool = True         # move each neighbour to line up with its query (retrieval.alignment)
    aligned_read: bool = True             # CCA also reads the neighbour token aligned with each query (AlignedRead)

    def __post_init__(self) -> None:
        if self.chunk_len < 1 or self.n_neighbours < 1 or self.encoder_layers < 0:
            raise ValueError("retro.chunk_len and retro.n_neighbours must be >= 1, retro.encoder_layers >= 0")
        if self.neighbour_len is not None and self.neighbour_len < 1:
            raise ValueError("retro.neighbour_len must be >= 1")

    @property
    def resolved_neighbour_len(self) -> int:
        return self.neighbour_len or 2 * self.chunk_len

    def resolved_cca_layers(self, n_layers: int) -> list[int]:
        if self.cca_layers is not None:
            return sorted(set(self.cca_layers))
        if n_layers < 8:
            return list(range(min(1, n_layers - 1), n_layers, 2))
        return list(range(5, n_layers, 3))


@dataclass
class RetroModelConfig(ModelConfig):
    family: str = "retro"
    retro: RetroConfig = field(default_factory=RetroConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        layers = self.retro.resolved_cca_layers(self.n_layers)
        bad = [i for i in layers if not 0 <= i < self.n_layers]
        if bad or not layers:
            raise ValueError(f"retro.cca_layers must be a non-empty list of layers in [0, {self.n_layers}), got "
                             f"{self.retro.cca_layers}")
        if self.retro.chunk_len > self.max_seq_len:
            raise ValueError(f"retro.chunk_len ({self.retro.chunk_len}) exceeds max_seq_len ({self.max_seq_len})")
        if self.attention != AttentionConfig():  # its forward with neighbours runs full causal attention
            raise FieldValueError("attention", "document masks and sliding windows are options of the transformer "
                                  "family; RETRO's decoder attends over the whole sequence")

    def base_config(self) -> ModelConfig:
        """The decoder alone, as a plain ModelConfig (what a retrofitted checkpoint holds)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{**values, "family": "transformer"})

    def build(self) -> "RetroTransformer":  # type: ignore[override]
        model = RetroTransformer(self)
        if self.retro.base_checkpoint:
            model.load_decoder(self.retro.base_checkpoint)
        if self.retro.freeze_decoder:
            model.freeze_decoder()
        return model


class CrossAttention(nn.Module):
    """Queries from ``x``, keys and values from ``context``, no mask; RoPE on both sides."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        add_projections(self, cfg)

    def forward(self, x: torch.Tensor, context: torch.Tensor, rope: RotaryEmbedding, q_start: int = 0,
                groups: int = 1) -> torch.Tensor:
        """``context`` [b, groups * r, d] is ``groups`` sequences of r tokens, each at positions 0..r-1."""
        b, t, _ = x.shape
        s = context.shape[1]
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).view(b, groups, s // groups, self.n_kv_heads, self.head_dim).permute(0, 3, 1, 2, 4)
        v = self.v_proj(context).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = rope(q, q_start)
        k = rope(k).reshape(b, self.n_kv_heads, s, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class EncoderBlock(nn.Module):
    """Bidirectional self-attention over a neighbour, cross-attention to its chunk, SwiGLU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = CrossAttention(cfg)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.chunk_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.swiglu_d_ff)

    def forward(self, x: torch.Tensor, chunk: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        h = self.self_norm(x)
        x = x + self.self_attn(h, h, rope)
        x = x + self.cross_attn(self.cross_norm(x), self.chunk_norm(chunk), rope)
        return x + self.mlp(self.mlp_norm(x))


class AlignedRead(nn.Module):
    """Each CCA query reads, from each of its chunk's k neighbours, the token after the aligned one.

    Query i of span u sits at neighbour position m-1+i (see :class:`ChunkedCrossAttention`).
    When a neighbour repeats the text (aligned by :mod:`lmforge.retrieval.alignment`), its
    token at m-1+i is the query's own token and the one at m+i is the token to predict. This
    read compares the query with the k tokens at m-1+i (plus a learned "none of them" key)
    and takes the value of the tokens at m+i. Full CCA can express the same thing, but it
    must first find one position among k·r by RoPE alone. On a synthetic copy task
    (``bench/retro_copy.py``: d_model 64, 4 layers, random tokens, the true continuation in 25%
    of the chunks; chance 5.54 nats) CCA alone is at 5.47 nats on copyable tokens after 300
    steps, CCA with this read at 0.39 after 150 and 0.10 after 300, while unrelated
    neighbours stay at chance. The output projection starts at zero, like CCA's.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=False)
        self.null_key = nn.Parameter(torch.zeros(cfg.n_heads, cfg.head_dim))

    def forward(self, queries: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        """queries [B, l, m, d] (span u's tokens), encoded [B, l, k, r, d] -> [B, l, m, d]."""
        b, n_chunks, m, _ = queries.shape
        k = encoded.shape[2]
        h, hd = self.n_heads, self.head_dim
        q = self.q_proj(queries).view(b, n_chunks, m, h, hd)
        keys = self.k_proj(encoded[:, :, :, m - 1:2 * m - 1]).view(b, n_chunks, k, m, h, hd)
        values = self.v_proj(encoded[:, :, :, m:2 * m]).view(b, n_chunks, k, m, h, hd)
        scores = torch.einsum("blihd,bljihd->blihj", q, keys)
        none = torch.einsum("blihd,hd->blih", q, self.null_key)[..., None]
        weights = (torch.cat([scores, none], -1) / hd ** 0.5).softmax(-1)[..., :k]
        y = torch.einsum("blihj,bljihd->blihd", weights, values).reshape(b, n_chunks, m, h * hd)
        return self.o_proj(y)


class ChunkedCrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, chunk_len: int, aligned_read: bool = False):
        super().__init__()
        self.chunk_len = chunk_len
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CrossAttention(cfg)
        self.aligned = AlignedRead(cfg) if aligned_read else None

    def forward(self, x: torch.Tensor, encoded: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        """x [B, n, d], encoded [B, l, k, r, d] with l = ceil(n / m); returns the residual update."""
        b, n, d = x.shape
        m = self.chunk_len
        _, n_chunks, k, r, _ = encoded.shape
        out = torch.zeros_like(x)
        if n < m:
            return out  # no token has a complete chunk behind it yet
        # Span u = tokens u*m + m-1 ... u*m + 2m - 2: shift by m-1, pad to l*m, cut in chunks.
        shifted = F.pad(self.norm(x)[:, m - 1:], (0, 0, 0, n_chunks * m - (n - m + 1)))
        queries = shifted.reshape(b * n_chunks, m, d)
        context = encoded.reshape(b * n_chunks, k * r, d)
        # Query i of a span sits at neighbour position m-1+i: the continuation token it is
        # about to predict is then one position ahead, as in the text.
        y = self.attn(queries, context, rope, q_start=m - 1, groups=k).reshape(b, n_chunks * m, d)
        if self.aligned is not None and encoded.shape[3] >= 2 * m:
            y = y + self.aligned(queries.view(b, n_chunks, m, d), encoded).reshape(b, n_chunks * m, d)
        out[:, m - 1:] = y[:, : n - m + 1]
        return out


class RetroTransformer(Transformer):
    """lmforge's Transformer plus a neighbour encoder and CCA in ``retro.cca_layers``.

    Parameter names of the decoder are those of :class:`Transformer`, so a dense or MoE
    checkpoint loads into it unchanged (retrofitting).
    """

    def __init__(self, cfg: RetroModelConfig):
        super().__init__(cfg)
        self.retro = cfg.retro
        m, r = cfg.retro.chunk_len, cfg.retro.resolved_neighbour_len
        self.cca_layers = cfg.retro.resolved_cca_layers(cfg.n_layers)
        self.retro_rope = RotaryEmbedding(cfg.head_dim, max(2 * m, r), cfg.rope_theta)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.retro.encoder_layers))
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cca = nn.ModuleDict({str(i): ChunkedCrossAttention(cfg, m, cfg.retro.aligned_read)
                                  for i in self.cca_layers})
        self.reset_retro_parameters()

    def reset_retro_parameters(self) -> None:
        std = self.cfg.init_std
        for name, module in [*self.encoder.named_modules(prefix="encoder"), *self.cca.named_modules(prefix="cca")]:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for cca in self.cca.values():
            nn.init.zeros_(cca.attn.o_proj.weight)  # start as the decoder alone
            if cca.aligned is not None:
                nn.init.zeros_(cca.aligned.o_proj.weight)
                nn.init.zeros_(cca.aligned.null_key)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "cca"):
            self.reset_retro_parameters()

    def retro_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith(("encoder", "cca."))]

    def freeze_decoder(self) -> None:
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith(("encoder", "cca.")))

    def load_decoder(self, checkpoint: str) -> None:
        """Load a plain Transformer checkpoint's weights into the decoder (retrofitting)."""
        from pathlib import Path

        from lmforge.core.checkpoint_files import load_safetensors_weights, verify_checkpoint_dir

        assert isinstance(self.cfg, RetroModelConfig)
        verify_checkpoint_dir(Path(checkpoint))
        base = Transformer(self.cfg.base_config())
        load_safetensors_weights(base, Path(checkpoint))
        missing, unexpected = self.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all(k.startswith(("encoder", "cca.")) for k in missing), (missing, unexpected)

    def encode_neighbours(self, neighbours: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """neighbours [B, l, k, r] token ids, hidden [B, n, d] -> encoded [B, l, k, r, d]."""
        b, n_chunks, k, r = neighbours.shape
        m = self.retro.chunk_len
        chunk = F.pad(hidden, (0, 0, 0, n_chunks * m - hidden.shape[1]))
        chunk = chunk.reshape(b, n_chunks, 1, m, -1).expand(b, n_chunks, k, m, hidden.shape[-1])
        chunk = chunk.reshape(b * n_chunks * k, m, -1)
        x = self.embed(neighbours.reshape(b * n_chunks * k, r))
        for block in self.encoder:
            x = block(x, chunk, self.retro_rope)
        return self.encoder_norm(x).reshape(b, n_chunks, k, r, -1)

    def _fit_neighbours(self, neighbours: torch.Tensor, n: int) -> torch.Tensor:
        if neighbours.dim() != 4:
            raise ValueError(f"neighbours must be [batch, chunks, k, tokens], got {list(neighbours.shape)}")
        m, r_max = self.retro.chunk_len, self.retro.resolved_neighbour_len
        if neighbours.shape[-1] > r_max:
            raise ValueError(f"neighbours of {neighbours.shape[-1]} tokens exceed retro.neighbour_len {r_max}")
        n_chunks = -(-n // m)
        if neighbours.shape[1] < n // m:
            raise ValueError(f"{n} tokens have {n // m} complete chunks but neighbours cover {neighbours.shape[1]}")
        if neighbours.shape[1] < n_chunks:  # the incomplete last chunk's neighbours are never read
            neighbours = F.pad(neighbours, (0, 0, 0, 0, 0, n_chunks - neighbours.shape[1]))
        return neighbours[:, :n_chunks]

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,  # type: ignore[override]
                kv_cache: KVCache | None = None, neighbours: torch.Tensor | None = None) -> ModelOutput:
        if neighbours is None:
            return super().forward(input_ids, targets, kv_cache)
        if kv_cache is not None:
            raise ValueError("RETRO with neighbours runs without a KV cache (see retrieval.generation)")
        n = input_ids.shape[1]
        if n > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {n} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        neighbours = self._fit_neighbours(neighbours, n)
        x = self.embed(input_ids)
        encoded = None
        for i, block in enumerate(self.blocks):
            if str(i) not in self.cca:
                x = block(x, self.rope)
                continue
            x = x + block.attn(block.attn_norm(x), self.rope)
            if encoded is None:  # conditioned on the hidden states at the first CCA layer
                encoded = self.encode_neighbours(neighbours, x)
            x = x + self.cca[str(i)](x, encoded, self.retro_rope)
            x = x + block.mlp(block.mlp_norm(x))
        return self.output(x, targets)


def count_retro_parameters(model: RetroTransformer) -> dict[str, int]:
    """Decoder, encoder and CCA parameter counts of a built model (tied weights once)."""
    retro = {id(p) for n, p in model.named_parameters() if n.startswith(("encoder", "cca."))}
    decoder = sum(p.numel() for p in model.parameters() if id(p) not in retro)
    encoder = sum(p.numel() for p in [*model.encoder.parameters(), *model.encoder_norm.parameters()])
    cca = sum(p.numel() for p in model.cca.parameters())
    return {"decoder": decoder, "encoder": encoder, "cca": cca, "total": decoder + encoder + cca}
