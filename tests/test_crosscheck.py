"""Cross-checks against code mmkern did not write: real timm and open_clip models (random init, nothing downloaded)
run with mmkern's attention through `sdpa_override` and without, both against the same model in float64; open_clip's
ClipLoss / SigLipLoss against mmkern's; mmkern's weight converters against the real models.

Errors are measured against a float64 run of the same model / loss on the same (dtype-rounded) inputs, and mmkern's
may be at most a small factor of torch's (or open_clip's) own. The float64 runs take SDPA as the formula, not
torch's kernel: torch 2.13's CPU flash-attention backward is wrong for a row whose scores sit at |max| >= 2^24 (a
fully masked row of a finfo.min or -1e10 padding mask), its gradients off by the number of keys at the max, and a
float64 run through the same kernel repeats the error. mmkern's are right there (test_finfo_min_fully_masked_rows).
"""

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
import open_clip.loss as oc_loss
from open_clip.transformer import TextTransformer as OcTextTransformer

import mmkern.nn
from mmkern import reference
from mmkern.models.convert import clip_from_openai, vit_from_timm
from mmkern.ops import clip_loss, scaled_dot_product_attention, sdpa_override, sdpa_patch, siglip_loss

# A model's output and gradients through mmkern's attention may be off by FACTOR x torch's error plus FLOOR (both
# relative to the largest reference value; the measured errors are in the README). A 1e-5 relative change of the
# attention output fails the fp32 cases; the bf16 ones catch gross errors only (bf16's noise is ~1e-2).
FACTOR = 2.0
FLOOR = {torch.float32: 2e-7, torch.bfloat16: 1e-3}
# The losses: mmkern's error at most LOSS_FACTOR x open_clip's (floors in test_losses_match_open_clip).
LOSS_FACTOR = 3.0


def _seeded(build, seed=0):
    torch.manual_seed(seed)
    return build()


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random init leaves zeros (biases, class tokens, position embeddings, LayerScale at 1e-5) that would hide
    a wrong key or a missing term: every parameter gets a draw that matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() > 1 else 0.3))
    return model


def _run(model, inputs, forward, dtype, backend=None, override=False, train=False):
    """Output and parameter gradients (float64) of forward(model, inputs) in dtype; with `override`, torch's SDPA
    calls go through mmkern (backend=None: its default choice); float64 runs take the formula (mmkern.reference's SDPA:
    a row that sees no key gives 0, as torch's CPU kernel and mmkern do, where MATH's NaN would spread)."""
    m = copy.deepcopy(model).to(dtype).train(train)
    x = inputs.to(dtype) if inputs.is_floating_point() else inputs
    if override:
        with sdpa_override(backend=backend):
            out = forward(m, x)
    elif dtype == torch.float64:
        with mock.patch.object(F, "scaled_dot_product_attention", reference.scaled_dot_product_attention):
            out = forward(m, x)
    else:
        out = forward(m, x)
    weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=torch.float64).view(out.shape)
    (out.double() * weights).sum().backward()
    grads = {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}
    return out.detach().double(), grads


def _errors(run, ref):
    """(output error, gradient error), each the max abs error over the largest reference magnitude (over all
    parameters for the gradients: LayerNorm biases of q / k get gradients that are 0 up to rounding)."""
    (out, grads), (ref_out, ref_grads) = run, ref
    assert grads.keys() == ref_grads.keys()
    scale = max(g.abs().max().item() for g in ref_grads.values())
    grad_err = max(((grads[k] - ref_grads[k]).abs().max().item()) for k in ref_grads) / scale
    return ((out - ref_out).abs().max() / ref_out.abs().max()).item(), grad_err


def _finite_where_torch_is(mm_run, torch_run):
    for a, b in zip((mm_run[0], *mm_run[1].values()), (torch_run[0], *torch_run[1].values())):
        assert torch.isfinite(a)[torch.isfinite(b)].all()


def _count_mmkern_calls():
    """Patches the mmkern function that sdpa_override hands the calls it takes: the count proves that the model's
    attention went through mmkern, not back to torch."""
    return mock.patch.object(sdpa_patch, "scaled_dot_product_attention", wraps=scaled_dot_product_attention)


def _check_model(model, inputs, forward, dtype, backend, train=False, expect_calls=True):
    ref = _run(model, inputs, forward, torch.float64)
    theirs = _run(model, inputs, forward, dtype, train=train)
    with _count_mmkern_calls() as spy:
        ours = _run(model, inputs, forward, dtype, backend=backend, override=True, train=train)
    if expect_calls:
        assert spy.call_count > 0, "sdpa_override sent no call to mmkern"
    _finite_where_torch_is(ours, theirs)
    (out_t, grad_t), (out_m, grad_m) = _errors(theirs, ref), _errors(ours, ref)
    floor = FLOOR[dtype]
    assert out_m <= FACTOR * out_t + floor, f"output: mmkern {out_m:.3g} vs torch {out_t:.3g}"
    assert grad_m <= FACTOR * grad_t + floor, f"gradients: mmkern {grad_m:.3g} vs torch {grad_t:.3g}"
    return out_m, grad_m, out_t, grad_t


# ---- 1. real models with mmkern's attention -------------------------------------------------------------------


def _tiny_open_clip(**text_cfg):
    text = {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2, **text_cfg}
    vision = {"width": 64, "layers": 2, "patch_size": 8, "image_size": 32, "head_width": 32}
    return _seeded(lambda: open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text))


def _tokens(batch=2, length=16, vocab=100, seed=1):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _images(batch, size, seed=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _image_forward(m, x):
    return m(x)


MODELS = {
    # timm: ViT, ViT with qk_norm, register ViT (4 registers, LayerScale, avg pool), EVA-02 (RoPE, SwiGLU)
    "vit_tiny": lambda: (timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2), _images(2, 64), None),
    "vit_tiny_qk_norm": lambda: (
        timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, qk_norm=True),
        _images(2, 64),
        None,
    ),
    "vit_reg4": lambda: (
        timm.create_model("vit_betwixt_patch16_reg4_gap_256", img_size=64, depth=2, embed_dim=64, num_heads=2),
        _images(2, 64),
        None,
    ),
    # DINOv2 with registers: a class token and 4 registers, LayerScale (1 here, so that attention counts)
    "dinov2_reg4": lambda: (
        timm.create_model(
            "vit_small_patch14_reg4_dinov2", img_size=56, depth=2, embed_dim=64, num_heads=2, init_values=1.0
        ),
        _images(2, 56),
        None,
    ),
    "eva02_tiny": lambda: (timm.create_model("eva02_tiny_patch14_224", img_size=56, depth=2), _images(2, 56), None),
    # open_clip: the vision tower and the causal text tower (nn.MultiheadAttention, a float -inf causal mask)
    "open_clip_visual": lambda: (_tiny_open_clip(), _images(2, 32), lambda m, x: m.encode_image(x)),
    "open_clip_text": lambda: (_tiny_open_clip(), _tokens(), lambda m, x: m.encode_text(x)),
    # open_clip's own attention block (F.scaled_dot_product_attention with the causal mask, qk_norm)
    "open_clip_text_custom": lambda: (
        _tiny_open_clip(block_type="custom", qk_norm=True),
        _tokens(),
        lambda m, x: m.encode_text(x),
    ),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", [None, "cpu"], ids=["default", "cpu"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_attention_matches_torch(name, backend, dtype, train):
    model, inputs, forward = _seeded(MODELS[name])
    _check_model(model, inputs, forward or _image_forward, dtype, backend, train=train)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_default_backend_at_a_native_size(dtype):
    """A ViT-Ti/16 at 224 (3 heads x 197 tokens): large enough that the default path takes mmkern's kernel at
    AVX2 and AVX-512 (mmkern.ops.cpu_policy.attention), where the small models above stay on torch's SDPA."""
    model = _seeded(lambda: timm.create_model("vit_tiny_patch16_224", depth=1))
    _check_model(model, _images(1, 224), _image_forward, dtype, None)


# ---- 2. masks as the libraries build them ---------------------------------------------------------------------


def _text_tower(**kwargs):
    cfg = {"context_length": 12, "vocab_size": 50, "width": 64, "heads": 2, "layers": 2, "output_dim": 16}
    return _seeded(lambda: OcTextTransformer(**{**cfg, **kwargs}))


def _padded_tokens():
    tokens = _tokens(3, 12, 50)
    tokens[0, 7:] = 0  # padding after 7 tokens
    tokens[1, :] = 0  # an all-padding text: every key of every row masked (whole rows)
    tokens[2, 0] = 0  # a leading pad: query row 0 of the causal tower sees only a masked key
    return tokens


TEXT_TOWERS = {
    # bidirectional with a key-padding mask ((B*H, L, L) of 0 / -inf, whole rows masked for the all-pad text)
    "pad_mask": lambda: _text_tower(no_causal_mask=True, use_pad_mask=True, pool_type="first"),
    # CoCa: causal mask + padding mask added (-inf + -inf), a class token appended
    "causal_pad_cls": lambda: _text_tower(embed_cls=True, pool_type="last", correct_cls_mask=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", [None, "cpu"], ids=["default", "cpu"])
@pytest.mark.parametrize("name", list(TEXT_TOWERS))
def test_open_clip_text_masks(name, backend, dtype):
    tower = TEXT_TOWERS[name]()
    forward = lambda m, x: m(x)
    _check_model(tower, _padded_tokens(), forward, dtype, backend)


def _key_padding(batch, n, dtype, fill):
    """timm-style attn_mask (B, 1, 1, N): the last image keeps 3 tokens, the middle one none (whole rows)."""
    keep = torch.ones(batch, n, dtype=torch.bool)
    keep[-1, 3:] = False
    keep[1 % batch, :] = False
    if fill is None:
        return keep[:, None, None, :]
    return torch.zeros(batch, 1, 1, n, dtype=dtype).masked_fill(~keep[:, None, None, :], fill)


@pytest.mark.parametrize("mask", ["bool", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_timm_attn_mask(mask, dtype):
    """timm's VisionTransformer.forward_features(x, attn_mask) passes the mask to every block's SDPA call."""
    model = _seeded(lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2))
    n = 1 + (64 // 16) ** 2

    def forward(m, x):
        fill = None if mask == "bool" else float("-inf")
        return m.forward_features(x, attn_mask=_key_padding(x.shape[0], n, x.dtype, fill))

    _check_model(model, _images(3, 64), forward, dtype, "cpu")


@pytest.mark.parametrize("fill", [torch.finfo(torch.float32).min, -1e30])
def test_finfo_min_fully_masked_rows(fill):
    """A padding mask of finfo.min (Hugging Face's) over a whole sequence: every score of its rows rounds to the fill
    (in float64 too, which keeps a -1e10 fill's scores apart), the softmax is uniform over the keys, the output the
    mean of V, and the gradients those of that softmax. mmkern matches the float64 formula; torch 2.13's CPU flash
    SDPA returns gradients 9 (the number of keys) times too large here, finfo.min and -1e10 alike."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g) for _ in range(3))
    grad_out = torch.randn(2, 2, 9, 16, generator=g)
    mask = _key_padding(2, 9, torch.float32, fill)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, attn_mask=mask.to(dtype))
        out.backward(grad_out.to(dtype))
        return [out.detach(), *(t.grad for t in leaves)]

    ref = run(reference.scaled_dot_product_attention, torch.float64)
    ours = run(lambda *a, **kw: scaled_dot_product_attention(*a, backend="cpu", **kw), torch.float32)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-5)


# ---- 3. open_clip's losses ------------------------------------------------------------------------------------


def _features(batch, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    y = F.normalize(x + 0.5 * torch.randn(batch, dim, generator=g), dim=-1)
    return x, y


def _loss_run(loss_fn, x, y, scale, bias, dtype):
    x, y = (t.detach().to(dtype).requires_grad_() for t in (x, y))
    s, b = (torch.tensor(v, dtype=torch.float64 if dtype == torch.float64 else torch.float32) for v in (scale, bias))
    s.requires_grad_()
    b.requires_grad_()
    loss = loss_fn(x, y, s, b)
    loss.backward()
    grads = [x.grad, y.grad, s.grad, b.grad if b.grad is not None else torch.zeros(())]
    return [loss.detach().double(), *(g.double() for g in grads)]


def _oc_clip(x, y, s, b):
    return oc_loss.ClipLoss()(x, y, s)


def _oc_siglip(x, y, s, b):
    return oc_loss.SigLipLoss()(x, y, s, b)


LOSSES = {
    "clip": (_oc_clip, lambda be: lambda x, y, s, b: clip_loss(x, y, s, backend=be)),
    "clip_module": (_oc_clip, lambda be: lambda x, y, s, b: mmkern.nn.ClipLoss(backend=be)(x, y, s)),
    "siglip": (_oc_siglip, lambda be: lambda x, y, s, b: siglip_loss(x, y, s, b, backend=be)),
    "siglip_module": (_oc_siglip, lambda be: lambda x, y, s, b: mmkern.nn.SigLipLoss(backend=be)(x, y, s, b)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale_bias", [(1.0, 5.0), (14.3, -10.0), (100.0, -10.0), (100.0, 0.0), (1000.0, -100.0)])
@pytest.mark.parametrize("batch", [1, 7, 300])
@pytest.mark.parametrize("backend", [None, "cpu"], ids=["default", "cpu"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_match_open_clip(name, backend, batch, scale_bias, dtype):
    """Loss and gradients of both features, logit_scale and logit_bias against open_clip's loss in float64 on the
    same (dtype-rounded) features: mmkern's error at most LOSS_FACTOR x open_clip's own in that dtype. Scales from
    open_clip's clamp range [1, 100] (init 14.3) and past it. (Below it, at s = 0.01, the B x B bf16 loss, open_clip's
    and the torch path's alike, gets the scale gradient a few percent wrong, and the seed decides which is worse.)"""
    theirs_fn, ours_fn = LOSSES[name]
    x, y = _features(batch)
    x, y = x.to(dtype), y.to(dtype)
    ref = _loss_run(theirs_fn, x, y, *scale_bias, torch.float64)
    theirs = _loss_run(theirs_fn, x, y, *scale_bias, dtype)
    ours = _loss_run(ours_fn(backend), x, y, *scale_bias, dtype)
    # fp32: the logits' rounding, scaled by s, moves a softplus of a large logit by a relative s * eps. bf16: 4 ulps
    # (the B x B bf16 loss is a few ulps off, and open_clip's can be luckier than the torch path's at one seed).
    floor = 1e-6 * max(1.0, scale_bias[0] / 10) if dtype == torch.float32 else 2.0**-6
    for what, a, t, r in zip(("loss", "image grad", "text grad", "scale grad", "bias grad"), ours, theirs, ref):
        assert torch.isfinite(a).all(), what
        size = r.abs().max().clamp_min(1e-30)
        err_ours, err_theirs = ((a - r).abs().max() / size).item(), ((t - r).abs().max() / size).item()
        assert err_ours <= LOSS_FACTOR * err_theirs + floor, (
            f"{what}: mmkern {err_ours:.3g}, open_clip {err_theirs:.3g}"
        )


def _oc_model(**kwargs):
    vision = {"width": 32, "layers": 1, "patch_size": 8, "image_size": 16, "head_width": 16}
    text = {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1}
    return _seeded(
        lambda: open_clip.model.CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text, output_dict=True, **kwargs)
    )


@pytest.mark.parametrize(
    "model_kwargs, losses",
    [
        ({}, ("ClipLoss",)),
        ({"init_logit_bias": -10.0}, ("ClipLoss", "SigLipLoss")),  # a SigLIP model's output has a logit_bias
        ({"nonscalar_logit_scale": True}, ("ClipLoss",)),  # (1,) logit_scale, as for FSDP
        ({"nonscalar_logit_scale": True, "init_logit_bias": -10.0}, ("ClipLoss", "SigLipLoss")),
    ],
)
def test_loss_modules_take_open_clip_model_output(model_kwargs, losses):
    """open_clip's training loop calls `loss(**model_out, output_dict=True)`: mmkern's modules take the same
    keywords and give the same loss and parameter gradients (logit_bias: 0 for the softmax loss, as open_clip's)."""
    model = _oc_model(**model_kwargs)
    images, tokens = _images(4, 16), _tokens(4, 8, 50)
    for name in losses:
        results = []
        for loss in (getattr(oc_loss, name)(), getattr(mmkern.nn, name)(backend="cpu")):
            m = copy.deepcopy(model)
            out = loss(**m(images, tokens), output_dict=True)
            out["contrastive_loss"].backward()
            grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
            results.append((out["contrastive_loss"].detach(), grads))
        (loss_t, grads_t), (loss_m, grads_m) = results
        torch.testing.assert_close(loss_m, loss_t, rtol=1e-5, atol=1e-6)
        assert grads_m.keys() == grads_t.keys(), name
        for key in grads_t:
            torch.testing.assert_close(grads_m[key], grads_t[key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


def test_clip_loss_bias_positional():
    """open_clip's ClipLoss.forward(image, text, logit_scale, logit_bias=None, output_dict=False): a bias passed
    fourth is the bias, not output_dict."""
    x, y = _features(5)
    s, b = torch.tensor(10.0), torch.tensor(-3.0)
    loss = mmkern.nn.ClipLoss()(x, y, s, b)
    torch.testing.assert_close(loss, oc_loss.ClipLoss()(x, y, s, b))


# ---- 4. weight converters against the real models -------------------------------------------------------------


TIMM_VITS = {
    "vit_tiny": ("vit_tiny_patch16_224", {}, {}),
    "heads_2": ("vit_tiny_patch16_224", {"embed_dim": 64, "num_heads": 2}, {"heads": 2}),
    "reg4_layerscale_avg": ("vit_betwixt_patch16_reg4_gap_256", {"embed_dim": 64, "num_heads": 1}, {}),
    # class token + 4 registers, LayerScale, position embedding over the patches only
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {"img_size": 56, "embed_dim": 64, "num_heads": 1}, {}),
    "layerscale": ("vit_tiny_patch16_224", {"init_values": 1e-5}, {}),
    "no_class_token_avg": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, {}),
    "no_embed_class": ("vit_tiny_patch16_224", {"no_embed_class": True}, {}),
    "reg_tokens": ("vit_tiny_patch16_224", {"reg_tokens": 2}, {}),
    "fc_norm_avg": ("vit_tiny_patch16_224", {"fc_norm": True, "global_pool": "avg"}, {}),
    "map_class_token": ("vit_tiny_patch16_224", {"global_pool": "map"}, {}),
    # vit_so150m_patch16_reg4_map_256's layout: registers, no class token, MAP head over the patch tokens
    "map_reg4": ("vit_tiny_patch16_224", {"class_token": False, "reg_tokens": 4, "global_pool": "map"}, {}),
    "map_include_prefix": (
        "vit_tiny_patch16_224",
        {"reg_tokens": 1, "global_pool": "map", "pool_include_prefix": True},
        {"pool_include_prefix": True},
    ),
    "clip_pre_norm": ("vit_base_patch16_clip_224", {"embed_dim": 64, "num_heads": 1}, {"eps": 1e-5}),
    "no_head": ("vit_tiny_patch16_224", {"num_classes": 0}, {}),
}


def _timm_vit(name):
    """(timm model, vit_from_timm overrides, images of its size)."""
    arch, kwargs, overrides = TIMM_VITS[name]
    kwargs = {"img_size": 64, **kwargs}
    model = _seeded(lambda: timm.create_model(arch, depth=2, **kwargs))
    return _randomize(model).eval(), overrides, _images(2, kwargs["img_size"])


@pytest.mark.parametrize("name", list(TIMM_VITS))
def test_vit_from_timm_matches(name):
    theirs, overrides, images = _timm_vit(name)
    ours = vit_from_timm(theirs.state_dict(), **overrides).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(images), theirs.forward_features(images), rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(ours(images), theirs(images), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    "name", ["map_class_token", "map_reg4", "map_include_prefix", "reg4_layerscale_avg", "dinov2_reg4"]
)
def test_vit_from_timm_packed_matches(name):
    """forward_packed pools each image as timm pools it (the MAP head over its patch tokens)."""
    theirs, overrides, images = _timm_vit(name)
    ours = vit_from_timm(theirs.state_dict(), **overrides).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_packed(list(images)), theirs(images), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_clip_from_openai_matches_open_clip(quick_gelu):
    """An open_clip CLIP (head width 64, as every released one: clip_from_openai infers heads = width / 64)."""
    vision = {"width": 128, "layers": 2, "patch_size": 8, "image_size": 32, "head_width": 64}
    text = {"context_length": 16, "vocab_size": 100, "width": 128, "heads": 2, "layers": 2}
    theirs = _seeded(
        lambda: open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    )
    theirs = _randomize(theirs).eval()
    ours = clip_from_openai(theirs.state_dict(), act="quick_gelu" if quick_gelu else "gelu").eval()
    tokens = _tokens(3, 16)
    tokens[0, 5], tokens[0, 6:] = 99, 0  # an end-of-text id (the largest) then padding: argmax pooling
    images = _images(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images), rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(ours.encode_text(tokens), theirs.encode_text(tokens), rtol=1e-5, atol=2e-5)
