"""Shared layers: every model in the zoo is assembled from these.

All softmax attention goes through ``scaled_dot_product_attention`` so memory stays linear in the number of
tokens (the fused kernels on CPU and GPU); attention maps are materialised only when a caller asks for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelOutput(NamedTuple):
    """What every model's ``forward(bag)`` returns.

    ``logits``: [1, n_bins] discrete-time hazard logits (hazards = sigmoid(logits)), or the output of another head
    kind the model declares as ``head_kind`` (``"cox"``: [1, 1] log-risk; ``"mdn"``: [1, 3, K] mixture parameters;
    see :mod:`milbench.survival.losses`).
    ``aux_loss``: an optional label-free scalar added to the survival loss (e.g. ProtoSurv's prototype losses).
    ``attention``: named attention maps for heatmaps, e.g. ``{"20x": [N]}``; filled only when asked.
    ``tasks``: named extra outputs of the same shape and kind as ``logits`` (DSMIL's max-instance logits, MuSTMIL's
    per-scale heads). The engine trains each with the same survival loss on the same target and adds it with weight
    1 to the loss of ``logits`` (there is no per-task weight); prediction reads ``logits`` only.
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None
    attention: dict[str, torch.Tensor] = {}
    tasks: dict[str, torch.Tensor] = {}


def init_linear_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """Transformer-style init: Linear weights trunc-normal(std), zero bias; LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def mlp(dims: list[int], dropout: float = 0.0, act: type[nn.Module] = nn.ReLU, last_act: bool = True) -> nn.Sequential:
    """Linear -> act -> dropout stacks; ``mlp([2048, 512])`` is AMIL's Linear+ReLU feature layer."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(dims) - 2:
            layers.append(act())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def segment_softmax(scores: torch.Tensor, segment: torch.Tensor | None, n_segments: int = 1) -> torch.Tensor:
    """Softmax of ``scores`` [N] (or [N, K]: K softmaxes) over the rows of each segment (bag); one segment when
    ``segment`` is None.

    Used to pack several bags into one forward pass: numerically the same as one softmax per bag. The per-segment
    maxima and sums go through a [segments, N] membership mask (:func:`segment_max`, :func:`segment_sum`), not
    scatter/index_add: thousands of rows adding into a few dozen segments serialise GPU atomics.
    """
    if segment is None:
        return torch.softmax(scores, dim=0)
    e = torch.exp(scores - segment_max(scores, segment, n_segments)[segment])
    return e / segment_sum(e, segment, n_segments)[segment]


def _members(segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """[n_segments, N] bool: row j belongs to segment i."""
    return torch.arange(n_segments, device=segment.device).unsqueeze(1) == segment.unsqueeze(0)


def segment_sum(values: torch.Tensor, segment: torch.Tensor | None, n_segments: int = 1) -> torch.Tensor:
    """Sum rows of ``values`` [N] or [N, d] per segment -> [n_segments] or [n_segments, d]: one matrix product with
    the membership mask (float32 accumulation, no atomics)."""
    if segment is None:
        return values.sum(dim=0, keepdim=True)
    flat = values.reshape(values.shape[0], -1)
    return (_members(segment, n_segments).to(flat.dtype) @ flat).view(n_segments, *values.shape[1:])


def _masked_rows(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """[n_segments, N, ...]: ``values`` where the row belongs to the segment, -inf elsewhere."""
    members = _members(segment, n_segments).view(n_segments, -1, *([1] * (values.dim() - 1)))
    return torch.where(members, values.unsqueeze(0), torch.tensor(float("-inf"), dtype=values.dtype,
                                                                   device=values.device))


def segment_max(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Maximum of ``values`` [N] or [N, K] over each segment's rows -> [n_segments] or [n_segments, K]."""
    return _masked_rows(values, segment, n_segments).amax(dim=1)


class GatedAttention(nn.Module):
    """Ilse et al.'s gated attention scorer: score_i = w^T (tanh(V h_i) * sigmoid(U h_i)) -> [N]."""

    def __init__(self, dim: int, hidden: int = 256, dropout: float = 0.0, n_heads: int = 1) -> None:
        super().__init__()
        self.attn_a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), *([nn.Dropout(dropout)] if dropout else []))
        self.attn_b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), *([nn.Dropout(dropout)] if dropout else []))
        self.attn_c = nn.Linear(hidden, n_heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn_c(self.attn_a(h) * self.attn_b(h)).squeeze(-1)


class AttentionPool(nn.Module):
    """Gated-attention pooling of instances into one embedding per bag (softmax over the bag's instances)."""

    def __init__(self, dim: int, hidden: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.score = GatedAttention(dim, hidden, dropout)

    def forward(
        self, h: torch.Tensor, segment: torch.Tensor | None = None, n_segments: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` [N, d] -> (pooled [n_segments, d], attention weights [N])."""
        a = segment_softmax(self.score(h).float(), segment, n_segments).to(h.dtype)
        return segment_sum(a.unsqueeze(-1) * h, segment, n_segments), a


class HazardHead(nn.Linear):
    """The shared discrete-time survival head: one logit per time bin (hazard = sigmoid(logit))."""

    def __init__(self, dim: int, n_bins: int = 4) -> None:
        super().__init__(dim, n_bins)


class MultiheadSDPA(nn.Module):
    """Multi-head attention with separate q/k/v projections on ``scaled_dot_product_attention``.

    ``attn_dropout`` applies while training; ``dropout_in_eval=True`` reproduces the CrossFusion reference, which
    keeps it on in eval. ``need_weights`` also returns the attention each key receives (averaged over heads and
    queries, see :func:`key_attention`), computed in chunks so heatmaps never cost N^2 memory.
    """

    def __init__(
        self, dim: int, n_heads: int, attn_dropout: float = 0.0, bias: bool = True, dropout_in_eval: bool = False
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {n_heads} heads")
        self.n_heads, self.attn_dropout, self.dropout_in_eval = n_heads, attn_dropout, dropout_in_eval
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)
        self.out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` [B, Nq, d] attends to ``context`` [B, Nk, d] (itself when None).

        Returns (output [B, Nq, d], weights [B, Nk] = attention each key receives averaged over queries and
        heads, or None).
        """
        ctx = x if context is None else context
        q, k, v = self._heads(self.q(x)), self._heads(self.k(ctx)), self._heads(self.v(ctx))
        p = self.attn_dropout if (self.training or self.dropout_in_eval) else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        y = self.out(y.transpose(1, 2).reshape(x.shape))
        weights = key_attention(q, k) if need_weights else None
        return y, weights


@torch.no_grad()
def key_attention(q: torch.Tensor, k: torch.Tensor, max_scores: int = 2**26) -> torch.Tensor:
    """Mean attention each key receives, over heads and queries, in query chunks of at most ``max_scores`` scores."""
    b, h, nq, dh = q.shape
    chunk = max(1, max_scores // (b * h * k.shape[2]))
    total = torch.zeros(b, k.shape[2], device=q.device, dtype=torch.float32)
    for s in range(0, nq, chunk):
        att = torch.softmax((q[:, :, s : s + chunk].float() @ k.float().transpose(-1, -2)) / math.sqrt(dh), dim=-1)
        total += att.sum(dim=(1, 2))
    return total / (h * nq)


def _fft_size(n: int) -> int:
    """The smallest length >= n with no prime factor above 7 (the sizes cuFFT transforms fastest)."""
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


@torch.compiler.disable  # the transform sizes depend on the grid: computed eagerly, never a recompilation
def fft_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=C)`` for odd kernels [C, 1, kh, kw], computed
    as a product of Fourier transforms in float32 (the same function up to float32 rounding): a convolution is a
    product in frequency space, zero-padded past the kernel's reach so no value wraps around. Only the dimensions
    the kernel spans are transformed (a (33, 1) kernel is a 1-D transform along the sequence)."""
    c, kh, kw = weight.shape[0], weight.shape[-2], weight.shape[-1]
    spans = [(d, k, x.shape[d]) for d, k in ((-2, kh), (-1, kw)) if k > 1]
    dims = [d for d, _, _ in spans]
    sizes = [_fft_size(n + k - 1) for _, k, n in spans]
    with torch.autocast(x.device.type, enabled=False):
        kernel = torch.fft.rfftn(weight.float().reshape(1, c, kh, kw).flip(dims), s=sizes, dim=dims)
        y = torch.fft.irfftn(torch.fft.rfftn(x.float(), s=sizes, dim=dims) * kernel, s=sizes, dim=dims)
        for d, k, n in spans:  # the 'same' window of the full convolution
            y = y.narrow(d, k // 2, n)
        return y if bias is None else y + bias.float().view(1, -1, 1, 1)


FFT_MIN_TAPS = 15  # kernels this long or longer (in one dimension) run through Fourier transforms on CUDA


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """'Same'-padded depthwise convolution with odd kernels [C, 1, kh, kw]. On CUDA a long kernel goes through
    Fourier transforms (:func:`fft_depthwise_conv2d`): TransMIL's 33 x 1 residual convolution at the average bag took
    4.9 ms forward and backward in PyTorch's depthwise kernel, 1.3 ms so (H100, docs/performance.md); a 7 x 7
    kernel stays a convolution (there the transforms were slower, 1.2 against 0.8 ms, as was a Triton kernel)."""
    if x.is_cuda and max(weight.shape[-2:]) >= FFT_MIN_TAPS:
        return fft_depthwise_conv2d(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=(weight.shape[-2] // 2, weight.shape[-1] // 2), groups=weight.shape[0])


def summed_kernel(convs: Sequence[nn.Conv2d]) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of the sum of same-centred convolutions (odd square kernels, same groups and 'same' padding):
    each kernel zero-padded to the largest, then added. One convolution with them computes the sum of all."""
    size = max(c.kernel_size[0] for c in convs)
    weight = sum(F.pad(c.weight, [(size - c.kernel_size[0]) // 2] * 4) for c in convs)
    return weight, sum(c.bias for c in convs)


class PPEG(nn.Module):
    """Pyramid position encoding generator (TransMIL): x + DWConv7 + DWConv5 + DWConv3 on the token grid.

    The three depthwise convolutions run as one with their summed kernel (:func:`summed_kernel`): the same
    function, a third of the convolution kernels, whose backward dominated TransMIL's GPU step
    (docs/performance.md). The residual x stays a separate float32 sum, as in the three-convolution form.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        """``tokens`` [B, side*side, d] (no class token) -> same shape."""
        b, n, d = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, d, side, side)
        weight, bias = summed_kernel((self.proj7, self.proj5, self.proj3))
        grid = grid + depthwise_conv2d(grid, weight, bias)
        return grid.flatten(2).transpose(1, 2)


def square_pad(tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Pad [B, N, d] to side^2 tokens by re-appending the first tokens (TransMIL / CrossFusion); returns side."""
    n = tokens.shape[1]
    side = max(1, math.ceil(math.sqrt(n)))
    extra = side * side - n
    if extra:  # side^2 - N < N for every N >= 1, so the first tokens always suffice
        tokens = torch.cat([tokens, tokens[:, :extra]], dim=1)
    return tokens, side


class FeedForward(nn.Sequential):
    """Transformer feed-forward: Linear(d->hidden) -> GELU -> Dropout -> Linear(hidden->d) -> Dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )


def fold_square_pad(weights: torch.Tensor, n: int) -> torch.Tensor:
    """Undo ``square_pad`` on per-token weights [B, side^2] -> [B, n]: each re-appended copy adds to its original."""
    extra = weights.shape[-1] - n
    out = weights[..., :n].clone()
    out[..., :extra] += weights[..., n:]
    return out


class AdditiveAttention(nn.Module):
    """Ilse et al.'s non-gated attention scorer: score_i = W act(V h_i) -> [N] (or [N, n_heads]); MuSTMIL, CS-MIL."""

    def __init__(self, dim: int, hidden: int, n_heads: int = 1, act: type[nn.Module] = nn.Tanh) -> None:
        super().__init__()
        self.attn_v = nn.Linear(dim, hidden)
        self.act = act()
        self.attn_w = nn.Linear(hidden, n_heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        s = self.attn_w(self.act(self.attn_v(h)))
        return s.squeeze(-1) if s.shape[-1] == 1 else s


class _PerturbedTopK(torch.autograd.Function):
    """Perturbed maximum (Berthet et al. 2020) of the top-k indicator, as ZoomMIL uses it.

    Forward: mean over ``n`` Gaussian perturbations of the one-hot top-k indicator [k, N] (rows = the selected
    indices in increasing order). Backward: the Monte-Carlo estimate E[indicator * noise] / sigma, which only needs
    each sample's k indices and its noise (O(n N) memory, not the [n, k, N] one-hot tensor).
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int, n: int, sigma: float) -> torch.Tensor:
        noise = torch.randn(n, scores.shape[0], device=scores.device, dtype=scores.dtype)
        idx = torch.topk(scores + sigma * noise, k, dim=-1).indices.sort(dim=-1).values  # [n, k]
        indicator = torch.zeros(k, scores.shape[0], device=scores.device, dtype=scores.dtype)
        indicator.scatter_add_(1, idx.T, torch.full((k, n), 1.0 / n, device=scores.device, dtype=scores.dtype))
        ctx.save_for_backward(idx, noise)
        ctx.sigma = sigma
        return indicator

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        idx, noise = ctx.saved_tensors
        per_sample = grad.gather(1, idx.T).sum(0)  # <grad, one-hot of sample s> -> [n]
        return noise.T @ per_sample / (noise.shape[0] * ctx.sigma), None, None, None


def perturbed_topk(scores: torch.Tensor, k: int, n_samples: int = 100, sigma: float = 0.002,
                   differentiable: bool = True) -> torch.Tensor:
    """Selection matrix [k, N] of the top-k of ``scores`` [N], indices in increasing order (ZoomMIL's zoom step).

    ``differentiable=True`` (training): the perturbed top-k, a soft average of one-hot rows with a gradient.
    ``differentiable=False`` (eval): the hard, deterministic one-hot top-k.
    """
    k = min(k, scores.shape[0])
    if differentiable:
        return _PerturbedTopK.apply(scores.float(), k, n_samples, sigma)
    idx = torch.topk(scores.detach().float(), k).indices.sort().values
    return F.one_hot(idx, scores.shape[0]).float()


def iterative_pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of square ``a`` [..., m, m] by the Nystromformer's cubic iteration.

    Starts from a^T / (max row sum * max column sum), both maxima taken over the whole tensor (all heads).
    """
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    z = a.transpose(-1, -2) / (a.abs().sum(-1).max() * a.abs().sum(-2).max())
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    """Nystrom self-attention (Xiong et al. 2021) as TransMIL uses it, O(N m d) for m landmarks.

    The sequence is zero-padded on the left to a multiple of m; landmarks are segment means of q and k;
    softmax(q k^T) ~ softmax(q k_l^T) pinv(softmax(q_l k_l^T)) softmax(q_l k^T); a depthwise conv over the
    sequence (per head) adds a residual on the values. Both N x m softmax products run in
    scaled_dot_product_attention; only the m x m kernel and its pseudo-inverse are formed (in float32).
    ``slicing="last"`` returns the last N rows (nystrom-attention >= 0.0.12, the CrossFusion repository);
    ``"first"`` returns the first N rows, as nystrom-attention 0.0.9 (the TransMIL repository) does.
    """

    def __init__(self, dim: int, n_heads: int = 8, head_dim: int = 64, n_landmarks: int = 256, pinv_iters: int = 6,
                 residual_kernel: int = 33, dropout: float = 0.0, slicing: str = "last") -> None:
        super().__init__()
        if slicing not in ("last", "first"):
            raise ValueError(f"Nystrom slicing must be 'last' or 'first', not {slicing!r}")
        self.n_heads, self.head_dim, self.n_landmarks = n_heads, head_dim, n_landmarks
        self.pinv_iters, self.slicing = pinv_iters, slicing
        self.qkv = nn.Linear(dim, 3 * n_heads * head_dim, bias=False)
        self.residual_conv = nn.Conv2d(n_heads, n_heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                       groups=n_heads, bias=False)
        self.out = nn.Sequential(nn.Linear(n_heads * head_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, weights_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` [B, N, d] -> (output [B, N, d], approximate attention of output row ``weights_of`` to every
        input token [B, N], mean over heads, or None)."""
        b, n, _ = x.shape
        m, h, dh = self.n_landmarks, self.n_heads, self.head_dim
        pad = -n % m
        x = F.pad(x, (0, 0, pad, 0))
        q, k, v = self.qkv(x).view(b, n + pad, 3, h, dh).permute(2, 0, 3, 1, 4)  # each [B, h, L, dh]
        q_land = q.reshape(b, h, m, -1, dh).mean(3)
        k_land = k.reshape(b, h, m, -1, dh).mean(3)
        landmark_values = F.scaled_dot_product_attention(q_land, k, v)  # softmax(q_l k^T) v: [B, h, m, dh]
        with torch.autocast(x.device.type, enabled=False):
            kernel = torch.softmax(q_land.float() @ k_land.float().transpose(-1, -2) / math.sqrt(dh), dim=-1)
            kernel_inv = iterative_pinv(kernel, self.pinv_iters)
            mixed = (kernel_inv @ landmark_values.float()).to(landmark_values.dtype)
        y = F.scaled_dot_product_attention(q, k_land, mixed) + depthwise_conv2d(v, self.residual_conv.weight)
        y = self.out(y.transpose(1, 2).reshape(b, n + pad, h * dh))
        first = pad if self.slicing == "last" else 0
        weights = None
        if weights_of is not None:
            weights = self._row_weights(q[:, :, first + weights_of], k, q_land, k_land, kernel_inv)[:, pad:]
        return y[:, first : first + n], weights

    @torch.no_grad()
    def _row_weights(self, q_row: torch.Tensor, k: torch.Tensor, q_land: torch.Tensor, k_land: torch.Tensor,
                     kernel_inv: torch.Tensor) -> torch.Tensor:
        """softmax(q_row k_l^T) pinv softmax(q_l k^T) for one query row [B, h, dh] -> [B, L] mean over heads."""
        s = 1.0 / math.sqrt(self.head_dim)
        with torch.autocast(k.device.type, enabled=False):
            left = torch.softmax(q_row.float().unsqueeze(2) @ k_land.float().transpose(-1, -2) * s, -1) @ kernel_inv
            right = torch.softmax(q_land.float() @ k.float().transpose(-1, -2) * s, dim=-1)  # [B, h, m, L]: O(N m)
            return (left @ right).squeeze(2).mean(1)


class WindowedSelfAttention(nn.Module):
    """Multi-head self-attention within contiguous windows of one token sequence (SCMIL's cluster-local attention).

    Windows are padded into one batch with a key mask, so a single scaled_dot_product_attention call serves them
    all; memory is O(N w) for windows of at most w tokens. q/k/v/out projections with bias, dropout on the
    attention probabilities (training only) and after the output projection.
    """

    def __init__(self, dim: int, n_heads: int, attn_dropout: float = 0.0, proj_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {n_heads} heads")
        self.n_heads, self.attn_dropout = n_heads, attn_dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(proj_dropout))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``x`` [L, d], ``lengths`` [W] (window sizes in order, summing to L) -> [L, d]."""
        n, d = x.shape
        w = lengths.numel()
        window = torch.repeat_interleave(torch.arange(w, device=x.device), lengths, output_size=n)
        pos = torch.arange(n, device=x.device) - (torch.cumsum(lengths, 0) - lengths)[window]
        width = int(lengths.max())

        def windows(t: torch.Tensor) -> torch.Tensor:
            grid = t.new_zeros(w, width, d)
            grid[window, pos] = t
            return grid.view(w, width, self.n_heads, d // self.n_heads).transpose(1, 2)

        mask = (torch.arange(width, device=x.device) < lengths.unsqueeze(1)).view(w, 1, 1, width)
        y = F.scaled_dot_product_attention(windows(self.q(x)), windows(self.k(x)), windows(self.v(x)), attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(w, width, d)[window, pos])


def segment_argmax(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Row index (into ``values`` [N, K]) of each segment's maximum per column -> [n_segments, K]; the first row on
    ties, as ``argmax`` picks. No host synchronisation (packed DSMIL's critical instances)."""
    return _masked_rows(values, segment, n_segments).argmax(dim=1)


class _CompiledForward:
    """A module's forward through ``torch.compile`` (dynamic shapes) for plain calls; a call that asks for more (a
    keyword set to anything but None/False, such as an attention map, or a str/bool positional) runs the eager
    forward, so rarely used paths are never compiled."""

    def __init__(self, forward, backend: str) -> None:
        self.eager = forward
        self.compiled = torch.compile(forward, dynamic=True, backend=backend)

    def __call__(self, *args, **kwargs):
        plain = not any(isinstance(a, (str, bool)) for a in args)
        plain = plain and all(v is None or v is False for v in kwargs.values())
        return (self.compiled if plain else self.eager)(*args, **kwargs)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile in place every submodule whose type is in ``model.hot_blocks`` (a model's heavy, repeated blocks).

    Same function, fewer kernels: pointwise ops, casts and norms fuse around the matmuls and attention, and the
    Python/launch overhead of a step shrinks. Shapes are dynamic (one compilation serves every bag size and every
    instance of a block type); parameter names and the state dict are untouched. Blocks, not the whole forward: the
    square padding's side, ceil(sqrt(N)), is a symbolic size inductor cannot lower (PyTorch 2.11-2.13), so it stays
    in eager glue and reaches the compiled PPEG / Conv Processor as a plain integer. Returns the number of compiled
    blocks (blocks nested in a compiled block are traced with it).
    """
    types = tuple(getattr(model, "hot_blocks", ()))
    compiled: list[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(c + ".") for c in compiled)
        if types and isinstance(module, types) and not inside and not isinstance(module.forward, _CompiledForward):
            module.forward = _CompiledForward(module.forward, backend)
            compiled.append(name)
    return len(compiled)
