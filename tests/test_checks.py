"""Every op's validation: a bad argument is a ValueError whose whole message names it and says what is wrong. The
messages are checked in full, so that a faster check (the ops' common case is tested in one expression, see
mmkern/ops/_checks.py) cannot change what a user reads."""

from __future__ import annotations

import pytest
import torch

from mmkern import nn as mnn
from mmkern import ops


def T(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


x, r, w, b = T(4, 6), T(4, 6), T(6), T(6)
q = T(1, 2, 4, 8)
f, s = T(4, 8), torch.tensor(10.0)
img, pw, pb, cls, pos = T(2, 3, 8, 8), T(5, 3, 4, 4), T(5), T(1, 5), T(5, 5)
meta = {"device": "meta"}
FLOATS = "expected one of torch.float32, torch.float16, torch.bfloat16, torch.float64"

CASES = [
    # the row ops: x, residual, weight, bias
    ("ln x list", lambda: ops.add_layer_norm([[1.0]], r, w, b), "x: expected a torch.Tensor, got list"),
    (
        "ln x scalar",
        lambda: ops.add_layer_norm(torch.tensor(1.0), r, w, b),
        "x: expected at least 1 dimension, got a scalar",
    ),
    (
        "ln x int",
        lambda: ops.add_layer_norm(T(4, 6, dtype=torch.int64), r, w, b),
        "x: dtype torch.int64 is not supported; " + FLOATS,
    ),
    ("ln residual list", lambda: ops.add_layer_norm(x, [1.0], w, b), "residual: expected a torch.Tensor, got list"),
    (
        "ln residual shape",
        lambda: ops.add_layer_norm(x, T(4, 5), w, b),
        "residual: shape (4, 5) differs from x's (4, 6)",
    ),
    (
        "ln residual dtype",
        lambda: ops.add_layer_norm(x, T(4, 6, dtype=torch.float16), w, b),
        "residual: dtype torch.float16 differs from x's torch.float32",
    ),
    (
        "ln residual int",
        lambda: ops.add_layer_norm(x, T(4, 6, dtype=torch.int32), w, b),
        "residual: dtype torch.int32 is not supported; " + FLOATS,
    ),
    ("ln residual device", lambda: ops.add_layer_norm(x, T(4, 6, **meta), w, b), "residual: on meta, but x is on cpu"),
    ("ln weight list", lambda: ops.add_layer_norm(x, r, [1.0], b), "weight: expected a torch.Tensor, got list"),
    (
        "ln weight shape",
        lambda: ops.add_layer_norm(x, r, T(5), b),
        "weight: expected (6,) to match the last dim of x, got (5,)",
    ),
    ("ln weight 2d", lambda: ops.add_layer_norm(x, r, T(6, 1), b), "weight: expected 1 dimensions, got shape (6, 1)"),
    (
        "ln weight dtype",
        lambda: ops.add_layer_norm(x, r, T(6, dtype=torch.bfloat16), b),
        "weight: dtype torch.bfloat16 differs from x's torch.float32",
    ),
    ("ln weight device", lambda: ops.add_layer_norm(x, r, T(6, **meta), b), "weight: on meta, but x is on cpu"),
    (
        "ln bias shape",
        lambda: ops.add_layer_norm(x, r, w, T(7)),
        "bias: expected (6,) to match the last dim of x, got (7,)",
    ),
    (
        "ln bias int",
        lambda: ops.add_layer_norm(x, r, w, T(6, dtype=torch.int64)),
        "bias: dtype torch.int64 is not supported; " + FLOATS,
    ),
    ("ln eps", lambda: ops.add_layer_norm(x, r, w, b, -1.0), "eps: expected a number >= 0, got -1.0"),
    ("gelu x scalar", lambda: ops.bias_gelu(torch.tensor(1.0), b), "x: expected at least 1 dimension, got a scalar"),
    ("gelu bias shape", lambda: ops.bias_gelu(x, T(5)), "bias: expected (6,) to match the last dim of x, got (5,)"),
    ("gelu bias device", lambda: ops.bias_gelu(x, T(6, **meta)), "bias: on meta, but x is on cpu"),
    ("rms residual shape", lambda: ops.rms_norm(x, T(6, 4), w), "residual: shape (6, 4) differs from x's (4, 6)"),
    (
        "rms weight dtype",
        lambda: ops.rms_norm(x, r, T(6, dtype=torch.float64)),
        "weight: dtype torch.float64 differs from x's torch.float32",
    ),
    # attention
    (
        "sdpa query list",
        lambda: ops.scaled_dot_product_attention([1.0], q, q),
        "query: expected a torch.Tensor, got list",
    ),
    (
        "sdpa key int",
        lambda: ops.scaled_dot_product_attention(q, T(1, 2, 4, 8, dtype=torch.int64), q),
        "key: dtype torch.int64 is not supported; " + FLOATS,
    ),
    (
        "sdpa key dtype",
        lambda: ops.scaled_dot_product_attention(q, T(1, 2, 4, 8, dtype=torch.float16), q),
        "key/value: dtypes torch.float16/torch.float32 differ from query's torch.float32",
    ),
    (
        "sdpa value dtype",
        lambda: ops.scaled_dot_product_attention(q, q, T(1, 2, 4, 8, dtype=torch.float16)),
        "key/value: dtypes torch.float32/torch.float16 differ from query's torch.float32",
    ),
    (
        "sdpa value device",
        lambda: ops.scaled_dot_product_attention(q, q, T(1, 2, 4, 8, **meta)),
        "key/value: must be on the query's device",
    ),
    (
        "sdpa query 1d",
        lambda: ops.scaled_dot_product_attention(T(8), T(8), T(8)),
        "query: expected at least 2 dimensions (..., L, E), got shape (8,)",
    ),
    (
        "sdpa key 1d",
        lambda: ops.scaled_dot_product_attention(T(4, 8), T(8), T(4, 8)),
        "key: expected at least 2 dimensions (..., L, E), got shape (8,)",
    ),
    (
        "sdpa key ndim",
        lambda: ops.scaled_dot_product_attention(q, T(2, 4, 8), q),
        "key/value: must have as many dimensions as query",
    ),
    (
        "sdpa key batch",
        lambda: ops.scaled_dot_product_attention(q, T(2, 2, 4, 8), T(2, 2, 4, 8)),
        "key: batch dims (2,) differ from query's (1,)",
    ),
    (
        "sdpa value batch",
        lambda: ops.scaled_dot_product_attention(q, q, T(3, 2, 4, 8)),
        "value: shape (3, 2, 4, 8) does not match key's (1, 2, 4, 8)",
    ),
    (
        "sdpa key headdim",
        lambda: ops.scaled_dot_product_attention(q, T(1, 2, 4, 9), q),
        "key: head dim 9 differs from query's 8",
    ),
    (
        "sdpa value len",
        lambda: ops.scaled_dot_product_attention(q, q, T(1, 2, 5, 8)),
        "value: shape (1, 2, 5, 8) does not match key's (1, 2, 4, 8)",
    ),
    (
        "sdpa value heads",
        lambda: ops.scaled_dot_product_attention(q, q, T(1, 1, 4, 8)),
        "value: shape (1, 1, 4, 8) does not match key's (1, 2, 4, 8)",
    ),
    (
        "sdpa key heads",
        lambda: ops.scaled_dot_product_attention(q, T(1, 3, 4, 8), T(1, 3, 4, 8)),
        "key: 3 heads vs query's 2: needs enable_gqa=True and Hq a multiple of Hk",
    ),
    (
        "sdpa gqa",
        lambda: ops.scaled_dot_product_attention(q, T(1, 3, 4, 8), T(1, 3, 4, 8), enable_gqa=True),
        "key: 3 heads vs query's 2: needs enable_gqa=True and Hq a multiple of Hk",
    ),
    (
        "sdpa dropout",
        lambda: ops.scaled_dot_product_attention(q, q, q, dropout_p=1.5),
        "dropout_p: expected 0 <= p <= 1, got 1.5",
    ),
    (
        "sdpa window",
        lambda: ops.scaled_dot_product_attention(q, q, q, window=(-1, 2)),
        "window: left and right must be >= 0, got (-1, 2)",
    ),
    (
        "sdpa window type",
        lambda: ops.scaled_dot_product_attention(q, q, q, window=3),
        "window: expected (left, right) ints, got 3",
    ),
    (
        "sdpa num_global",
        lambda: ops.scaled_dot_product_attention(q, q, q, num_global=2),
        "num_global: global tokens only make sense together with a window",
    ),
    (
        "sdpa mask list",
        lambda: ops.scaled_dot_product_attention(q, q, q, [True]),
        "attn_mask: expected a torch.Tensor, got list",
    ),
    (
        "sdpa mask int",
        lambda: ops.scaled_dot_product_attention(q, q, q, T(4, 4, dtype=torch.int64)),
        "attn_mask: expected a bool or float mask, got torch.int64",
    ),
    (
        "sdpa mask shape",
        lambda: ops.scaled_dot_product_attention(q, q, q, T(3, 5, dtype=torch.bool)),
        "attn_mask: shape (3, 5) does not broadcast to (1, 2, 4, 4)",
    ),
    (
        "sdpa mask device",
        lambda: ops.scaled_dot_product_attention(q, q, q, T(4, 4, **meta)),
        "attn_mask: on meta, but query is on cpu",
    ),
    (
        "sdpa headdim cpu",
        lambda: ops.scaled_dot_product_attention(T(1, 2, 4, 300), T(1, 2, 4, 300), q, backend="cpu"),
        "query: head dims up to 256 are supported, got 300 / 8",
    ),
    (
        "sdpa float64 cpu",
        lambda: ops.scaled_dot_product_attention(*(T(1, 2, 4, 8, dtype=torch.float64),) * 3, backend="cpu"),
        "query: float64 runs only on the reference and torch backends, not 'cpu'",
    ),
    (
        "sdpa torch window",
        lambda: ops.scaled_dot_product_attention(q, q, q, window=(1, 1), backend="torch"),
        "backend: 'torch' has no path for windowed attention; use backend='cpu'",
    ),
    (
        "sdpa backend",
        lambda: ops.scaled_dot_product_attention(q, q, q, backend="nope"),
        "backend: 'nope' is not available: unknown backend 'nope'; choose one of cpu, cuda, triton, reference, torch",
    ),
    (
        "qkv shape",
        lambda: ops.qkv_packed_attention(T(2, 4, 2, 2, 8)),
        "qkv: expected (B, L, 3, H, D), got shape (2, 4, 2, 2, 8)",
    ),
    ("qkv list", lambda: ops.qkv_packed_attention([1.0]), "qkv: expected a torch.Tensor, got list"),
    # contrastive
    ("clip image list", lambda: ops.clip_loss([1.0], f, s), "image_features: expected a torch.Tensor, got list"),
    ("clip image 1d", lambda: ops.clip_loss(T(8), f, s), "image_features: expected 2 dimensions, got shape (8,)"),
    (
        "clip image int",
        lambda: ops.clip_loss(T(4, 8, dtype=torch.int64), f, s),
        "image_features: dtype torch.int64 is not supported; " + FLOATS,
    ),
    (
        "clip text 3d",
        lambda: ops.clip_loss(f, T(4, 8, 1), s),
        "text_features: expected 2 dimensions, got shape (4, 8, 1)",
    ),
    (
        "clip text dtype",
        lambda: ops.clip_loss(f, T(4, 8, dtype=torch.float16), s),
        "text_features: dtype torch.float16 differs from image_features's torch.float32",
    ),
    (
        "clip text device",
        lambda: ops.clip_loss(f, T(4, 8, **meta), s),
        "text_features: on meta, but image_features is on cpu",
    ),
    (
        "clip text width",
        lambda: ops.clip_loss(f, T(4, 7), s),
        "text_features: feature width D=7 differs from image_features's D=8",
    ),
    (
        "clip text rows",
        lambda: ops.clip_loss(f, T(5, 8), s),
        "text_features: batch size B=5 differs from image_features's B=4",
    ),
    (
        "clip empty",
        lambda: ops.clip_loss(T(0, 8), T(0, 8), s),
        "image_features: expected B ≥ 1 rows and D ≥ 1 features, got shape (0, 8)",
    ),
    (
        "clip empty width",
        lambda: ops.clip_loss(T(4, 0), T(4, 0), s),
        "image_features: expected B ≥ 1 rows and D ≥ 1 features, got shape (4, 0)",
    ),
    (
        "clip scale 1d",
        lambda: ops.clip_loss(f, f, T(2)),
        "logit_scale: expected a 0-dim or (1,) tensor, got shape (2,)",
    ),
    ("clip scale list", lambda: ops.clip_loss(f, f, [1.0]), "logit_scale: expected a torch.Tensor, got list"),
    (
        "clip scale int",
        lambda: ops.clip_loss(f, f, torch.tensor(3)),
        "logit_scale: dtype torch.int64 is not supported; " + FLOATS,
    ),
    (
        "clip scale device",
        lambda: ops.clip_loss(f, f, torch.tensor(3.0, **meta)),
        "logit_scale: on meta, but the features are on cpu",
    ),
    (
        "clip float64 cpu",
        lambda: ops.clip_loss(f.double(), f.double(), s, backend="cpu"),
        "image_features: float64 runs only on the reference and torch backends, not 'cpu'",
    ),
    (
        "clip backend",
        lambda: ops.clip_loss(f, f, s, backend="nope"),
        "backend: 'nope' is not available: unknown backend 'nope'; choose one of cpu, cuda, triton, reference, torch",
    ),
    (
        "siglip bias 1d",
        lambda: ops.siglip_loss(f, f, s, T(2)),
        "logit_bias: expected a 0-dim or (1,) tensor, got shape (2,)",
    ),
    (
        "siglip text rows",
        lambda: ops.siglip_loss(f, T(3, 8), s, s),
        "text_features: batch size B=3 differs from image_features's B=4",
    ),
    (
        "infonce keys few",
        lambda: ops.infonce(f, T(3, 8), s),
        "keys: without labels keys needs at least B=4 rows, got 3",
    ),
    (
        "infonce keys empty",
        lambda: ops.infonce(f, T(0, 8), s, labels=torch.zeros(4, dtype=torch.long)),
        "keys: expected at least one row",
    ),
    (
        "infonce labels range",
        lambda: ops.infonce(f, f, s, labels=torch.tensor([0, 1, 2, 9])),
        "labels: values must lie in [0, 4)",
    ),
    (
        "infonce labels len",
        lambda: ops.infonce(f, f, s, labels=torch.zeros(3, dtype=torch.long)),
        "labels: expected (4,), got (3,)",
    ),
    (
        "infonce labels dtype",
        lambda: ops.infonce(f, f, s, labels=torch.zeros(4)),
        "labels: dtype torch.float32 is not supported; expected one of torch.int64, torch.int32",
    ),
    (
        "infonce labels device",
        lambda: ops.infonce(f, f, s, labels=torch.zeros(4, dtype=torch.long, **meta)),
        "labels: on meta, but query is on cpu",
    ),
    (
        "nn.ClipLoss text rows",
        lambda: mnn.ClipLoss()(f, T(5, 8), s),
        "text_features: batch size B=5 differs from image_features's B=4",
    ),
    # patch embedding
    ("pe images 3d", lambda: ops.patch_embed(T(3, 8, 8), pw, pb), "images: expected 4 dimensions, got shape (3, 8, 8)"),
    (
        "pe images int",
        lambda: ops.patch_embed(T(2, 3, 8, 8, dtype=torch.int64), pw, pb),
        "images: dtype torch.int64 is not supported; " + FLOATS,
    ),
    (
        "pe weight dtype",
        lambda: ops.patch_embed(img, T(5, 3, 4, 4, dtype=torch.float16), pb),
        "weight: dtype torch.float16 differs from images's torch.float32",
    ),
    (
        "pe weight square",
        lambda: ops.patch_embed(img, T(5, 3, 4, 2), pb),
        "weight: expected a square (E, C, P, P) kernel, got shape (5, 3, 4, 2)",
    ),
    (
        "pe weight channels",
        lambda: ops.patch_embed(T(2, 2, 8, 8), pw, pb),
        "weight: has 3 input channels but images has 2",
    ),
    (
        "pe images H",
        lambda: ops.patch_embed(T(2, 3, 9, 8), pw, pb),
        "images: H=9 and W=8 must be multiples of the patch size 4",
    ),
    ("pe bias shape", lambda: ops.patch_embed(img, pw, T(4)), "bias: expected (5,), got (4,)"),
    (
        "pe bias dtype",
        lambda: ops.patch_embed(img, pw, T(5, dtype=torch.float64)),
        "bias: dtype torch.float64 differs from images's torch.float32",
    ),
    ("pe bias list", lambda: ops.patch_embed(img, pw, [1.0]), "bias: expected a torch.Tensor, got list"),
    (
        "pe prefix width",
        lambda: ops.patch_embed(img, pw, pb, prefix_tokens=T(1, 4)),
        "prefix_tokens: expected (T, 5), got (1, 4)",
    ),
    (
        "pe pos length",
        lambda: ops.patch_embed(img, pw, pb, pos_embed=T(4, 5), prefix_tokens=cls),
        "pos_embed: expected length T + N = 1 + 4 = 5 and width 5, got (4, 5)",
    ),
    (
        "pe pos batched",
        lambda: ops.patch_embed(img, pw, pb, pos_embed=T(2, 5, 5), prefix_tokens=cls),
        "pos_embed: expected (T + N, E) or (1, T + N, E), got (2, 5, 5)",
    ),
    (
        "pe pos device",
        lambda: ops.patch_embed(img, pw, pb, pos_embed=T(5, 5, **meta), prefix_tokens=cls),
        "pos_embed: on meta, but images is on cpu",
    ),
    (
        "pe backend",
        lambda: ops.patch_embed(img, pw, pb, backend="tpu"),
        "backend: 'tpu' is not available: unknown backend 'tpu'; choose one of cpu, cuda, triton, reference, torch",
    ),
]


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_message(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message
