"""The multimodal family's continuous routes: image patches put straight into the decoder.

A sequence holds, for each image, ``<begin-image>``, its patches row by row with a row-separator
token after each row, and ``<end-image>`` (data/patch_sequences.py builds them). Every patch
position carries the placeholder id; its input vector is the placeholder's embedding plus the
patch's own feature vector:

- ``route: continuous`` (early fusion, Fuyu-style, no image encoder): the patch's pixels
  (``patch_size`` x ``patch_size`` x channels, scaled to [-1, 1]) times one linear projection to
  ``d_model``. Positions come from the decoder's RoPE and the row separators.
- ``route: encoder`` (late fusion, the baseline): the patches of one image first pass a small
  bidirectional Transformer (``model.multimodal.encoder``; learned patch positions), whose outputs
  are projected to ``d_model``: the decoder reads the encoder's outputs as its image positions.

The decoder is the family's Transformer (dense or MoE); image positions are never targets (loss on
text tokens only), so these routes read images but cannot write them.

Counting (:func:`count_multimodal_parameters`, :func:`multimodal_flops_per_token`, registered for
the family in nn/families.py) adds the projection / encoder to the decoder's counts. Training rows
pack exactly ``examples_per_row`` images (one per example), so the share of positions that are
patches, ``examples_per_row * patches_per_image / seq_len``, is fixed by the config and the
image-side FLOPs per token are exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn.counting import ParameterCounts, count_parameters, flops_per_token
from lmforge.nn.mlp import SwiGLU
from lmforge.nn.multimodal import ImageEncoderSettings, MultimodalModelConfig
from lmforge.nn.norm import RMSNorm
from lmforge.nn.transformer import KVCache, ModelOutput, Transformer


class EncoderBlock(nn.Module):
    """Pre-norm block with bidirectional attention over one image's patches."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = RMSNorm(d_model, eps)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.mlp_norm = RMSNorm(d_model, eps)
        self.mlp = SwiGLU(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(n, p, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        x = x + self.o_proj(attended.transpose(1, 2).reshape(n, p, d))
        return x + self.mlp(self.mlp_norm(x))


class ImageEncoder(nn.Module):
    """[images, patches, patch_dim] -> [images, patches, d_out]: the late-fusion image encoder."""

    def __init__(self, settings: ImageEncoderSettings, patch_dim: int, patches: int, d_out: int, eps: float):
        super().__init__()
        d = settings.d_model
        self.patch_in = nn.Linear(patch_dim, d, bias=False)
        self.position = nn.Parameter(torch.zeros(patches, d))
        self.blocks = nn.ModuleList(EncoderBlock(d, settings.n_heads, settings.resolved_d_ff, eps)
                                    for _ in range(settings.n_layers))
        self.norm = RMSNorm(d, eps)
        self.out = nn.Linear(d, d_out, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.patch_in(patches) + self.position
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x))


class PatchInputTransformer(Transformer):
    """The family's Transformer whose patch positions read projected (or encoded) image patches.

    ``images``: float [batch, images_per_row, patches_per_image, patch_dim]; row b's placeholders,
    in order, take its images' patches in order, so each row must hold exactly
    ``images_per_row * patches_per_image`` placeholders. Without ``images`` (text only, or cached
    decoding after the image) the input may hold no placeholder.
    """

    def __init__(self, cfg: MultimodalModelConfig):
        super().__init__(cfg)
        settings = cfg.multimodal
        rows, columns = cfg.patch_grid
        self.patches_per_image, self.patch_id = rows * columns, cfg.patch_token_id
        self.patch_proj: nn.Linear | None = None
        self.image_encoder: ImageEncoder | None = None
        if settings.route == "continuous":
            self.patch_proj = nn.Linear(cfg.patch_dim, cfg.d_model, bias=False)
        else:
            self.image_encoder = ImageEncoder(settings.encoder, cfg.patch_dim, self.patches_per_image, cfg.d_model,
                                              cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()  # every Linear / Embedding / RMSNorm, the image side's included
        if getattr(self, "image_encoder", None) is not None:
            nn.init.normal_(self.image_encoder.position, std=self.cfg.init_std)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[batch, images, patches, patch_dim] -> [batch, images * patches, d_model]."""
        if images.dim() != 4 or images.shape[2] != self.patches_per_image:
            raise ValueError(f"images must be [batch, images, {self.patches_per_image} patches, patch_dim], got "
                             f"{list(images.shape)}")
        b, k, p, dim = images.shape
        dtype = self.embed.weight.dtype
        if self.patch_proj is not None:
            features = self.patch_proj(images.to(dtype))
        else:
            assert self.image_encoder is not None
            features = self.image_encoder(images.reshape(b * k, p, dim).to(dtype))
        return features.reshape(b, k * p, -1)

    def embed_inputs(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        x = self.embed(input_ids)
        placeholders = input_ids == self.patch_id
        if images is None:
            if bool(placeholders.any()):
                raise ValueError("the input holds image-patch placeholders but no images were given")
            return x
        expected = images.shape[1] * images.shape[2]
        found = placeholders.sum(dim=1)
        if bool((found != expected).any()):
            raise ValueError(f"each row must hold {expected} image-patch placeholders ({images.shape[1]} images of "
                             f"{images.shape[2]} patches), found {found.tolist()}")
        features = self.image_features(images).to(x.dtype)
        mask = placeholders.unsqueeze(-1).expand_as(x)
        return x + torch.zeros_like(x).masked_scatter(mask, features)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,  # type: ignore[override]
                kv_cache: KVCache | None = None, sequence_shard: object | None = None,
                images: torch.Tensor | None = None) -> ModelOutput:
        if sequence_shard is not None:
            raise ValueError("context parallelism is not supported by the continuous / encoder routes")
        start_pos = kv_cache.length if kv_cache is not None else 0
        if start_pos + input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + input_ids.shape[1]} tokens exceeds max_seq_len "
                             f"{self.cfg.max_seq_len}")
        layout = self.token_layout(input_ids, start_pos, kv_cache)
        x = self.embed_inputs(input_ids, images)
        for i, block in enumerate(self.blocks):
            rope = self.local_rope if self.local_rope is not None and block.attn.window is not None else self.rope
            x = block(x, rope, kv_cache.layers[i] if kv_cache is not None else None, start_pos, layout)
        if kv_cache is not None:
            kv_cache.length = start_pos + input_ids.shape[1]
        return self.output(x, targets)


# ---- counting -------------------------------------------------------------------------------
def image_side_parameters(cfg: MultimodalModelConfig) -> int:
    """Parameters of the patch projection (continuous) or of the image encoder and its output
    projection (encoder); 0 for the discrete route."""
    settings = cfg.multimodal
    if settings.route == "discrete":
        return 0
    if settings.route == "continuous":
        return cfg.patch_dim * cfg.d_model
    enc = settings.encoder
    d = enc.d_model
    rows, columns = cfg.patch_grid
    layer = 4 * d * d + 3 * d * enc.resolved_d_ff + 2 * d  # qkv + output, SwiGLU, two norms
    return cfg.patch_dim * d + rows * columns * d + enc.n_layers * layer + d + d * cfg.d_model


def image_side_flops_per_patch(cfg: MultimodalModelConfig) -> int:
    """Training FLOPs (forward + backward) per image patch, by the decoder's convention: 6 per
    weight of a matmul the patch passes through, and for the encoder's attention 12 * n_layers *
    d_model * patches (every patch attends to all patches of its image)."""
    settings = cfg.multimodal
    if settings.route == "discrete":
        return 0
    if settings.route == "continuous":
        return 6 * cfg.patch_dim * cfg.d_model
    enc = settings.encoder
    d = enc.d_model
    rows, columns = cfg.patch_grid
    matmul_weights = cfg.patch_dim * d + enc.n_layers * (4 * d * d + 3 * d * enc.resolved_d_ff) + d * cfg.d_model
    return 6 * matmul_weights + 12 * enc.n_layers * d * rows * columns


def patch_share(cfg: MultimodalModelConfig, seq_len: int) -> float:
    """The share of a training row's positions that are image patches (continuous / encoder routes)."""
    if cfg.multimodal.route == "discrete":
        return 0.0
    rows, columns = cfg.patch_grid
    return cfg.multimodal.examples_per_row * rows * columns / seq_len


def count_multimodal_parameters(cfg: MultimodalModelConfig) -> ParameterCounts:  # type: ignore[override]
    """The decoder's counts plus the image side (counted as non-embedding, active for every token
    of an image)."""
    base = count_parameters(cfg)
    extra = image_side_parameters(cfg)
    return ParameterCounts(total=base.total + extra, active=base.active + extra, embedding=base.embedding,
                           lm_head=base.lm_head, non_embedding=base.non_embedding + extra)


def multimodal_flops_per_token(cfg: MultimodalModelConfig, seq_len: int) -> int:  # type: ignore[override]
    """Training FLOPs per token: the decoder's (nn/counting.py) plus the image side's FLOPs per
    patch times the share of positions that are patches."""
    decoder = flops_per_token(cfg, seq_len)
    return decoder + math.ceil(image_side_flops_per_patch(cfg) * patch_share(cfg, seq_len))
