"""Native-resolution patch embedding (NaViT "Patch n' Pack"): images of any size packed into one token sequence.

Image i with an (h_i, w_i) patch grid becomes T + h_i·w_i consecutive rows of one (total, E) tensor:

    out[cu_i + t]            = prefix_tokens[t] + pos_embed[t]                                  (t < T)
    out[cu_i + T + y·w_i + x] = Σ_k patch_i(y, x)[k] · weight[:, k] + bias + pos_i[y, x]

with pos_i the patch part of `pos_embed`, a (Gh, Gw) grid, resampled to (h_i, w_i) as timm's resample_abs_pos_embed
does for dynamic_img_size (F.interpolate, bicubic with antialiasing by default; bilinear for SigLIP 2 NaFlex).
Resampling is linear in the grid, so pos_i[y, x] = Σ_s w_s · grid[j_s] over a few taps: the kernels
gather those rows in the GEMM's epilogue (no per-image resampled copy exists), and the gradient flows back into the
base grid through the same taps. The tap tables come from running F.interpolate on one-hot grids (exactly torch's
weights), cached per (base grid, image grid, mode).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mmkern import _native, backends, reference
from mmkern.ops import cpu_policy
from mmkern.ops._checks import check_like, check_tensor, native_dtype
from mmkern.ops._eager import eager_function, plain_eager
from mmkern.ops.patch_embed import _backward_impl, check_prefix_and_bias

MODES = ("bicubic", "bilinear")


class PackedPatches(NamedTuple):
    """tokens (total, E); cu_seqlens int32 (N + 1,), image i is rows cu_seqlens[i]:cu_seqlens[i + 1]; grid_sizes the
    (h_i, w_i) patch grid of each image; max_seqlen the longest image's row count (for varlen_attention)."""

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    grid_sizes: list[tuple[int, int]]
    max_seqlen: int


def fit_grid(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """The patch grid an image of height × width pixels is resized to under `max_patches`: its aspect ratio kept,
    scaled down (never up) until h·w <= max_patches, each side rounded to the nearest whole patch, at least 1."""
    scale = min(1.0, math.sqrt(max_patches * patch * patch / (height * width)))
    h = max(1, round(height * scale / patch))
    w = max(1, round(width * scale / patch))
    while h * w > max_patches:  # rounding up may overshoot: shrink the longer side
        if h >= w:
            h -= 1
        else:
            w -= 1
    return h, w


@functools.lru_cache(maxsize=512)
def pos_taps(
    base: tuple[int, int], grid: tuple[int, int], mode: str = "bicubic", antialias: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index int32 (h·w, S), weight float32 (h·w, S)): row y·w + x of the base grid (Gh, Gw) resampled to
    grid (h, w) is Σ_s weight[., s] · base_row[index[., s]]; padded taps have weight 0.

    The weights are F.interpolate's own, read off by resampling the Gh·Gw one-hot grids: in general the 2-d weights
    are the product of per-axis ones, but torch's antialiased kernels resize an axis to length 1 differently
    ((3, 3) -> (9, 1) reads input row 0 only), and the one-hot grids reproduce that too."""
    (gh, gw), (h, w) = base, grid
    if base == grid:  # timm skips the interpolation when the sizes match
        return torch.arange(h * w, dtype=torch.int32).view(-1, 1), torch.ones(h * w, 1)
    G = gh * gw
    basis = torch.eye(G, dtype=torch.float64).view(1, G, gh, gw)
    dense = F.interpolate(basis, size=grid, mode=mode, antialias=antialias, align_corners=False).view(G, h * w).t()
    most = int((dense != 0).sum(1).max())
    index = dense.abs().topk(most, dim=1).indices
    return index.to(torch.int32), dense.gather(1, index).float()


def _rows(grids, num_prefix, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_rows (M,) int64: the output row of each patch row, prefix_rows (N·T,) int64), from Python ints only, so
    that the backward traces under torch.compile."""
    T, start, out_rows, prefix_rows = num_prefix, 0, [], []
    for h, w in grids:
        prefix_rows.append(torch.arange(start, start + T, device=device))
        out_rows.append(torch.arange(start + T, start + T + h * w, device=device))
        start += T + h * w
    return torch.cat(out_rows), torch.cat(prefix_rows)


def _taps(grids, base, mode, antialias, device):
    """The CSR taps of every patch row: (tap_ptr (M + 1,) int64, tap_index int32, tap_weight float32, the most taps
    of any row)."""
    index, weight, counts = [], [], []
    for g in grids:
        i, w = pos_taps(base, g, mode, antialias)
        keep = w != 0
        index.append(i[keep])
        weight.append(w[keep])
        counts.append(keep.sum(1))
    counts = torch.cat(counts)
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return ptr.to(device), torch.cat(index).to(device), torch.cat(weight).to(device), int(counts.max())


def _pairs(flat: list[int]) -> list[tuple[int, int]]:
    return list(zip(flat[0::2], flat[1::2]))


def _patchify(image: torch.Tensor, P: int) -> torch.Tensor:
    """(C, h·P, w·P) -> (h·w, C·P·P): row-major patches, elements in Conv2d weight order (c, py, px)."""
    C, H, W = image.shape
    return image.reshape(C, H // P, P, W // P, P).permute(1, 3, 0, 2, 4).reshape(-1, C * P * P)


def patch_embed_packed(
    images: list[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    pos_embed: torch.Tensor | None = None,
    prefix_tokens: torch.Tensor | None = None,
    pos_grid: tuple[int, int] | None = None,
    interpolation: str = "bicubic",
    antialias: bool = True,
    max_patches: int | None = None,
    backend: str | None = None,
) -> PackedPatches:
    """Embeds the patches of images of different sizes into one packed token sequence (see the module docstring).

    Args:
        images: a non-empty list of (C, H_i, W_i) tensors, one device and dtype (fp32, fp16, bf16; fp64 on the
            reference and torch backends). Without `max_patches`, H_i and W_i are multiples of P.
        weight: (E, C, P, P), a Conv2d(kernel_size=P, stride=P) weight; bias: (E,) or None, added to patch tokens.
        pos_embed: (Tp + Gh·Gw, E) or (1, Tp + Gh·Gw, E) or None: the model's learned embedding for a (Gh, Gw) patch
            grid, with Tp = T rows for the prefix tokens first or Tp = 0 (no position for the prefix tokens).
        prefix_tokens: (T, E) or None: class / register tokens placed before each image's patches.
        pos_grid: (Gh, Gw); None: the square grid the patch rows of pos_embed form.
        interpolation, antialias: how the grid is resampled to each image's grid, as F.interpolate: "bicubic" with
            antialias (timm's dynamic_img_size), or "bilinear" (SigLIP 2 NaFlex), align_corners=False.
        max_patches: resize every image to the grid fit_grid(H_i, W_i, P, max_patches) gives (aspect ratio kept, at
            most max_patches patches, never upscaled; bilinear with antialias) where its size differs.
        backend: "cpu", "cuda", "triton", "reference", "torch" or None (see mmkern.backends).

    Returns: PackedPatches(tokens (total, E) with total = Σ (T + h_i·w_i), cu_seqlens, grid_sizes, max_seqlen).
    """
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images: expected a non-empty list of (C, H, W) tensors")
    check_tensor(weight, "weight", ndim=4)
    E, C, P, P2 = weight.shape
    if P != P2 or P == 0:
        raise ValueError(f"weight: expected a square (E, C, P, P) kernel, got shape {tuple(weight.shape)}")
    if interpolation not in MODES:
        raise ValueError(f"interpolation: expected one of {', '.join(MODES)}, got {interpolation!r}")
    if max_patches is not None and max_patches < 1:
        raise ValueError(f"max_patches: expected a positive patch count, got {max_patches}")
    grids, pixels = [], []
    for i, image in enumerate(images):
        check_tensor(image, f"images[{i}]", ndim=3)
        check_like(f"images[{i}]", image, weight=weight)
        if image.shape[0] != C:
            raise ValueError(f"images[{i}]: has {image.shape[0]} channels but weight has {C}")
        H, W = image.shape[1:]
        if max_patches is None:
            if H % P or W % P or H == 0 or W == 0:
                raise ValueError(
                    f"images[{i}]: size {(H, W)} is not a positive multiple of the patch size {P}; "
                    "pass max_patches to resize"
                )
            grid = (H // P, W // P)
        else:
            grid = fit_grid(H, W, P, max_patches)
            if (grid[0] * P, grid[1] * P) != (H, W):
                size = (grid[0] * P, grid[1] * P)
                image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        grids.append(grid)
        pixels.append(image)
    check_like("weight", weight, bias=bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens)
    T = check_prefix_and_bias(prefix_tokens, bias, E)
    grid_rows, base = None, None
    if pos_embed is not None:
        grid_rows, base, prefix_pos = _split_pos_embed(pos_embed, E, T, pos_grid)
        if prefix_pos is not None:
            prefix_tokens = prefix_tokens + prefix_pos  # (T, E): a tiny add, its gradient by autograd
    device = weight.device
    bf16 = weight.dtype == torch.bfloat16
    chosen = backends.resolve(backend, device, "triton", lambda: cpu_policy.patch_embed_packed(bf16))
    native_dtype(chosen, "images", weight)
    if chosen in ("reference", "torch"):  # conv2d + F.interpolate per image, as a user writes it
        grid = None if grid_rows is None else grid_rows.reshape(*base, E)
        tokens = reference.patch_embed_packed(pixels, weight, bias, grid, prefix_tokens, interpolation, antialias)
    else:
        patches = torch.cat([_patchify(image, P) for image in pixels])
        args = (patches, weight, bias, grid_rows, prefix_tokens, [n for g in grids for n in g], list(base or ()))
        args += (interpolation, antialias, chosen)
        if plain_eager(patches, weight, bias, grid_rows, prefix_tokens):  # see mmkern/ops/_eager.py
            tokens = _EagerPatchEmbedPacked.apply(*args)
        else:
            tokens = torch.ops.mmkern.patch_embed_packed(*args)
    sizes = [T + h * w for h, w in grids]
    cu_seqlens = torch.tensor([0, *sizes], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    return PackedPatches(tokens, cu_seqlens, grids, max(sizes))


def _split_pos_embed(pos_embed, E, T, pos_grid):
    """(grid rows (Gh·Gw, E), (Gh, Gw), prefix rows (T, E) or None) of a (1,) (Tp + Gh·Gw, E) position embedding."""
    check_tensor(pos_embed, "pos_embed", ndim=(2, 3))
    if (pos_embed.dim() == 3 and pos_embed.shape[0] != 1) or pos_embed.shape[-1] != E:
        raise ValueError(f"pos_embed: expected (L, {E}) or (1, L, {E}), got {tuple(pos_embed.shape)}")
    pos_embed = pos_embed.reshape(-1, E)
    L = pos_embed.shape[0]
    if pos_grid is not None:
        base = (int(pos_grid[0]), int(pos_grid[1]))
        if min(base) < 1 or L not in (base[0] * base[1], T + base[0] * base[1]):
            raise ValueError(f"pos_embed: {L} rows do not hold a {base} grid (plus {T} prefix rows)")
    else:
        # A list, not next(generator, None): torch 2.8's dynamo does not take next()'s default.
        squares = [math.isqrt(n) for n in (L - T, L) if n > 0 and math.isqrt(n) ** 2 == n]
        if not squares:
            raise ValueError(f"pos_embed: {L} rows hold no square grid (plus {T} prefix rows); pass pos_grid")
        base = (squares[0], squares[0])
    Tp = L - base[0] * base[1]
    return pos_embed[Tp:], base, (pos_embed[:Tp] if Tp else None)


def _output_rows(grids, prefix_tokens) -> int:
    T = 0 if prefix_tokens is None else prefix_tokens.shape[0]
    return sum(T + h * w for h, w in _pairs(grids))


def _forward_impl(patches, weight, bias, grid_rows, prefix_tokens, grids, base, mode, antialias, backend):
    """The body of mmkern::patch_embed_packed."""
    pairs, E = _pairs(grids), weight.shape[0]
    T = 0 if prefix_tokens is None else prefix_tokens.shape[0]
    out_rows, prefix_rows = _rows(pairs, T, patches.device)
    taps = None if grid_rows is None else _taps(pairs, tuple(base), mode, antialias, patches.device)
    out = patches.new_empty(_output_rows(grids, prefix_tokens), E)
    if T:
        out.index_copy_(0, prefix_rows, prefix_tokens.expand(len(pairs), T, E).reshape(-1, E))
    tap_ptr, tap_index, tap_weight, most = taps or (None, None, None, 0)
    w2 = weight.reshape(E, -1)
    tensors = {
        "patches": patches,
        "weight": w2,
        "bias": bias,
        "pos_grid": grid_rows,
        "tap_ptr": tap_ptr,
        "tap_index": tap_index,
        "tap_weight": tap_weight,
        "out_rows": out_rows,
        "out": out,
    }
    if backend in ("cpu", "cuda"):
        _native.launch("patch_embed_packed_fwd", patches.device, tensors, {})
    else:
        from mmkern.kernels.triton.patch_embed import patch_embed_packed_fwd

        patch_embed_packed_fwd(**tensors, most_taps=most)
    return out


@torch.library.custom_op("mmkern::patch_embed_packed", mutates_args=())
def _patch_embed_packed_op(
    patches: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grid_rows: torch.Tensor | None,
    prefix_tokens: torch.Tensor | None,
    grids: list[int],
    base: list[int],
    mode: str,
    antialias: bool,
    backend: str,
) -> torch.Tensor:
    return _forward_impl(patches, weight, bias, grid_rows, prefix_tokens, grids, base, mode, antialias, backend)


@_patch_embed_packed_op.register_fake
def _(patches, weight, bias, grid_rows, prefix_tokens, grids, base, mode, antialias, backend):
    return patches.new_empty(_output_rows(grids, prefix_tokens), weight.shape[0])


def _setup_context(ctx, inputs, output, eager=False):
    patches, weight, _bias, _grid_rows, prefix_tokens, grids, base, mode, antialias, backend = inputs
    ctx.save_for_backward(patches, weight)
    ctx.num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[0]
    ctx.layout = (_pairs(grids), tuple(base), mode, antialias)
    ctx.backend, ctx.eager = backend, eager


def _backward(ctx, grad_out):
    patches, weight = ctx.saved_tensors
    need_patches, need_weight, need_bias, need_grid, need_prefix = ctx.needs_input_grad[:5]
    pairs, base, mode, antialias = ctx.layout
    T, (M, K), (E, C, P, _) = ctx.num_prefix, patches.shape, weight.shape
    out_rows, prefix_rows = _rows(pairs, T, grad_out.device)
    G = grad_out.index_select(0, out_rows) if T else grad_out  # (M, E): the patch rows
    grad_patches = grad_weight = grad_bias = grad_grid = grad_prefix = None
    if need_patches or need_weight:  # patch_embed's backward, over the patches as M one-patch images
        run = _backward_impl if ctx.eager else torch.ops.mmkern.patch_embed_backward
        gp, gw = run(G.unsqueeze(1), patches.view(M, C, P, P), weight, 0, need_patches, need_weight, ctx.backend)
        grad_patches = gp.view(M, K) if need_patches else None
        grad_weight = gw.to(weight.dtype) if need_weight else None
    if need_bias:
        grad_bias = G.sum(dim=0, dtype=torch.float32).to(G.dtype)
    if need_grid:
        run = _grid_backward if ctx.eager else torch.ops.mmkern.patch_embed_packed_grid_backward
        grad_grid = run(G, [n for g in pairs for n in g], list(base), mode, antialias).to(G.dtype)
    if need_prefix:
        grad_prefix = grad_out.index_select(0, prefix_rows).view(len(pairs), T, E).sum(0, dtype=torch.float32)
        grad_prefix = grad_prefix.to(grad_out.dtype)
    return grad_patches, grad_weight, grad_bias, grad_grid, grad_prefix, None, None, None, None, None


@torch.library.custom_op("mmkern::patch_embed_packed_grid_backward", mutates_args=())
def _grid_backward(G: torch.Tensor, grids: list[int], base: list[int], mode: str, antialias: bool) -> torch.Tensor:
    """Σ_i R_iᵀ · G_i (fp32, (Gh·Gw, E)) with G_i image i's patch rows of G (M, E) and R_i its (h·w, Gh·Gw)
    resampling matrix: the transpose of the taps' gather. Images that share a grid share R, so their blocks are
    summed first: one product per grid. (An op of its own: building R is not traceable.)"""
    pairs, base, E = _pairs(grids), tuple(base), G.shape[1]
    sums: dict[tuple[int, int], torch.Tensor] = {}
    start = 0
    for h, w in pairs:
        block = G[start : start + h * w].float()
        sums[(h, w)] = block if (h, w) not in sums else sums[(h, w)] + block
        start += h * w
    grad = G.new_zeros(base[0] * base[1], E, dtype=torch.float32)
    for grid, total in sums.items():
        index, weight = (t.to(G.device) for t in pos_taps(base, grid, mode, antialias))
        dense = grad.new_zeros(total.shape[0], grad.shape[0]).scatter_(1, index.long(), weight)
        grad += dense.t() @ total
    return grad


@_grid_backward.register_fake
def _(G, grids, base, mode, antialias):
    return G.new_empty(base[0] * base[1], G.shape[1], dtype=torch.float32)


_patch_embed_packed_op.register_autograd(_backward, setup_context=_setup_context)


_EagerPatchEmbedPacked = eager_function("_EagerPatchEmbedPacked", _forward_impl, _setup_context, _backward)
