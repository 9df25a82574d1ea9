"""The default path on CPU tensors (mmkern/ops/cpu_policy.py): the native kernel where it measured faster than
PyTorch for that kind of call at the running ISA level, PyTorch's own ops (the `torch` backend) elsewhere; and the
torch backend itself, against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mmkern
from mmkern import _native, backends, reference
from mmkern.ops import (
    add_layer_norm,
    bias_gelu,
    clip_loss,
    contrastive,
    cpu_policy,
    infonce,
    patch_embed,
    patch_embed_packed,
    siglip_loss,
)
from tests.checks import assert_close

pytestmark = pytest.mark.skipif(_native.CPU_ERROR is not None, reason="the cpu backend is unavailable here")
LEVELS = mmkern.cpu_capabilities() if _native.CPU_ERROR is None else []


def _calls(monkeypatch, name: str) -> list:
    """Records the calls of the torch backend's path: reference.<name> for patch_embed, siglip_loss and bias_gelu
    (PyTorch's own ops written as a user would), torch.layer_norm for add_layer_norm, and the naive losses of
    mmkern.ops.contrastive (the reference's, through the cross-entropy's ATen op) for clip_loss and infonce."""
    seen = []
    owners = {"add_layer_norm": (torch, "layer_norm"), "clip_loss": (contrastive, "_naive_clip"),
              "infonce": (contrastive, "_naive_infonce")}  # fmt: skip
    owner, attr = owners.get(name, (reference, name))
    original = getattr(owner, attr)

    def spy(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, spy)
    return seen


@pytest.mark.parametrize("level", LEVELS)
def test_default_follows_the_policy_at_every_level(level, monkeypatch):
    monkeypatch.setattr(backends, "_forced", None)  # the default path, whatever MMKERN_BACKEND was at import
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    w = torch.randn(8, 3, 4, 4, generator=gen)
    images = torch.randn(2, 3, 8, 8, generator=gen)
    s = torch.tensor(5.0)
    cases = [
        ("add_layer_norm", lambda: add_layer_norm(x, x), lambda: cpu_policy.add_layer_norm(x.numel(), False, x.dtype)),
        ("bias_gelu", lambda: bias_gelu(x), lambda: cpu_policy.bias_gelu(x.numel(), False, x.dtype)),
        ("patch_embed", lambda: patch_embed(images, w), lambda: cpu_policy.patch_embed(False)),
        ("patch_embed", lambda: patch_embed(images.bfloat16(), w.bfloat16()), lambda: cpu_policy.patch_embed(True)),
        (
            "patch_embed_packed",
            lambda: patch_embed_packed([images[0]], w),
            lambda: cpu_policy.patch_embed_packed(False),
        ),
        ("clip_loss", lambda: clip_loss(x, x, s), lambda: cpu_policy.contrastive("clip", 256, 256, 64)),
        ("siglip_loss", lambda: siglip_loss(x, x, s, -s), lambda: cpu_policy.contrastive("siglip", 256, 256, 64)),
        ("infonce", lambda: infonce(x, x, s), lambda: cpu_policy.contrastive("infonce", 256, 256, 64)),
    ]
    with mmkern.use_cpu_capability(level):
        for name, call, native in cases:
            seen = _calls(monkeypatch, name)
            call()
            assert len(seen) == (0 if native() else 1), (level, name)
        # backend="cpu" always runs the native kernel.
        seen = _calls(monkeypatch, "add_layer_norm")
        add_layer_norm(x, x, backend="cpu")
        assert not seen


def test_policy_regions(monkeypatch):
    """The decisions the README documents, level by level (the x86-64 tables, on whatever machine runs this)."""
    monkeypatch.setattr(cpu_policy, "MEASURED_ARCH", True)
    for level in LEVELS:
        with mmkern.use_cpu_capability(level):
            assert cpu_policy.patch_embed(True)  # bf16: native everywhere
            assert cpu_policy.patch_embed(False) == (level != "default")
            assert cpu_policy.patch_embed_packed(True) == cpu_policy.patch_embed_packed(False) == (level != "default")
            for loss in ("clip", "siglip", "infonce"):
                assert cpu_policy.contrastive(loss, 1 << 14, 1 << 14, 512)  # past the memory bound: always native
                assert not cpu_policy.contrastive(loss, 64, 64, 64)  # small batches: the naive loss
            assert cpu_policy.contrastive("clip", 1024, 1024, 64)  # CLIP's narrow large batches: native everywhere
            f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
            # The row ops: native from a size on (never for fp32 GELU at default), torch for small tensors and fp64.
            for op in (cpu_policy.bias_gelu, cpu_policy.add_layer_norm, cpu_policy.rms_norm):
                for grad in (False, True):
                    assert not op(1 << 10, grad, bf16) and not op(1 << 22, grad, torch.float64)
                    assert op(1 << 22, grad, bf16) == (op is not cpu_policy.add_layer_norm or grad or level != "avx2")
            assert cpu_policy.bias_gelu(1 << 22, True, f32) == (level != "default")
            # fp32 at 2^14: 0.94-0.98x at avx2 with two threads (Zen 5), 1.1-1.7x at AVX-512.
            assert cpu_policy.bias_gelu(1 << 14, False, f32) == (level in cpu_policy.AVX512)
            # fp32 with a gradient at AVX-512: torch up to 2^20 (0.74-1.18x at two threads), native from 2^22.
            assert cpu_policy.add_layer_norm(1 << 20, True, f32) == (level not in cpu_policy.AVX512)
            assert cpu_policy.add_layer_norm(1 << 22, True, f32)
            assert not cpu_policy.add_layer_norm(1 << 14, True, f32)
            assert cpu_policy.rms_norm(1 << 12, True, f32)
            assert cpu_policy.rms_norm(1 << 12, False, f32) == (level == "default")  # fp32 inference: 2^14 elsewhere
            assert cpu_policy.rms_norm(1 << 14, False, f32) == (level != "avx2")  # avx2: 1.06-1.07x there, 2^16
            assert cpu_policy.add_layer_norm(1 << 16, False, f32) == (level != "avx2")  # avx2: 1.00x at width 768
            assert cpu_policy.rms_norm(1 << 22, False, f16) == (level != "default")
            assert cpu_policy.attention(12, 4096, 4096, 128, False, True) == (level != "default")
            assert cpu_policy.attention(12, 197, 197, 64, False, False) == (level != "default")  # ViT-B/16
            assert not cpu_policy.attention(4, 17, 17, 16, False, True)  # tiny heads: the fixed cost dominates


def test_unmeasured_architecture_takes_torch(monkeypatch):
    """Off x86-64 (aarch64) no region is measured: every speed decision takes PyTorch's path; the losses' memory
    bound and the calls torch has no path for still run native."""
    monkeypatch.setattr(cpu_policy, "MEASURED_ARCH", False)
    f32, bf16 = torch.float32, torch.bfloat16
    for level in LEVELS:
        with mmkern.use_cpu_capability(level):
            assert not cpu_policy.patch_embed(True) and not cpu_policy.patch_embed(False)
            assert not cpu_policy.patch_embed_packed(True)
            for loss in ("clip", "siglip", "infonce"):
                assert not cpu_policy.contrastive(loss, 1 << 12, 1 << 12, 64)
                assert cpu_policy.contrastive(loss, 1 << 14, 1 << 14, 512)
            for op in (cpu_policy.bias_gelu, cpu_policy.add_layer_norm, cpu_policy.rms_norm):
                for grad in (False, True):
                    assert not op(1 << 22, grad, f32) and not op(1 << 22, grad, bf16)
            assert not cpu_policy.attention(12, 4096, 4096, 128, False, True)
    monkeypatch.setattr(backends, "_forced", None)
    seen = _calls(monkeypatch, "add_layer_norm")
    x = torch.randn(1 << 10, 1 << 10)
    add_layer_norm(x, x)
    assert seen


def test_torch_backend_matches_reference():
    gen = torch.Generator().manual_seed(1)
    x, y = (F.normalize(torch.randn(37, 24, generator=gen, dtype=torch.float64), dim=1) for _ in range(2))
    s, b = torch.tensor(14.3, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    for got, want in [
        (clip_loss(x.float(), y.float(), s.float(), backend="torch"), reference.clip_loss(x, y, s)),
        (siglip_loss(x.float(), y.float(), s.float(), b.float(), backend="torch"), reference.siglip_loss(x, y, s, b)),
        (infonce(x.float(), y.float(), s.float(), backend="torch"), reference.infonce(x, y, s)),
        (bias_gelu(x.float(), backend="torch"), F.gelu(x)),
    ]:
        assert_close(got, want, torch.float32, "torch backend")
    # float64 runs on the torch backend as on the reference
    assert clip_loss(x, y, s, backend="torch").dtype == torch.float64
    images = torch.randn(2, 3, 8, 8, generator=gen, requires_grad=True)
    weight = torch.randn(8, 3, 4, 4, generator=gen, requires_grad=True)
    out = patch_embed(images, weight, backend="torch")
    out.sum().backward()
    assert out.shape == (2, 4, 8) and images.grad is not None and weight.grad is not None


@pytest.mark.parametrize("level", LEVELS)
def test_attention_default_follows_the_policy(level, monkeypatch):
    """Dense calls go to torch's SDPA where cpu_policy.attention says so; calls torch has no path for stay native."""
    from mmkern.ops import attention as attn_ops

    monkeypatch.setattr(backends, "_forced", None)  # the default path, whatever MMKERN_BACKEND was at import
    seen = []
    monkeypatch.setattr(
        attn_ops, "_torch_sdpa", lambda *a, **kw: seen.append(1) or F.scaled_dot_product_attention(*a, **kw)
    )
    q = torch.randn(1, 2, 40, 16)
    with mmkern.use_cpu_capability(level):
        for L, causal in [(40, False), (40, True), (1200, False)]:
            qq = torch.randn(1, 2, L, 16)
            seen.clear()
            mmkern.ops.scaled_dot_product_attention(qq, qq, qq, is_causal=causal)
            assert len(seen) == (0 if cpu_policy.attention(2, L, L, 16, causal, False) else 1), (level, L, causal)
        seen.clear()
        mmkern.ops.scaled_dot_product_attention(q, q, q, window=(4, 4))  # no torch path: native
        mmkern.ops.scaled_dot_product_attention(q, q, q, torch.ones(40, 40, dtype=torch.bool), is_causal=True)
        assert not seen
    with pytest.raises(ValueError, match="'torch' has no path for windowed attention"):
        mmkern.ops.scaled_dot_product_attention(q, q, q, window=(4, 4), backend="torch")
    wide = torch.randn(1, 2, 5, 300)  # past the kernels' head dims: torch's SDPA by default
    out = mmkern.ops.scaled_dot_product_attention(wide, wide, wide)
    assert_close(out, F.scaled_dot_product_attention(wide, wide, wide), torch.float32, "head dim 300")


def test_attention_torch_path_keeps_mmkern_semantics():
    """backend='torch' is torch's SDPA, but a row that sees no key gives 0 with gradient 0 (torch: NaN)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 7, 7, generator=gen) > 0.4
    mask[0, 0, 3] = False  # row 3 of batch 0 sees no key
    fmask = torch.zeros(2, 1, 7, 7, dtype=torch.float64).masked_fill(~mask, -math.inf)
    for m in (mask, fmask):
        out = mmkern.ops.scaled_dot_product_attention(q, k, v, m, backend="torch")
        want = reference.scaled_dot_product_attention(q, k, v, m)
        assert_close(out, want, torch.float64, "torch path")
        assert (out[0, :, 3] == 0).all()
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        want_grads = torch.autograd.grad(want.sum(), (q, k, v))
        for g, w in zip(grads, want_grads):
            assert g.isfinite().all()
            assert_close(g, w, torch.float64, "torch path grad")
