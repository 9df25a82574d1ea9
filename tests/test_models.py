"""Model layer on tiny configs: forward + backward of every model and option, checkpoint round trips,
torch.compile, inference_mode + bf16 autocast, generation with a KV cache, packed batches."""

import json

import pytest
import torch
import torch.nn.functional as F

from mmkern.models import (
    CLIP,
    CLIPConfig,
    FusionConfig,
    FusionEncoder,
    TextConfig,
    TextTransformer,
    VisionLanguageDecoder,
    VisionTransformer,
    ViTConfig,
    VLDecoderConfig,
    causal_lm_loss,
    clip_config,
    retrieve,
    vit_config,
)
from mmkern.models.checkpoint import load_checkpoint, save_checkpoint
from mmkern.models.state_dict import load_state_dict, read_weights
from mmkern.nn import KVCache

VIT = {"img_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 4}
TEXT = {"vocab_size": 64, "context_length": 16, "width": 32, "depth": 2, "heads": 4}
BERT = dict(
    TEXT,
    causal=False,
    norm_first=False,
    embed_norm=True,
    final_norm=False,
    type_vocab_size=2,
    pool="cls",
    eps=1e-12,
    depth=4,
)


def tiny_clip(**kw) -> CLIP:
    return CLIP(
        CLIPConfig(
            embed_dim=16, vision=ViTConfig(**VIT, pre_norm=True, patch_bias=False), text=TextConfig(**TEXT), **kw
        )
    )


def tiny_decoder(**kw) -> VisionLanguageDecoder:
    lm = TextConfig(**dict(TEXT, context_length=64), pool="none")
    return VisionLanguageDecoder(VLDecoderConfig(vision=ViTConfig(**VIT), lm=lm, image_token_id=63, **kw))


def assert_all_grads(model, unused=()):
    for name, p in model.named_parameters():
        if name.startswith(unused):
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


@pytest.mark.parametrize(
    "options",
    [
        {"pool": "token"},
        {"pool": "avg", "fc_norm": True, "class_token": False},
        {"pool": "map", "reg_tokens": 2},
        {"pool": "token", "reg_tokens": 4, "no_embed_class": True, "pre_norm": True, "patch_bias": False},
        {"pool": "token", "patch_dropout": 0.5, "num_classes": 10, "act": "quick_gelu"},
    ],
)
def test_vit_forward_backward(options):
    torch.manual_seed(0)
    m = VisionTransformer(ViTConfig(**VIT, **options))
    out = m(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, options.get("num_classes") or 32)
    out.square().mean().backward()
    assert_all_grads(m)


def test_vit_patch_dropout_only_in_training():
    torch.manual_seed(0)
    m = VisionTransformer(ViTConfig(**VIT, patch_dropout=0.5))
    x = torch.randn(2, 3, 32, 32)
    assert m.forward_features(x).shape[1] == 1 + 8
    assert m.eval().forward_features(x).shape[1] == 1 + 16


def test_vit_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = VisionTransformer(ViTConfig(**VIT))
    x = torch.randn(2, 3, 32, 32)
    m(x).sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_vit_dynamic_img_size():
    m = VisionTransformer(ViTConfig(**VIT, dynamic_img_size=True))
    assert m.forward_features(torch.randn(1, 3, 48, 24)).shape == (1, 1 + 6 * 3, 32)
    with pytest.raises(ValueError, match="images"):
        VisionTransformer(ViTConfig(**VIT))(torch.randn(1, 3, 48, 24))


def test_vit_config_errors():
    with pytest.raises(ValueError, match="pool"):
        VisionTransformer(ViTConfig(**VIT, pool="max"))
    with pytest.raises(ValueError, match="pool"):
        VisionTransformer(ViTConfig(**VIT, class_token=False))
    with pytest.raises(ValueError, match="size"):
        vit_config("xl")


def test_causal_text_eot_pooling_ignores_later_tokens():
    torch.manual_seed(0)
    m = TextTransformer(TextConfig(**TEXT, output_dim=8)).eval()
    ids = torch.tensor([[5, 9, 63, 1, 2], [7, 63, 3, 3, 3]])  # 63 = EOT (largest id)
    out = m(ids)
    changed = ids.clone()
    changed[0, 3:] = 4
    changed[1, 2:] = 6
    torch.testing.assert_close(m(changed), out)
    assert out.shape == (2, 8)
    m2 = TextTransformer(TextConfig(**TEXT, eot_token_id=9)).eval()
    torch.testing.assert_close(m2(ids)[0], m2.forward_features(ids)[0, 1])


@pytest.mark.parametrize("pool", ["mean", "cls", "last"])
def test_bidirectional_text_padding_invariance(pool):
    torch.manual_seed(0)
    m = TextTransformer(TextConfig(**dict(BERT, pool=pool))).eval()
    ids = torch.randint(1, 64, (1, 6))
    ref = m(ids, torch.ones(1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], dim=1)
    torch.testing.assert_close(m(padded, mask), ref, atol=1e-5, rtol=1e-5)
    m.train()
    m(padded, mask, torch.ones_like(padded)).sum().backward()
    assert_all_grads(m)


@pytest.mark.parametrize(
    "tower,config",
    [
        ("vit", dict(VIT, reg_tokens=2, pre_norm=True, num_classes=8)),
        ("vit", dict(VIT, depth=3, windows=[(1, 1), None, (2, 0)])),
        ("text", dict(TEXT, output_dim=8)),
        ("text", dict(TEXT, windows=[(2, 0), (3, 0)])),
        ("text", BERT),
        ("text", dict(BERT, pool="last")),
        ("text", dict(TEXT, depth=0)),
    ],
    ids=["vit", "vit-window", "clip-text", "clip-text-window", "bert-cls", "bert-last", "depth0"],
)
def test_pooled_rows_only_matches_full_last_block(tower, config):
    """Token-pooled towers run their last block at the pooled row only; that equals pooling the full output,
    values and every parameter's gradient, with padding and grad checkpointing."""
    torch.manual_seed(0)
    if tower == "vit":
        m, args = VisionTransformer(ViTConfig(**config)), (torch.randn(3, 3, 32, 32),)
    else:
        m = TextTransformer(TextConfig(**config))
        ids = torch.randint(1, 63, (3, 9))
        ids[0, 4], ids[1, 8], ids[2, 0] = 63, 63, 63  # EOT (largest id) at the start, middle and end
        mask = torch.ones(3, 9)
        mask[0, 5:], mask[2, 1:] = 0, 0
        args = (ids, mask)
    for ckpt in (False, True):
        m.set_grad_checkpointing(ckpt)
        results = []
        for rows_only in (True, False):
            m.pooled_rows_only = rows_only
            m.zero_grad()
            out = m(*args)
            # A fixed random direction: the sum of squares of a LayerNorm output is nearly constant, and its
            # gradient would be rounding noise.
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            results.append((out, [p.grad for p in m.parameters()]))
        (out, grads), (ref, ref_grads) = results
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_text_rejects_long_input():
    with pytest.raises(ValueError, match="context_length"):
        TextTransformer(TextConfig(**TEXT))(torch.zeros(1, 17, dtype=torch.long))


def band_mask(L: int, left: int, right: int, num_global: int) -> torch.Tensor:
    """(L, L) bool: query i sees keys [i - left, i + right]; the first num_global rows and columns see all."""
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    return ((j >= i - left) & (j <= i + right)) | (i < num_global) | (j < num_global)


def _same_weights(model, **config_changes):
    """A copy of `model` built from its config with `config_changes`, carrying the same state dict."""
    dense = type(model)(type(model.config)(**{**model.config.to_dict(), **config_changes}))
    return load_state_dict(dense, model.state_dict())


def _check_outputs_and_grads(model, out, dense, expected):
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    params, dense_params = list(model.parameters()), list(dense.parameters())
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(expected, dense_params, g)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_vit_window_layers_match_dense_band_masks():
    torch.manual_seed(0)
    windows = ((2, 1), None, (0, 3))  # local, global, local: 2 prefix tokens + 16 patches
    m = VisionTransformer(ViTConfig(**dict(VIT, depth=3), reg_tokens=1, windows=windows))
    dense = _same_weights(m, windows=None)
    images = torch.randn(2, 3, 32, 32)
    x = dense.norm_pre(dense.patch_embed(images, dense.pos_embed, dense._prefix_tokens()))
    for blk, w in zip(dense.blocks, windows):
        x = blk(x, None if w is None else band_mask(x.shape[1], *w, num_global=2))
    expected = dense.head(dense.pool(dense.norm(x)))
    out = m(images)
    assert not torch.allclose(out, dense(images), atol=1e-3)  # the windows do change the result
    _check_outputs_and_grads(m, out, dense, expected)


@pytest.mark.parametrize("config", [dict(TEXT, depth=3), dict(BERT, depth=3, num_global=1)], ids=["causal", "bert"])
def test_text_window_layers_match_dense_band_masks(config):
    torch.manual_seed(0)
    windows = ((2, 0), None, (1, 2))
    m = TextTransformer(TextConfig(**config, windows=windows))
    dense = _same_weights(m, windows=None)
    ids = torch.randint(1, 64, (2, 12))
    attention_mask = torch.ones(2, 12)
    attention_mask[1, 9:] = 0  # padding in the second row
    keys, causal = attention_mask.bool()[:, None, None, :], torch.ones(12, 12, dtype=torch.bool).tril()
    x = dense.embed(ids)
    for blk, w in zip(dense.blocks, windows):
        mask = keys & causal if m.config.causal else keys
        if w is not None:
            mask = mask & band_mask(12, *w, num_global=m.config.num_global)
        x = blk(x, mask)
    expected = dense.proj(dense.pool(dense.norm(x), ids, attention_mask))
    out = m(ids, attention_mask)
    assert not torch.allclose(out, dense(ids, attention_mask), atol=1e-3)
    _check_outputs_and_grads(m, out, dense, expected)


def test_window_config_errors():
    with pytest.raises(ValueError, match="windows"):
        ViTConfig(**VIT, windows=((2, 2),))  # depth 2 needs two entries
    with pytest.raises(ValueError, match="windows"):
        TextConfig(**TEXT, windows=((2, -1), None))


def test_vit_window_layers_long_input_smoke():
    torch.manual_seed(0)
    config = dict(VIT, img_size=64, patch_size=16, depth=3, dynamic_img_size=True)
    m = VisionTransformer(ViTConfig(**config, windows=((32, 32), (32, 32), None)))
    out = m.forward_features(torch.randn(1, 3, 512, 512))  # 1 + 32 * 32 tokens, two local layers
    assert out.shape == (1, 1 + 1024, 32) and torch.isfinite(out).all()
    out.mean().backward()
    assert_all_grads(m)


@pytest.mark.parametrize("bias", [None, -10.0])
def test_clip_and_siglip_train_step(bias):
    torch.manual_seed(0)
    m = tiny_clip(init_logit_bias=bias)
    loss = m.loss(torch.randn(4, 3, 32, 32), torch.randint(1, 64, (4, 10)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert_all_grads(m)
    assert (m.logit_bias is None) == (bias is None)


def test_clip_logit_scale_clamped_at_100():
    m = tiny_clip()
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert m.scale().item() == 100.0
    assert m.config.init_logit_scale == pytest.approx(2.6592600)


def test_clip_zero_shot_and_retrieval():
    torch.manual_seed(0)
    m = tiny_clip().eval()

    def tokenize(texts):
        return torch.tensor([[1 + (sum(map(ord, t)) + j) % 60 for j in range(8)] for t in texts])

    classes, templates = ["cat", "dog", "car"], ["a photo of a {}.", "a {} in the wild."]
    w = m.zero_shot_classifier(tokenize, classes, templates, batch_size=4)
    assert w.shape == (16, 3)
    torch.testing.assert_close(w.norm(dim=0), torch.ones(3))
    per_class = torch.stack(
        [F.normalize(m.encode_text(tokenize([t.format(c) for t in templates])), dim=-1).mean(0) for c in classes]
    )
    torch.testing.assert_close(w, F.normalize(per_class, dim=-1).T, atol=1e-5, rtol=1e-5)
    images = torch.randn(5, 3, 32, 32)
    logits = m.classify(images, w, batch_size=2)
    torch.testing.assert_close(logits, m.scale() * m.encode_image(images, normalize=True) @ w, atol=1e-4, rtol=1e-4)
    scores, idx = retrieve(m.encode_image(images), m.encode_image(images), k=2)
    assert idx[:, 0].tolist() == list(range(5)) and scores.shape == (5, 2)


@pytest.mark.parametrize("fusion,layer", [("cross", 2), ("cross", 0), ("concat", 0), ("concat", 4), ("cross", 4)])
def test_fusion_encoder_heads(fusion, layer):
    torch.manual_seed(0)
    m = FusionEncoder(
        FusionConfig(
            vision=ViTConfig(**dict(VIT, width=48)),
            text=TextConfig(**BERT),
            fusion=fusion,
            fusion_layer=layer,
            itc_dim=8,
        )
    )
    images, ids = torch.randn(3, 3, 32, 32), torch.randint(1, 64, (3, 7))
    mask = torch.ones(3, 7)
    mask[0, 5:] = 0
    image_embeds = m.encode_image(images)
    text = m.encode_text(ids, mask)
    fused = m.fuse(text, mask, image_embeds)
    itm, mlm = m.itm_logits(fused, image_embeds), m.mlm_logits(fused)
    assert itm.shape == (3, 2) and mlm.shape == (3, 7, 64)
    itc = (m.image_features(image_embeds) @ m.text_features(text).T).sum()
    (F.cross_entropy(itm, torch.tensor([1, 0, 0])) + mlm.logsumexp(-1).mean() + itc).backward()
    used = {n for n, p in m.named_parameters() if p.grad is not None}
    assert any(n.startswith("visual.") for n in used) and "itm_head.weight" in used
    if layer < 4:  # the image reaches the text tokens
        other = m.fuse(text, mask, m.encode_image(torch.randn(3, 3, 32, 32)))
        assert not torch.allclose(other, fused)


def test_fusion_config_errors():
    with pytest.raises(ValueError, match="fusion"):
        FusionEncoder(FusionConfig(vision=ViTConfig(**VIT), text=TextConfig(**BERT), fusion="sum"))
    with pytest.raises(ValueError, match="fusion_layer"):
        FusionEncoder(FusionConfig(vision=ViTConfig(**VIT), text=TextConfig(**BERT), fusion_layer=9))


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_vl_decoder_train_step_and_packing(projector):
    torch.manual_seed(0)
    m = tiny_decoder(projector=projector)
    n = m.tokens_per_image
    assert n == 16
    images = torch.randn(2, 3, 32, 32)
    ids = torch.cat([torch.randint(1, 63, (2, 2)), torch.full((2, n), 63), torch.randint(1, 63, (2, 5))], dim=1)
    labels = ids.masked_fill(ids == 63, -100)
    logits = m(ids, images)
    assert logits.shape == (2, n + 7, 64)
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    assert_all_grads(m, unused=("visual.blocks.1.", "visual.norm."))  # features come from the second-last block
    # The same two sequences packed into one row give the same logits and loss.
    L = n + 7
    cu = torch.tensor([0, L, 2 * L], dtype=torch.int32)
    packed = m(ids.reshape(1, -1), images, cu_seqlens=cu, max_seqlen=L)
    torch.testing.assert_close(packed.reshape(2, L, -1), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal_lm_loss(packed, labels.reshape(1, -1), cu), loss, atol=1e-5, rtol=1e-5)
    # Gradient checkpointing leaves the packed gradients unchanged.
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    for ckpt in (False, True):
        m.zero_grad()
        m.set_grad_checkpointing(ckpt)
        causal_lm_loss(m(ids.reshape(1, -1), images, cu_seqlens=cu, max_seqlen=L), labels.reshape(1, -1), cu).backward()
        for n, g in grads.items():
            torch.testing.assert_close(m.get_parameter(n).grad, g, atol=1e-5, rtol=1e-4)


def test_vl_decoder_placeholder_count_checked():
    m = tiny_decoder()
    ids = torch.full((1, 10), 63)
    with pytest.raises(ValueError, match="placeholder"):
        m(ids, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="images give 0 image tokens"):
        m(ids)


def test_vl_decoder_generate_greedy_matches_recompute_and_padding():
    torch.manual_seed(0)
    m = tiny_decoder(vision_layer=-1, drop_prefix=False).eval()
    n = m.tokens_per_image
    assert n == 17
    images = torch.randn(2, 3, 32, 32)
    ids = torch.cat([torch.full((2, n), 63), torch.randint(1, 63, (2, 4))], dim=1)
    out = m.generate(ids, images, max_new_tokens=6)
    assert out.shape == (2, n + 4 + 6)
    ref = ids
    for _ in range(6):  # no cache: recompute the whole sequence each step
        ref = torch.cat([ref, m(ref, images)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)
    # Left padding with an attention mask generates the same continuation.
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    assert torch.equal(m.generate(padded, images, mask, max_new_tokens=6)[:, 3:], out)


def test_vl_decoder_sampling_and_eos():
    torch.manual_seed(0)
    m = tiny_decoder().eval()
    ids = torch.randint(1, 63, (3, 5))
    a = m.generate(ids, max_new_tokens=5, temperature=0.8, top_k=4, generator=torch.Generator().manual_seed(1))
    b = m.generate(ids, max_new_tokens=5, temperature=0.8, top_k=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 10)
    greedy = m.generate(ids, max_new_tokens=1)
    eos = int(greedy[0, -1])
    out = m.generate(ids, max_new_tokens=4, eos_token_id=eos)
    assert out[0, 5:].tolist() == [eos] * (out.shape[1] - 5)
    with pytest.raises(ValueError, match="context_length"):
        m.generate(ids, max_new_tokens=60)


def _models():
    torch.manual_seed(0)
    return {
        "vit": VisionTransformer(ViTConfig(**VIT, pool="map", reg_tokens=1, windows=((3, 3), None))),
        "text": TextTransformer(TextConfig(**BERT, windows=((2, 2), None, (2, 2), None), num_global=1)),
        "clip": tiny_clip(init_logit_bias=-10.0),
        "fusion": FusionEncoder(FusionConfig(vision=ViTConfig(**VIT), text=TextConfig(**BERT), fusion_layer=2)),
        "decoder": tiny_decoder(tie_embeddings=True),
    }


@pytest.mark.parametrize("name", ["vit", "text", "clip", "fusion", "decoder"])
def test_checkpoint_round_trip_bit_exact(name, tmp_path):
    model = _models()[name]
    path = save_checkpoint(model, tmp_path / "ckpt" / "model.safetensors", {"step": "7"})
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temporary file left behind
    loaded = load_checkpoint(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    _, meta = read_weights(path)
    assert meta["step"] == "7" and meta["config"] == json.dumps(model.config.to_dict())
    if name == "decoder":
        assert loaded.lm_head.weight is loaded.lm.token_embedding.weight


def test_checkpoint_mismatch_lists_problems(tmp_path):
    path = save_checkpoint(VisionTransformer(ViTConfig(**VIT)), tmp_path / "vit.safetensors")
    other = VisionTransformer(ViTConfig(**dict(VIT, width=48, depth=3)))
    with pytest.raises(ValueError) as err:
        load_checkpoint(path, other)
    msg = str(err.value)
    assert "missing keys" in msg and "blocks.2.attn.qkv.weight" in msg
    assert "shape mismatches" in msg and "pos_embed: checkpoint (1, 17, 32) vs model (1, 17, 48)" in msg
    state = VisionTransformer(ViTConfig(**VIT)).state_dict()
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\):\n  extra.weight"):
        load_state_dict(VisionTransformer(ViTConfig(**VIT)), state)


def test_torch_compile_fullgraph_models():
    """CLIP's training loss (forward + backward), the fusion encoder and the decoder compile as one graph each."""
    torch.manual_seed(0)
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 63, (2, 8))
    clip = tiny_clip()
    loss = torch.compile(clip.loss, fullgraph=True)(images, ids)
    torch.testing.assert_close(loss, clip.loss(images, ids), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert_all_grads(clip)
    fusion = FusionEncoder(FusionConfig(vision=ViTConfig(**VIT), text=TextConfig(**BERT), fusion_layer=2)).eval()
    mask = torch.ones(2, 8)
    compiled = torch.compile(fusion, fullgraph=True)
    torch.testing.assert_close(compiled(images, ids, mask), fusion(images, ids, mask), atol=1e-5, rtol=1e-5)
    decoder = tiny_decoder().eval()
    prompt = torch.cat([torch.full((2, decoder.tokens_per_image), 63), ids], dim=1)
    compiled = torch.compile(decoder, fullgraph=True)
    torch.testing.assert_close(compiled(prompt, images), decoder(prompt, images), atol=1e-5, rtol=1e-5)


def test_inference_mode_autocast_bf16():
    torch.manual_seed(0)
    m = tiny_clip().eval()
    images, ids = torch.randn(3, 3, 32, 32), torch.randint(1, 64, (3, 8))
    with torch.inference_mode():
        ref = m.encode_image(images, normalize=True), m.encode_text(ids, normalize=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m.encode_image(images, normalize=True), m.encode_text(ids, normalize=True)
            gen = tiny_decoder().eval().generate(torch.randint(1, 63, (2, 4)), max_new_tokens=3)
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        assert F.cosine_similarity(a.float(), b, dim=-1).min() > 0.99
    assert gen.shape == (2, 7)


def test_presets_match_published_shapes():
    b16 = CLIP(clip_config("ViT-B/16"))
    n_params = sum(p.numel() for p in b16.parameters())
    assert abs(n_params / 1e6 - 149.6) < 0.2, n_params  # open_clip's model_profile: ViT-B-16 149.6M
    assert b16.visual.pos_embed.shape == (1, 197, 768) and b16.text.pos_embed.shape == (77, 512)
    l14 = clip_config("ViT-L/14")
    assert (l14.embed_dim, l14.vision.width, l14.vision.depth, l14.text.width) == (768, 1024, 24, 768)


@pytest.mark.parametrize("num_global", [0, 2])
def test_vl_decoder_windowed_layers_decode_with_cache(num_global):
    """Per-layer windows smaller than the sequence: cached step-by-step logits equal one uncached forward pass, and
    greedy generate() equals a no-cache recompute loop (also with left padding)."""
    torch.manual_seed(0)
    windows = [(3, 0), None, (2, 1)]
    lm = TextConfig(**dict(TEXT, context_length=64, depth=3), pool="none", windows=windows, num_global=num_global)
    m = VisionLanguageDecoder(VLDecoderConfig(vision=ViTConfig(**VIT), lm=lm, image_token_id=63)).eval()
    ids = torch.randint(1, 63, (2, 12))
    full = m(ids)
    caches = [KVCache(12) for _ in m.lm.blocks]
    steps, start = [], 0
    for n in (4, 1, 1, 3, 1, 2):  # prefill, then single tokens and short chunks
        x = m.lm.embed(ids[:, start : start + n], position_ids=torch.arange(start, start + n))
        for blk, cache in zip(m.lm.blocks, caches):
            x = blk(x, None, True, kv_cache=cache)
        steps.append(m.lm_head(m.lm.norm(x)))
        start += n
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    prompt = ids[:, :5]
    out = m.generate(prompt, max_new_tokens=7)
    ref = prompt
    for _ in range(7):
        ref = torch.cat([ref, m(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)
    padded = torch.cat([torch.zeros(2, 2, dtype=torch.long), prompt], dim=1)
    mask = torch.cat([torch.zeros(2, 2, dtype=torch.long), torch.ones_like(prompt)], dim=1)
    ref = padded
    for _ in range(7):  # windows count sequence indices, padding included, with and without the cache
        ref = torch.cat([ref, m(ref, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    assert torch.equal(m.generate(padded, attention_mask=mask[:, :7], max_new_tokens=7), ref)


def test_text_tower_windowed_layers_decode_with_cache():
    torch.manual_seed(0)
    m = TextTransformer(**dict(TEXT, depth=2), pool="none", windows=[(2, 0), (4, 0)], num_global=1).eval()
    ids = torch.randint(1, 63, (2, 10))
    full = m.forward_features(ids)
    caches = [KVCache(10) for _ in m.blocks]
    steps = []
    for i in range(10):
        x = m.embed(ids[:, i : i + 1], position_ids=torch.tensor([i]))
        for blk, cache in zip(m.blocks, caches):
            x = blk(x, None, True, kv_cache=cache)
        steps.append(m.norm(x))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
