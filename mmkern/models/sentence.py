"""Sentence encoders from a sentence-transformers folder (e.g. all-MiniLM-L6-v2) on mmkern's TextTransformer.

Reads modules.json (Transformer -> Pooling -> optional Normalize), the BERT-family config.json and weights, the
pooling config and tokenizer.json (Hugging Face `tokenizers`), so `.encode(texts)` returns what
SentenceTransformer(model_dir).encode(texts) returns.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmkern.models.convert import text_from_bert
from mmkern.models.state_dict import load_torch_data, read_safetensors
from mmkern.models.text import TextTransformer

_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")


class SentenceEncoder(nn.Module):
    """encode(list[str]) -> (N, D) float32 embeddings: tokenizer -> encoder -> pooling -> [L2 normalisation]."""

    def __init__(self, encoder: TextTransformer, tokenizer, pooling: list[str], normalize: bool, max_length: int):
        super().__init__()
        self.encoder, self.tokenizer = encoder, tokenizer
        self.pooling, self.normalize, self.max_length = pooling, normalize, max_length

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids, attention_mask (N, L) int64, right-padded to the longest, truncated to max_length."""
        encs = self.tokenizer.encode_batch(list(texts))
        return torch.tensor([e.ids for e in encs]), torch.tensor([e.attention_mask for e in encs])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(input_ids, attention_mask)
        m = attention_mask.to(tokens.dtype).unsqueeze(-1)
        counts = m.sum(dim=1).clamp(min=1e-9)
        pooled = []
        for mode in self.pooling:
            if mode == "cls_token":
                pooled.append(tokens[:, 0])
            elif mode == "max_tokens":
                pooled.append(tokens.masked_fill(m == 0, -1e9).amax(dim=1))
            elif mode == "mean_tokens":
                pooled.append((tokens * m).sum(dim=1) / counts)
            else:
                pooled.append((tokens * m).sum(dim=1) / counts.sqrt())
        x = torch.cat(pooled, dim=-1)
        return F.normalize(x, dim=-1) if self.normalize else x

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.tokenize(texts[i : i + batch_size])
            out.append(self(ids.to(device), mask.to(device)).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.encoder.config.width)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        raise ValueError(f"model_dir: {path} is not valid JSON, it is truncated or corrupted ({e})") from e


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").exists():
        return read_safetensors(folder / "model.safetensors")[0]
    if (folder / "pytorch_model.bin").exists():  # a pickle: read as tensors and plain containers only
        return load_torch_data(folder / "pytorch_model.bin")
    raise ValueError(f"model_dir: no model.safetensors or pytorch_model.bin in {folder}")


def load_sentence_encoder(model_dir: str | Path) -> SentenceEncoder:
    """SentenceEncoder from a sentence-transformers model folder (BERT-family Transformer, Pooling, Normalize)."""
    from tokenizers import Tokenizer

    root = Path(model_dir)
    modules = _read_json(root / "modules.json")
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    unsupported = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if unsupported or kinds[:2] != ["Transformer", "Pooling"]:
        raise ValueError(f"model_dir: expected modules Transformer, Pooling[, Normalize], got {kinds}")
    tf_dir = root / modules[0]["path"]
    pool_cfg = _read_json(root / modules[1]["path"] / "config.json")
    pooling = [mode for mode in _POOLING_MODES if pool_cfg.get(f"pooling_mode_{mode}")]
    if not pooling or any(
        pool_cfg.get(k)
        for k in pool_cfg
        if k.startswith("pooling_mode_") and k.removeprefix("pooling_mode_") not in _POOLING_MODES
    ):
        raise ValueError(f"model_dir: unsupported pooling config {pool_cfg}")
    hf_config = _read_json(tf_dir / "config.json")
    encoder = text_from_bert(_read_weights(tf_dir), hf_config, pool="none").eval()
    st_cfg_path = tf_dir / "sentence_bert_config.json"
    st_cfg = _read_json(st_cfg_path) if st_cfg_path.exists() else {}
    max_length = min(st_cfg.get("max_seq_length") or encoder.config.context_length, encoder.config.context_length)
    try:
        tokenizer = Tokenizer.from_file(str(tf_dir / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception that does not name the file
        raise ValueError(f"model_dir: cannot read {tf_dir / 'tokenizer.json'} ({e})") from e
    tokenizer.enable_truncation(max_length=max_length)
    pad_id = hf_config.get("pad_token_id", 0)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id) or "[PAD]")
    return SentenceEncoder(encoder, tokenizer, pooling, "Normalize" in kinds, max_length)
