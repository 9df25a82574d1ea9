"""Weight import from the layouts people have: Hugging Face CLIPModel / CLIPVisionModel, OpenAI / open_clip CLIP,
timm VisionTransformer and BERT-family encoders (BERT, RoBERTa, MiniLM, ...).

Each converter renames keys to mmkern's (timm-like) layout, fuses separate q/k/v projections into one `qkv`, and
builds the model config from the source config or, where there is none, from the tensor shapes (head count
width / 64, as open_clip infers it). Loading is strict: leftovers and gaps are reported together.
"""

from __future__ import annotations

import math
import re

import torch

from mmkern.models.clip import CLIP, CLIPConfig
from mmkern.models.state_dict import load_state_dict
from mmkern.models.text import TextConfig, TextTransformer
from mmkern.models.vit import VisionTransformer, ViTConfig

_HF_ACT = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
}


def _act(name: str) -> str:
    if name not in _HF_ACT:
        raise ValueError(f"config: activation {name!r} is not supported")
    return _HF_ACT[name]


def _rename(state: dict, rules: list[tuple[str, str]]) -> dict:
    """Applies the first matching regex rule to each key; a rule with replacement None drops the key."""
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            if re.fullmatch(pattern, key):
                if repl is not None:
                    out[re.sub(pattern, repl, key)] = value
                break
        else:
            out[key] = value
    return out


def _fuse_qkv(state: dict, names: tuple[str, str, str], fused: str) -> dict:
    """Concatenates <prefix>.{q,k,v}.{weight,bias} (by the three name fragments) into <prefix>.<fused>.*"""
    q_name = names[0]
    for key in [k for k in state if f".{q_name}." in k]:
        prefix, suffix = key.split(f".{q_name}.")
        parts = [state.pop(f"{prefix}.{n}.{suffix}") for n in names]
        state[f"{prefix}.{fused}.{suffix}"] = torch.cat(parts, dim=0)
    return state


def _depth(state: dict, pattern: str) -> int:
    return len({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


# ---- Hugging Face CLIP ----

_HF_LAYER = [
    (r"(.*)encoder\.layers\.(\d+)\.layer_norm1\.(.*)", r"\1blocks.\2.norm1.\3"),
    (r"(.*)encoder\.layers\.(\d+)\.layer_norm2\.(.*)", r"\1blocks.\2.norm2.\3"),
    (r"(.*)encoder\.layers\.(\d+)\.self_attn\.out_proj\.(.*)", r"\1blocks.\2.attn.proj.\3"),
    (r"(.*)encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(.*)", r"\1blocks.\2.attn.\3_proj.\4"),
    (r"(.*)encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(.*)", r"\1blocks.\2.mlp.\3.\4"),
]
_HF_VISION = [
    (r"vision_model\.embeddings\.class_embedding", "visual.cls_token"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "visual.patch_embed.proj.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.pos_embed"),
    (r"vision_model\.embeddings\.position_ids", None),
    (r"vision_model\.pre_layrnorm\.(.*)", r"visual.norm_pre.\1"),
    (r"vision_model\.post_layernorm\.(.*)", r"visual.norm.\1"),
    (r"visual_projection\.weight", "visual.head.weight"),
    (r"vision_model\.(.*)", r"visual.\1"),
]
_HF_TEXT = [
    (r"text_model\.embeddings\.token_embedding\.weight", "text.token_embedding.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "text.pos_embed"),
    (r"text_model\.embeddings\.position_ids", None),
    (r"text_model\.final_layer_norm\.(.*)", r"text.norm.\1"),
    (r"text_projection\.weight", "text.proj.weight"),
    (r"text_model\.(.*)", r"text.\1"),
]


def _vision_config_from_hf(vc) -> ViTConfig:
    return ViTConfig(
        img_size=vc.image_size,
        patch_size=vc.patch_size,
        in_chans=vc.num_channels,
        width=vc.hidden_size,
        depth=vc.num_hidden_layers,
        heads=vc.num_attention_heads,
        mlp_ratio=vc.intermediate_size / vc.hidden_size,
        act=_act(vc.hidden_act),
        eps=vc.layer_norm_eps,
        pre_norm=True,
        patch_bias=False,
    )


def clip_config_from_hf(hf_config) -> CLIPConfig:
    """Our CLIPConfig from a transformers CLIPConfig."""
    tc = hf_config.text_config
    # Before transformers PR #24773 configs said eos_token_id=2 and pooling took the argmax id (OpenAI's rule).
    eot = None if tc.eos_token_id == 2 else tc.eos_token_id
    text = TextConfig(
        vocab_size=tc.vocab_size,
        context_length=tc.max_position_embeddings,
        width=tc.hidden_size,
        depth=tc.num_hidden_layers,
        heads=tc.num_attention_heads,
        mlp_ratio=tc.intermediate_size / tc.hidden_size,
        act=_act(tc.hidden_act),
        eps=tc.layer_norm_eps,
        eot_token_id=eot,
    )
    return CLIPConfig(
        embed_dim=hf_config.projection_dim,
        vision=_vision_config_from_hf(hf_config.vision_config),
        text=text,
        init_logit_scale=hf_config.logit_scale_init_value,
    )


def _hf_clip_state(state: dict) -> dict:
    state = _rename(_rename(state, _HF_LAYER), _HF_VISION + _HF_TEXT)
    state = _fuse_qkv(state, ("q_proj", "k_proj", "v_proj"), "qkv")
    if "visual.cls_token" in state:
        state["visual.cls_token"] = state["visual.cls_token"].reshape(1, 1, -1)
        state["visual.pos_embed"] = state["visual.pos_embed"].unsqueeze(0)
    return state


def _infer_clip_config(state: dict) -> CLIPConfig:
    """CLIPConfig of an mmkern-layout CLIP state dict from its shapes (heads = width / 64, quick_gelu)."""
    pw = state["visual.patch_embed.proj.weight"]
    width, patch = pw.shape[0], pw.shape[-1]
    grid = math.isqrt(state["visual.pos_embed"].shape[1] - 1)
    vision = ViTConfig(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=pw.shape[1],
        width=width,
        depth=_depth(state, r"visual\.blocks\.(\d+)\."),
        heads=width // 64,
        mlp_ratio=state["visual.blocks.0.mlp.fc1.weight"].shape[0] / width,
        act="quick_gelu",
        eps=1e-5,
        pre_norm=True,
        patch_bias=False,
    )
    tw = state["text.norm.weight"].shape[0]
    text = TextConfig(
        vocab_size=state["text.token_embedding.weight"].shape[0],
        context_length=state["text.pos_embed"].shape[0],
        width=tw,
        depth=_depth(state, r"text\.blocks\.(\d+)\."),
        heads=tw // 64,
        mlp_ratio=state["text.blocks.0.mlp.fc1.weight"].shape[0] / tw,
        act="quick_gelu",
        eps=1e-5,
    )
    bias = float(state["logit_bias"]) if "logit_bias" in state else None
    return CLIPConfig(embed_dim=state["text.proj.weight"].shape[0], vision=vision, text=text, init_logit_bias=bias)


def clip_from_hf(model_or_state_dict, config=None) -> CLIP:
    """CLIP from a transformers `CLIPModel` or its state dict.

    config: a transformers CLIPConfig or an mmkern CLIPConfig; default the model's own config, or for a bare state
    dict one inferred from shapes (heads = width / 64, quick_gelu, argmax EOT pooling).
    """
    state = model_or_state_dict
    if hasattr(model_or_state_dict, "state_dict"):
        state = model_or_state_dict.state_dict()
        config = config or model_or_state_dict.config
    state = _hf_clip_state(dict(state))
    if config is None:
        config = _infer_clip_config(state)
    elif not isinstance(config, CLIPConfig):
        config = clip_config_from_hf(config)
    return load_state_dict(CLIP(config), state)


def vit_from_hf_clip_vision(model_or_state_dict, config=None) -> VisionTransformer:
    """VisionTransformer from a transformers `CLIPVisionModel` (or `CLIPVisionModelWithProjection`, whose
    projection becomes the bias-free head). config: its CLIPVisionConfig or our ViTConfig."""
    state = model_or_state_dict
    if hasattr(model_or_state_dict, "state_dict"):
        state = model_or_state_dict.state_dict()
        config = config or model_or_state_dict.config
    if config is None:
        raise ValueError("config: pass the CLIPVisionConfig (or a ViTConfig) with a bare state dict")
    if not isinstance(config, ViTConfig):
        config = _vision_config_from_hf(config)
    if not any(k.startswith("vision_model.") for k in state):  # transformers >= 5 drops the prefix
        state = {k if k.startswith("visual_projection.") else f"vision_model.{k}": v for k, v in state.items()}
    state = {k.removeprefix("visual."): v for k, v in _hf_clip_state(dict(state)).items()}
    if "head.weight" in state:
        config = ViTConfig(**{**config.to_dict(), "num_classes": state["head.weight"].shape[0], "head_bias": False})
    return load_state_dict(VisionTransformer(config), state)


# ---- OpenAI / open_clip ----

_OPENAI_LAYER = [
    (r"(.*)transformer\.resblocks\.(\d+)\.ln_([12])\.(.*)", r"\1blocks.\2.norm\3.\4"),
    (r"(.*)transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", r"\1blocks.\2.attn.qkv.\3"),
    (r"(.*)transformer\.resblocks\.(\d+)\.attn\.out_proj\.(.*)", r"\1blocks.\2.attn.proj.\3"),
    (r"(.*)transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(.*)", r"\1blocks.\2.mlp.fc1.\3"),
    (r"(.*)transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(.*)", r"\1blocks.\2.mlp.fc2.\3"),
]
_OPENAI_TOP = [
    (r"visual\.conv1\.weight", "visual.patch_embed.proj.weight"),
    (r"visual\.class_embedding", "visual.cls_token"),
    (r"visual\.positional_embedding", "visual.pos_embed"),
    (r"visual\.ln_pre\.(.*)", r"visual.norm_pre.\1"),
    (r"visual\.ln_post\.(.*)", r"visual.norm.\1"),
    (r"visual\.proj", "visual.head.weight"),
    (r"token_embedding\.weight", "text.token_embedding.weight"),
    (r"positional_embedding", "text.pos_embed"),
    (r"ln_final\.(.*)", r"text.norm.\1"),
    (r"text_projection", "text.proj.weight"),
    (r"(blocks\..*)", r"text.\1"),
    (r"(input_resolution|context_length|vocab_size)", None),  # scalars in OpenAI's JIT archives
]


def clip_from_openai(state_dict: dict, act: str = "quick_gelu", config: CLIPConfig | None = None) -> CLIP:
    """CLIP from an OpenAI / open_clip (ViT) state dict. OpenAI weights use quick_gelu; open_clip's LAION models
    act="gelu". The config is inferred from the shapes (heads = width / 64) unless given."""
    state = _rename(_rename(dict(state_dict), _OPENAI_LAYER), _OPENAI_TOP)
    state["visual.cls_token"] = state["visual.cls_token"].reshape(1, 1, -1)
    state["visual.pos_embed"] = state["visual.pos_embed"].unsqueeze(0)
    state["visual.head.weight"] = state["visual.head.weight"].T.contiguous()  # x @ proj  ->  Linear weight
    state["text.proj.weight"] = state["text.proj.weight"].T.contiguous()
    if config is None:
        config = _infer_clip_config(state)
        config.vision.act = config.text.act = act
    return load_state_dict(CLIP(config), state)


# ---- timm ----


def vit_config_from_timm(state: dict, **overrides) -> ViTConfig:
    """ViTConfig of a timm VisionTransformer state dict from its shapes; anything else (heads when the head
    width is not 64, eps, act, pooling details) through overrides."""
    pw = state["patch_embed.proj.weight"]
    width, patch = pw.shape[0], pw.shape[-1]
    class_token = "cls_token" in state
    reg = state["reg_token"].shape[1] if "reg_token" in state else 0
    pos_len = state["pos_embed"].shape[1]
    grid = math.isqrt(pos_len)
    no_embed_class = grid * grid == pos_len and (class_token or reg > 0)
    if not no_embed_class:
        grid = math.isqrt(pos_len - int(class_token) - reg)
    fc_norm = "fc_norm.weight" in state
    pool = "map" if "attn_pool.latent" in state else ("avg" if fc_norm or not class_token else "token")
    cfg = {
        "img_size": grid * patch,
        "patch_size": patch,
        "in_chans": pw.shape[1],
        "width": width,
        "depth": _depth(state, r"blocks\.(\d+)\."),
        "heads": width // 64,
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / width,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "class_token": class_token,
        "reg_tokens": reg,
        "no_embed_class": no_embed_class,
        "pre_norm": "norm_pre.weight" in state,
        "patch_bias": "patch_embed.proj.bias" in state,
        "pool": pool,
        "fc_norm": fc_norm,
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
        "head_bias": "head.bias" in state,
        "init_values": 1.0 if "blocks.0.ls1.gamma" in state else None,  # LayerScale; gamma comes from the state
    }
    return ViTConfig(**{**cfg, **overrides})


def vit_from_timm(state_dict: dict, **overrides) -> VisionTransformer:
    """VisionTransformer from a timm `VisionTransformer` state dict (the key layout is already ours)."""
    state = dict(state_dict)
    return load_state_dict(VisionTransformer(vit_config_from_timm(state, **overrides)), state)


# ---- BERT family ----

_BERT = [
    (r".*\.position_ids|pooler\..*|cls\..*|lm_head\..*", None),  # buffers, pooler and pretraining heads
    (r"embeddings\.word_embeddings\.weight", "token_embedding.weight"),
    (r"embeddings\.position_embeddings\.weight", "pos_embed"),
    (r"embeddings\.token_type_embeddings\.weight", "type_embedding.weight"),
    (r"embeddings\.LayerNorm\.(.*)", r"embed_norm.\1"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(.*)", r"blocks.\1.attn.\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(.*)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(.*)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(.*)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(.*)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(.*)", r"blocks.\1.norm2.\2"),
]


def text_from_bert(state_dict: dict, hf_config: dict, pool: str = "cls") -> TextTransformer:
    """Bidirectional post-norm TextTransformer from a BERT-family state dict and its config.json (as a dict).
    RoBERTa-style models (position ids starting after padding_idx) drop their first padding_idx + 1 positions."""
    c = hf_config
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"hf_config: position_embedding_type {c['position_embedding_type']!r} is not supported")
    state = {re.sub(r"^(bert|roberta|model)\.", "", k): v for k, v in state_dict.items()}
    state = {k.replace(".gamma", ".weight").replace(".beta", ".bias"): v for k, v in state.items()}
    state = _fuse_qkv(_rename(state, _BERT), ("query", "key", "value"), "qkv")
    offset = c["pad_token_id"] + 1 if c.get("model_type") in ("roberta", "xlm-roberta", "camembert") else 0
    state["pos_embed"] = state["pos_embed"][offset:]
    config = TextConfig(
        vocab_size=c["vocab_size"],
        context_length=c["max_position_embeddings"] - offset,
        width=c["hidden_size"],
        depth=c["num_hidden_layers"],
        heads=c["num_attention_heads"],
        mlp_ratio=c["intermediate_size"] / c["hidden_size"],
        act=_act(c.get("hidden_act", "gelu")),
        eps=c.get("layer_norm_eps", 1e-12),
        causal=False,
        norm_first=False,
        embed_norm=True,
        final_norm=False,
        type_vocab_size=c.get("type_vocab_size", 0),
        pool=pool,
    )
    if not config.type_vocab_size:
        state.pop("type_embedding.weight", None)
    return load_state_dict(TextTransformer(config), state)
