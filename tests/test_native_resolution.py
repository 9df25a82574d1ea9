"""Native-resolution towers: VisionTransformer.forward_packed / CLIP.encode_image on a list of images of different
sizes give, image by image, what the padded path gives each image alone at its own size (dynamic_img_size); token
dropping, gradient checkpointing and windows keep working packed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmkern.models import CLIP, CLIPConfig, TextConfig, VisionTransformer, ViTConfig

SIZES = [(16, 16), (4, 4), (8, 28), (32, 12), (4, 40)]  # 1×1 grids, strips, unequal sizes (patch 4)


def _images(seed=0, sizes=SIZES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=gen) for h, w in sizes]


def _vit(**kw):
    torch.manual_seed(0)
    cfg = {
        "img_size": 16,
        "patch_size": 4,
        "width": 32,
        "depth": 2,
        "heads": 4,
        "dynamic_img_size": True,
        "num_classes": 8,
    }
    return VisionTransformer(ViTConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"pool": "avg", "class_token": False},
        {"pool": "map", "reg_tokens": 2, "fc_norm": True},
        {"reg_tokens": 1, "no_embed_class": True, "pre_norm": True},
        {"windows": ((2, 2), None)},
    ],
    ids=["token", "avg", "map+reg", "no_embed_class", "windows"],
)
def test_packed_matches_each_image_alone(kw):
    model = _vit(**kw)
    images = _images()
    with torch.no_grad():
        packed = model.forward_packed(images)
        alone = torch.cat([model(image[None]) for image in images])
    assert packed.shape == (len(images), 8)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)


def test_gradients_and_checkpointing():
    model = _vit().train()
    images = _images()
    ref = torch.cat([model(image[None]) for image in images]).square().sum()
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    model.set_grad_checkpointing(True)
    out = model.forward_packed(images).square().sum()
    grads = torch.autograd.grad(out, list(model.parameters()), allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        if r is None:
            assert g is None or not g.any(), name
            continue
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5, msg=name)


def test_token_dropping():
    model = _vit(pool="avg", class_token=False)
    images = _images()
    with torch.no_grad():
        full = model.forward_packed(images)
        torch.testing.assert_close(model.forward_packed(images, keep_rate=1.0), full)
        feats = model.forward_features_packed(images, keep_rate=lambda h, w: 0.5 if h * w > 4 else 1.0)
    sizes = (feats.cu_seqlens[1:] - feats.cu_seqlens[:-1]).tolist()
    assert sizes == [max(1, round(h * w * (0.5 if h * w > 4 else 1.0))) for h, w in feats.grid_sizes]
    assert feats.tokens.shape[0] == sum(sizes) and feats.max_seqlen == max(sizes)
    with pytest.raises(ValueError, match="keep_rate"):
        model.forward_packed(images, keep_rate=0.0)


def test_clip_encode_image_list():
    torch.manual_seed(0)
    vision = ViTConfig(img_size=16, patch_size=4, width=32, depth=1, heads=4, dynamic_img_size=True)
    text = TextConfig(vocab_size=50, context_length=8, width=32, depth=1, heads=4)
    model = CLIP(CLIPConfig(embed_dim=16, vision=vision, text=text)).eval()
    images = _images(1)
    with torch.no_grad():
        packed = model.encode_image(images, normalize=True)
        alone = torch.cat([model.encode_image(image[None], normalize=True) for image in images])
        resized = model.encode_image([F.interpolate(i[None], size=(13, 50))[0] for i in images], max_patches=20)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    assert resized.shape == (len(images), 16)
