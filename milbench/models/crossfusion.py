"""CrossFusion (Soraki et al., MIDL 2026, arXiv 2503.02064) and its two ablations, as discrete-time survival models.

The 10x patches are the source: they query the 5x (coarse) and 20x (fine) patches through cross-attention blocks;
the two cross-scale streams and the source stream each pass a Pad-Transformer; the Conv Processor fuses the three
token grids; a class token and a final Pad-Transformer give the slide embedding for the 4-bin hazard head.
Defaults are the authors' training configuration (embed 512, 4 heads, 1 layer per block, mlp ratio 2, dropout 0.3,
self-attention dropout 0.2, cross-attention dropout 0).

Fix-or-reproduce: the reference keeps attention dropout on in eval mode (stochastic predictions); here it is off
in eval, and ``attn_dropout_in_eval=True`` reproduces the reference.

Attention maps (``return_attention=True``; 1-D float32 tensors, detached):
  ``"coarse"`` [N5]: attention each 5x patch receives in the coarse cross-attention, mean over 10x queries and heads;
  ``"fine"``   [N20]: the same for the 20x patches in the fine cross-attention;
  ``"source"`` [N10]: attention each 10x patch receives in the last self-attention layer of the source
               Pad-Transformer (mean over queries and heads; padded copies folded onto their originals);
  ``"final"``  [N10]: the class token's attention to each 10x position in the last layer of the final
               Pad-Transformer (padded copies folded back; renormalised over the patches).
Each map sums to 1. ``crossfusion_single`` returns ``"20x"`` [N20] (its Pad-Transformer) and ``"final"`` [N20].
"""

from __future__ import annotations

import torch
import torch.nn as nn

from milbench.data.bag import Bag
from milbench.models.layers.attention import MultiheadSDPA, key_attention, split_heads
from milbench.models.layers.common import FeedForward, HazardHead, ModelOutput, init_linear_trunc_normal
from milbench.models.layers.position import PPEG, fold_square_pad, square_pad
from milbench.models.registry import register_model


def input_projection(in_dim: int, dim: int) -> nn.Module:
    """Per-scale projection of backbone features: Linear + LayerNorm, identity when the widths already agree."""
    return nn.Identity() if in_dim == dim else nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim))


@torch.no_grad()
def class_token_attention(attn: MultiheadSDPA, x: torch.Tensor) -> torch.Tensor:
    """Attention of the first (class) token of ``x`` [B, N, d] to every token, mean over heads: [B, N]."""
    return key_attention(split_heads(attn.q(x[:, :1]), attn.n_heads), split_heads(attn.k(x), attn.n_heads))


class CrossAttentionBlock(nn.Module):
    """Source tokens query one other scale: y = LN(x + MHA(x + e, ctx + e)); y = y + FFN(y), e the scale embedding."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float, dropout: float, attn_dropout: float,
                 attn_dropout_in_eval: bool) -> None:
        super().__init__()
        self.scale_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn = MultiheadSDPA(dim, n_heads, attn_dropout, dropout_in_eval=attn_dropout_in_eval)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` [B, N, d] (10x), ``context`` [B, M, d] -> ([B, N, d], attention each context token receives [B, M])."""
        a, w = self.attn(x + self.scale_embedding, context + self.scale_embedding, need_weights=need_weights)
        y = self.norm(x + a)
        return y + self.ffn(y), w


class TransformerLayer(nn.Module):
    """The reference's layer order, which normalises the residual stream itself: x = LN1(x); x = x + MHA(x);
    x = LN2(x); x = x + FFN(x)."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float, dropout: float, attn_dropout: float,
                 attn_dropout_in_eval: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiheadSDPA(dim, n_heads, attn_dropout, dropout_in_eval=attn_dropout_in_eval)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, weights: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``weights``: None, ``"keys"`` (attention each token receives) or ``"cls"`` (the first token's attention)."""
        x = self.norm1(x)
        a, w = self.attn(x, need_weights=weights == "keys")
        if weights == "cls":
            w = class_token_attention(self.attn, x)
        x = self.norm2(x + a)
        return x + self.ffn(x), w


class PadTransformer(nn.Module):
    """Square padding, transformer block, PPEG (feature tokens only), transformer block, LayerNorm."""

    def __init__(self, dim: int, n_heads: int, depth: int, mlp_ratio: float, dropout: float, attn_dropout: float,
                 attn_dropout_in_eval: bool) -> None:
        super().__init__()
        args = (dim, n_heads, mlp_ratio, dropout, attn_dropout, attn_dropout_in_eval)
        self.pre = nn.ModuleList(TransformerLayer(*args) for _ in range(depth))
        self.ppeg = PPEG(dim)
        self.post = nn.ModuleList(TransformerLayer(*args) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, cls_token: torch.Tensor | None = None, need_weights: bool = False
                ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """``x`` [B, N, d] -> (tokens [B, (1 +) side^2, d], side, last layer's attention [B, N] or None).

        With ``cls_token`` [1, 1, d] prepended, the weights are the class token's attention to the N patches,
        renormalised; without, the attention each patch receives. Padded copies are folded onto their originals.
        """
        n = x.shape[1]
        x, side = square_pad(x)
        n_cls = 0 if cls_token is None else 1
        if cls_token is not None:
            x = torch.cat([cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for layer in self.pre:
            x, _ = layer(x)
        if n_cls:
            x = torch.cat([x[:, :1], self.ppeg(x[:, 1:], side)], dim=1)
        else:
            x = self.ppeg(x, side)
        w = None
        for i, layer in enumerate(self.post):
            last = need_weights and i == len(self.post) - 1
            x, w = layer(x, weights=("cls" if n_cls else "keys") if last else None)
        if w is not None:
            w = fold_square_pad(w[:, n_cls:], n)
            w = w / w.sum(dim=-1, keepdim=True)
        return self.norm(x), side, w


class MultiScaleConv(nn.Module):
    """Grouped 7x7 + 5x5 + 3x3 convolutions plus a grouped 1x1 shortcut projection, summed.

    Training runs it as one merged depthwise convolution (:mod:`milbench.accel.rewrites`): the grouped kernels took
    115 ms forward and backward on a 117 x 117 grid on an H100 (docs/performance.md).
    """

    def __init__(self, in_dim: int, out_dim: int, groups: int) -> None:
        super().__init__()
        self.conv7 = nn.Conv2d(in_dim, out_dim, 7, padding=3, groups=groups)
        self.conv5 = nn.Conv2d(in_dim, out_dim, 5, padding=2, groups=groups)
        self.conv3 = nn.Conv2d(in_dim, out_dim, 3, padding=1, groups=groups)
        self.shortcut = nn.Conv2d(in_dim, out_dim, 1, groups=groups)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.conv7(grid) + self.conv5(grid) + self.conv3(grid) + self.shortcut(grid)


class ConvProcessor(nn.Module):
    """Fuses token grids: Conv3d(n_scales->1, 1x1x1) over the scales (omitted for one scale), MultiScaleConv
    (d -> d/2, groups d/2), ReLU, Dropout2d, tokens, Linear(d/2 -> d) + LayerNorm."""

    def __init__(self, dim: int, dropout: float, n_scales: int = 3) -> None:
        super().__init__()
        self.scale_fusion = nn.Conv3d(n_scales, 1, kernel_size=1) if n_scales > 1 else None
        self.conv = nn.Sequential(MultiScaleConv(dim, dim // 2, dim // 2), nn.ReLU(), nn.Dropout2d(dropout))
        self.expand = nn.Sequential(nn.Linear(dim // 2, dim), nn.LayerNorm(dim))

    def fuse_scales(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The 1x1x1 Conv3d over the stacked scales: tokens [B, N, d] per scale -> [B, N, d]."""
        return self.scale_fusion(torch.stack(maps, dim=1).unsqueeze(-1))[:, 0, ..., 0]

    def forward(self, maps: list[torch.Tensor], side: int) -> torch.Tensor:
        """``maps``: tokens [B, side^2, d] per scale (source, fine, coarse) -> fused tokens [B, side^2, d]."""
        x = maps[0] if self.scale_fusion is None else self.fuse_scales(maps)
        b, n, d = x.shape
        grid = x.transpose(1, 2).reshape(b, d, side, side)  # a channels-last view of the tokens, no copy
        grid = self.conv(grid)
        return self.expand(grid.flatten(2).transpose(1, 2))


class ConcatFusion(nn.Module):
    """The "w/o CP" ablation's fusion: concatenate the scales' tokens along channels, Linear(3d -> d) + LayerNorm."""

    def __init__(self, dim: int, n_scales: int = 3) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(n_scales * dim, dim), nn.LayerNorm(dim))

    def forward(self, maps: list[torch.Tensor], side: int) -> torch.Tensor:
        return self.proj(torch.cat(maps, dim=-1))


def init_crossfusion(model: nn.Module) -> None:
    """The reference init: Linear trunc-normal(0.02) with zero bias, LayerNorm (1, 0), convolutions kaiming-normal
    (fan_out, relu) with zero bias; class token N(0, 1e-6), scale embeddings trunc-normal(0.02)."""
    init_linear_trunc_normal(model)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, CrossAttentionBlock):
            nn.init.trunc_normal_(m.scale_embedding, std=0.02)
    nn.init.normal_(model.cls_token, std=1e-6)


@register_model("crossfusion")
class CrossFusion(nn.Module):

    def __init__(self, in_dim: int, n_bins: int = 4, embed_dim: int = 512, n_heads: int = 4, n_layers: int = 1,
                 mlp_ratio: float = 2.0, dropout: float = 0.3, attn_dropout: float = 0.2,
                 cross_attn_dropout: float = 0.0, attn_dropout_in_eval: bool = False) -> None:
        super().__init__()
        d = embed_dim
        # 1. per-scale input projections (5x coarse, 10x source, 20x fine)
        self.embed_coarse = input_projection(in_dim, d)
        self.embed_source = input_projection(in_dim, d)
        self.embed_fine = input_projection(in_dim, d)
        # 2. cross-attention blocks: the 10x source queries 5x and 20x
        cab = (d, n_heads, mlp_ratio, dropout, cross_attn_dropout, attn_dropout_in_eval)
        self.cross_coarse = CrossAttentionBlock(*cab)
        self.cross_fine = CrossAttentionBlock(*cab)
        # 3. a Pad-Transformer per stream
        pt = (d, n_heads, n_layers, mlp_ratio, dropout, attn_dropout, attn_dropout_in_eval)
        self.pt_coarse = PadTransformer(*pt)
        self.pt_fine = PadTransformer(*pt)
        self.pt_source = PadTransformer(*pt)
        # 4. fusion of the three streams
        self.fusion = self.make_fusion(d, dropout)
        # 5. class token, final Pad-Transformer, hazard head
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pt_final = PadTransformer(*pt)
        self.head = HazardHead(d, n_bins)
        init_crossfusion(self)

    def make_fusion(self, dim: int, dropout: float) -> nn.Module:
        """The Conv Processor (the ablation overrides this)."""
        return ConvProcessor(dim, dropout, n_scales=3)

    def forward(self, bag: Bag, return_attention: bool = False) -> ModelOutput:
        x_coarse = self.embed_coarse(bag.features["5x"].unsqueeze(0))
        x_source = self.embed_source(bag.features["10x"].unsqueeze(0))
        x_fine = self.embed_fine(bag.features["20x"].unsqueeze(0))
        coarse, w_coarse = self.cross_coarse(x_source, x_coarse, need_weights=return_attention)
        fine, w_fine = self.cross_fine(x_source, x_fine, need_weights=return_attention)
        coarse, side, _ = self.pt_coarse(coarse)
        fine, _, _ = self.pt_fine(fine)
        source, _, w_source = self.pt_source(x_source, need_weights=return_attention)
        x = self.fusion([source, fine, coarse], side)
        x, _, w_final = self.pt_final(x, cls_token=self.cls_token, need_weights=return_attention)
        logits = self.head(x[:, 0])
        if not return_attention:
            return ModelOutput(logits)
        n10 = x_source.shape[1]
        maps = {"coarse": w_coarse, "fine": w_fine, "source": w_source, "final": fold_square_pad(w_final, n10)}
        return ModelOutput(logits, None, {k: v[0] for k, v in maps.items()})


@register_model("crossfusion_concat")
class CrossFusionConcat(CrossFusion):
    def make_fusion(self, dim: int, dropout: float) -> nn.Module:
        """Concatenation and projection instead of the Conv Processor."""
        return ConcatFusion(dim, n_scales=3)


@register_model("crossfusion_single")
class CrossFusionSingle(nn.Module):

    def __init__(self, in_dim: int, n_bins: int = 4, embed_dim: int = 512, n_heads: int = 4, n_layers: int = 1,
                 mlp_ratio: float = 2.0, dropout: float = 0.3, attn_dropout: float = 0.2,
                 attn_dropout_in_eval: bool = False) -> None:
        super().__init__()
        d = embed_dim
        pt = (d, n_heads, n_layers, mlp_ratio, dropout, attn_dropout, attn_dropout_in_eval)
        # 1. input projection of the 20x patches
        self.embed = input_projection(in_dim, d)
        # 2. one Pad-Transformer
        self.pt = PadTransformer(*pt)
        # 3. Conv Processor without the scale fusion
        self.fusion = ConvProcessor(d, dropout, n_scales=1)
        # 4. class token, final Pad-Transformer, hazard head
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pt_final = PadTransformer(*pt)
        self.head = HazardHead(d, n_bins)
        init_crossfusion(self)

    def forward(self, bag: Bag, return_attention: bool = False) -> ModelOutput:
        x = self.embed(bag.features["20x"].unsqueeze(0))
        n = x.shape[1]
        x, side, w_20x = self.pt(x, need_weights=return_attention)
        x = self.fusion([x], side)
        x, _, w_final = self.pt_final(x, cls_token=self.cls_token, need_weights=return_attention)
        logits = self.head(x[:, 0])
        if not return_attention:
            return ModelOutput(logits)
        return ModelOutput(logits, None, {"20x": w_20x[0], "final": fold_square_pad(w_final, n)[0]})
