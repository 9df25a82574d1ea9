"""mmkern.nn modules against plain-PyTorch equivalents written here (timm's layouts)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from mmkern.nn import Attention, Block, CrossAttention, KVCache, Mlp, PatchEmbed, resample_pos_embed


class TimmAttention(nn.Module):
    """timm's Attention (qkv -> heads -> SDPA -> proj), written out as the compatibility oracle."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, is_causal=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=is_causal).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_loads_timm_state_dict(is_causal):
    torch.manual_seed(0)
    ref = TimmAttention(48, 6)
    ours = Attention(48, 6)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert set(ours.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    x = torch.randn(2, 7, 48, requires_grad=True)
    out, expected = ours(x, is_causal=is_causal), ref(x, is_causal=is_causal)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(expected, x, g)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)


@given(
    B=st.integers(1, 3),
    L=st.sampled_from([1, 2, 7, 17, 33]),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([8, 24, 64]),
    is_causal=st.booleans(),
    pad=st.integers(0, 6),
)
def test_attention_matches_timm_oracle_on_drawn_shapes(B, L, heads, head_dim, is_causal, pad):
    """Self-attention with causal masking or a key-padding mask against the timm-layout oracle (torch SDPA)."""
    torch.manual_seed(L * 7 + heads)
    dim = heads * head_dim
    ref = TimmAttention(dim, heads)
    ours = Attention(dim, heads)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, L, dim, requires_grad=True)
    if is_causal or pad == 0:
        out, expected = ours(x, is_causal=is_causal), ref(x, is_causal=is_causal)
    else:
        keep = torch.ones(B, 1, 1, L, dtype=torch.bool)
        keep[0, ..., max(1, L - pad) :] = False  # the first sequence is padded; every row still sees a key
        out = ours(x, keep)
        q, k, v = ref.qkv(x).reshape(B, L, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        expected = ref.proj(o.transpose(1, 2).reshape(B, L, dim))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, ours.qkv.weight], g)
    grads_ref = torch.autograd.grad(expected, [x, ref.qkv.weight], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


def test_cross_attention_fully_masked_context_gives_zero_attention():
    m = CrossAttention(16, 2)
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 4, 16)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1] = False  # the second sample has no valid context token: attention output 0, projection bias only
    out = m(x, ctx, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], m.proj.bias.expand(3, 16))


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="num_heads"):
        Attention(50, 6)


def test_cross_attention_matches_manual():
    torch.manual_seed(0)
    m = CrossAttention(32, 4, kv_dim=24)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 9, 24)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    q = m.q(x).view(2, 5, 4, 8).transpose(1, 2)
    k, v = m.kv(ctx).view(2, 9, 2, 4, 8).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    expected = m.proj(o.transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(m(x, ctx, mask), expected, atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_matches_full_causal():
    torch.manual_seed(0)
    m = Attention(32, 4).eval()
    x = torch.randn(2, 6, 32)
    full = m(x, is_causal=True)
    cache = KVCache(6)
    steps = [m(x[:, :3], is_causal=True, kv_cache=cache)]  # prefill, then one token at a time
    steps += [m(x[:, i : i + 1], kv_cache=cache) for i in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kv_cache"):
        m(x[:, :1], kv_cache=cache)
    # is_causal on cached steps counts the new queries from the cache's end, not top-left like torch.
    cache = KVCache(6)
    steps = [m(x[:, :2], is_causal=True, kv_cache=cache), m(x[:, 2:5], is_causal=True, kv_cache=cache)]
    steps.append(m(x[:, 5:], is_causal=True, kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_packed_attention_matches_per_sequence():
    torch.manual_seed(0)
    m = Attention(32, 4)
    lengths = [3, 1, 5]
    seqs = [torch.randn(1, n, 32) for n in lengths]
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    packed = m(torch.cat(seqs, dim=1)[0], is_causal=True, cu_seqlens=cu, max_seqlen=5)
    expected = torch.cat([m(s, is_causal=True)[0] for s in seqs])
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)


def test_window_attention_packed_matches_per_sequence():
    torch.manual_seed(0)
    m = Attention(32, 4, window=(1, 2), num_global=1)
    seqs = [torch.randn(1, n, 32) for n in (4, 1, 6)]
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    packed = m(torch.cat(seqs, dim=1)[0], cu_seqlens=cu, max_seqlen=6)
    expected = torch.cat([m(s)[0] for s in seqs])
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)
    dense = Attention(32, 4)
    dense.load_state_dict(m.state_dict())
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    band = ((j >= i - 1) & (j <= i + 2)) | (i < 1) | (j < 1)
    torch.testing.assert_close(m(seqs[2]), dense(seqs[2], band), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,num_global", [((2, 0), 0), ((1, 3), 0), ((2, 1), 2), ((0, 0), 1)])
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_window_attention_kv_cache_matches_full(window, num_global, is_causal, mask_kind):
    """A prefill then chunks of 1-3 tokens through the cache give the rows of an uncached pass over the keys cached
    so far (window smaller than the sequence); causal, they also equal one uncached pass over all 9 tokens."""
    torch.manual_seed(0)
    m = Attention(32, 4, window=window, num_global=num_global).eval()
    x = torch.randn(2, 9, 32)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, :2] = False  # left padding in row 1
    if mask_kind == "bool":
        mask = pad[:, None, None, :]
    elif mask_kind == "float":
        mask = torch.zeros(2, 1, 1, 9).masked_fill(~pad[:, None, None, :], float("-inf"))
        mask[0, 0, 0, 4] = -0.5  # a soft bias must survive the merge too
    else:
        mask = None
    cache, outs, start = KVCache(9), [], 0
    for n in (3, 1, 2, 3):
        end = start + n
        part = None if mask is None else mask[..., :end]
        out = m(x[:, start:end], part, is_causal, kv_cache=cache)
        full = m(x[:, :end], part, is_causal)  # what the model computes without a cache on the same keys
        torch.testing.assert_close(out, full[:, start:end], atol=1e-5, rtol=1e-5)
        outs.append(out)
        start = end
    if is_causal:  # causal rows never see later keys: the chunks equal one pass over the whole sequence
        torch.testing.assert_close(torch.cat(outs, 1), m(x, mask, True), atol=1e-5, rtol=1e-5)


def test_block_pre_and_post_norm():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    for norm_first in (True, False):
        b = Block(32, 4, mlp_ratio=2.0, norm_first=norm_first, act="quick_gelu")
        a = b.attn(b.norm1(x)) if norm_first else b.attn(x)
        h = x + a if norm_first else b.norm1(x + a)
        expected = h + b.mlp(b.norm2(h)) if norm_first else b.norm2(h + b.mlp(h))
        torch.testing.assert_close(b(x), expected, atol=1e-6, rtol=1e-6)


@given(
    B=st.integers(1, 3),
    L=st.sampled_from([1, 2, 7, 17]),
    norm_first=st.booleans(),
    is_causal=st.booleans(),
    mask_kind=st.sampled_from(["none", "keys", "rows_bool", "rows_float"]),
    per_seq=st.booleans(),
    cross=st.booleans(),
)
def test_block_rows_match_the_full_block(B, L, norm_first, is_causal, mask_kind, per_seq, cross):
    """Block(rows=...) equals the full block's output at those rows, values and gradients of x, the context
    and the weights, for every mask kind (whole-row masks included), causal or not, pre- and post-norm."""
    torch.manual_seed(B * 31 + L)
    b = Block(16, 2, mlp_ratio=2.0, norm_first=norm_first, cross_dim=8 if cross else None)
    x = torch.randn(B, L, 16, requires_grad=True)
    context = torch.randn(B, 3, 8, requires_grad=True) if cross else None
    mask = None
    if mask_kind == "keys":
        mask = torch.rand(B, 1, 1, L) > 0.3
    elif mask_kind != "none":
        mask = torch.rand(B, 1, L, L) > 0.4
        mask[0, :, -1] = False  # a query row that sees no key
        if mask_kind == "rows_float":
            mask = torch.zeros(B, 1, L, L).masked_fill(~mask, float("-inf"))
    if mask is not None and is_causal:  # torch's SDPA takes one or the other; Block forwards both unchanged
        is_causal = False
    rows = torch.randint(0, L, (B,)) if per_seq else L - 1
    full = b(x, mask, is_causal, context)
    expected = full[torch.arange(B), rows if per_seq else torch.full((B,), rows)][:, None]
    out = b(x, mask, is_causal, context, rows=rows)
    assert out.shape == (B, 1, 16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    inputs = [x, *b.parameters()] + ([context] if cross else [])
    ours = torch.autograd.grad(out, inputs, g, allow_unused=True)
    ref = torch.autograd.grad(expected, inputs, g, allow_unused=True)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_attention_rows_causal_and_window():
    """forward_rows under is_causal sees keys up to its own position; windowed layers (run whole) agree too."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16)
    rows = torch.tensor([3, 8])
    for attn in (Attention(16, 2), Attention(16, 2, window=(2, 1), num_global=1)):
        full = attn(x, is_causal=True)
        torch.testing.assert_close(attn.forward_rows(x, rows, is_causal=True)[:, 0], full[torch.arange(2), rows])
    with pytest.raises(ValueError, match="rows"):
        Block(16, 2)(x, kv_cache=KVCache(16), rows=0)


def test_mlp_rejects_unknown_activation():
    with pytest.raises(ValueError, match="act"):
        Mlp(8, 16, act="swish9")


def test_patch_embed_matches_conv_and_timm_keys():
    torch.manual_seed(0)
    pe = PatchEmbed(img_size=28, patch_size=7, in_chans=3, embed_dim=16)
    assert set(pe.state_dict()) == {"proj.weight", "proj.bias"}
    x = torch.randn(2, 3, 28, 28)
    pos = torch.randn(1, 1 + 16, 16)
    cls = torch.randn(1, 16)
    conv = pe.proj(x).flatten(2).transpose(1, 2)
    expected = torch.cat([cls.expand(2, 1, 16), conv], dim=1) + pos
    torch.testing.assert_close(pe(x, pos, cls), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="images"):
        pe(torch.randn(2, 3, 35, 28), pos, cls)  # another size without dynamic_img_size


def test_patch_embed_dynamic_size_resamples_bicubic():
    torch.manual_seed(0)
    pe = PatchEmbed(img_size=28, patch_size=7, in_chans=3, embed_dim=16, dynamic_img_size=True)
    x = torch.randn(2, 3, 42, 21)  # grid 6 x 3 instead of 4 x 4
    pos = torch.randn(1, 1 + 16, 16)
    cls = torch.randn(1, 16)
    grid = pos[0, 1:].reshape(1, 4, 4, 16).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(6, 3), mode="bicubic", antialias=True, align_corners=False)
    new_pos = torch.cat([pos[0, :1], grid.permute(0, 2, 3, 1).reshape(18, 16)])
    conv = pe.proj(x).flatten(2).transpose(1, 2)
    expected = torch.cat([cls.expand(2, 1, 16), conv], dim=1) + new_pos
    out = pe(x, pos, cls)
    assert out.shape == (2, 19, 16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # same size: the position embedding is used as is
    torch.testing.assert_close(resample_pos_embed(pos, (4, 4), (4, 4), 1), pos[0])


def test_patch_embed_patch_only_position_embedding():
    pe = PatchEmbed(img_size=16, patch_size=8, in_chans=1, embed_dim=4, bias=False)
    x, pos, reg = torch.randn(1, 1, 16, 16), torch.randn(4, 4), torch.randn(2, 4)
    out = pe(x, pos, reg)
    torch.testing.assert_close(out[0, :2], reg)
    torch.testing.assert_close(out[0, 2:], pe.proj(x).flatten(2).transpose(1, 2)[0] + pos, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pos_embed"):
        pe(x, torch.randn(5, 4), reg)
