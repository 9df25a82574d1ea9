"""Native-resolution towers: VisionTransformer.forward_packed / CLIP.encode_image on a list of images of different
sizes give, image by image, what the padded path gives each image alone at its own size (dynamic_img_size); token
dropping, gradient checkpointing and windows keep working packed; the token-budget sampler and mixed-size batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmkern.data import WordTokenizer, digits
from mmkern.data.native import MixedSizeCollator, TokenBudgetSampler, render_digits
from mmkern.models import CLIP, CLIPConfig, TextConfig, VisionTransformer, ViTConfig
from mmkern.train.loop import _split

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
        model.pooled_rows_only = False  # token pooling: the last block over every token, then the class rows
        every_row = model.forward_packed(images)
    assert packed.shape == (len(images), 8)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(every_row, alone, rtol=1e-4, atol=1e-5)


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


def test_token_budget_sampler():
    lengths = [17, 5, 65, 2, 33, 9, 50, 17, 3, 65]
    sampler = TokenBudgetSampler(lengths, max_tokens=80, seed=3)
    epoch = sampler.packs(0)
    assert sorted(i for pack in epoch for i in pack) == list(range(len(lengths)))  # every image once
    assert all(sum(lengths[i] for i in pack) <= 80 for pack in epoch)
    assert sampler.packs(0) == epoch and sampler.packs(1) != epoch  # seeded per epoch
    first = [sampler.next() for _ in range(len(epoch) + 1)]
    assert first[: len(epoch)] == epoch and first[-1] == sampler.packs(1)[0]
    resumed = TokenBudgetSampler(lengths, max_tokens=80, seed=3)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.next() == sampler.next()
    ranks = [TokenBudgetSampler(lengths, 80, seed=3, rank=r, world=2).next() for r in range(2)]
    assert ranks == epoch[:2]
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBudgetSampler(lengths, max_tokens=64)


def test_render_digits_and_packed_batches():
    data = digits(16).subset(range(6))
    rendered = render_digits(data, [(8, 24), (32, 16)], seed=0)
    assert [tuple(im.shape) for im in rendered.images[:3]] == [(3, 8, 24), (3, 32, 16), (3, 8, 24)]
    assert rendered.tokens(4) == [1 + 12, 1 + 32] * 3
    strip = rendered.images[0]
    assert (strip == -1).all(dim=(0, 1)).sum() == 24 - 8  # the digit fills one 8x8 square of the strip
    tok = WordTokenizer.from_texts(data.captions)
    batch = MixedSizeCollator(tok, 8)([rendered[i] for i in range(5)])
    assert isinstance(batch["images"], list) and len(batch["images"]) == 5
    micro = _split(batch, 2)
    assert [len(m["images"]) for m in micro] == [len(m["input_ids"]) for m in micro] == [3, 2]
    resized = MixedSizeCollator(tok, 8, resize=(16, 16))([rendered[i] for i in range(5)])
    assert resized["images"].shape == (5, 3, 16, 16)
