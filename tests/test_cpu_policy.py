"""The default path on CPU tensors (mmkern/ops/cpu_policy.py): the native kernel where it measured faster than
PyTorch for that kind of call at the running ISA level, PyTorch's own ops (the `torch` backend) elsewhere; and the
torch backend itself, against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmkern
from mmkern import _native, reference
from mmkern.ops import add_layer_norm, bias_gelu, clip_loss, cpu_policy, infonce, patch_embed, siglip_loss
from tests.checks import assert_close

pytestmark = pytest.mark.skipif(_native.CPU_ERROR is not None, reason="the cpu backend is unavailable here")
LEVELS = mmkern.cpu_capabilities() if _native.CPU_ERROR is None else []


def _calls(monkeypatch, name: str) -> list:
    """Records the calls of reference.<name>, which the torch backend runs for patch_embed, the losses and the
    fused ops (they are PyTorch's own ops written as a user would)."""
    seen = []
    original = getattr(reference, name)

    def spy(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, name, spy)
    return seen


@pytest.mark.parametrize("level", LEVELS)
def test_default_follows_the_policy_at_every_level(level, monkeypatch):
    monkeypatch.delenv("MMKERN_BACKEND", raising=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    w = torch.randn(8, 3, 4, 4, generator=gen)
    images = torch.randn(2, 3, 8, 8, generator=gen)
    s = torch.tensor(5.0)
    cases = [
        ("add_layer_norm", lambda: add_layer_norm(x, x), cpu_policy.add_layer_norm),
        ("bias_gelu", lambda: bias_gelu(x), cpu_policy.bias_gelu),
        ("patch_embed", lambda: patch_embed(images, w), lambda: cpu_policy.patch_embed(False)),
        ("patch_embed", lambda: patch_embed(images.bfloat16(), w.bfloat16()), lambda: cpu_policy.patch_embed(True)),
        ("clip_loss", lambda: clip_loss(x, x, s), lambda: cpu_policy.contrastive(True, 256, 256, 64)),
        ("siglip_loss", lambda: siglip_loss(x, x, s, -s), lambda: cpu_policy.contrastive(True, 256, 256, 64)),
        ("infonce", lambda: infonce(x, x, s), lambda: cpu_policy.contrastive(False, 256, 256, 64)),
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


def test_policy_regions():
    """The decisions the README documents, level by level."""
    for level in LEVELS:
        with mmkern.use_cpu_capability(level):
            assert cpu_policy.patch_embed(True)  # bf16: native everywhere
            assert cpu_policy.patch_embed(False) == (level != "default")
            assert cpu_policy.contrastive(True, 1 << 14, 1 << 14, 512)  # past the memory bound: always native
            assert not cpu_policy.contrastive(True, 64, 64, 64)  # small batches: the naive loss
            assert cpu_policy.bias_gelu()
            assert cpu_policy.add_layer_norm() == (level == "default")


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
