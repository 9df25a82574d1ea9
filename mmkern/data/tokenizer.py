"""A word-level tokenizer built from the captions of a dataset, with the special tokens the tasks need."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

import torch

from mmkern._files import atomic_write

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]", "[IMG]", "[SEP]")
_WORD = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")


def split_words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: "A red, round thing." -> a red , round thing ."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Maps words to ids; ids 0..6 are [PAD] [UNK] [BOS] [EOS] [MASK] [IMG] [SEP] (pad_id = 0).

    encode(text, bos=True, eos=True) -> list[int]; decode(ids) -> str (specials dropped);
    tokenizer(texts, context_length) -> (input_ids (N, L) int64, attention_mask (N, L) bool), right-padded.
    """

    def __init__(self, vocab: Iterable[str]):
        words = list(SPECIALS) + sorted(set(vocab) - set(SPECIALS))
        self.itos = words
        self.stoi = {w: i for i, w in enumerate(words)}
        for name in ("pad", "unk", "bos", "eos", "mask", "img", "sep"):
            setattr(self, f"{name}_id", self.stoi[f"[{name.upper()}]"])

    @classmethod
    def from_texts(cls, texts: Iterable[str], extra_words: Iterable[str] = ()) -> WordTokenizer:
        vocab = {w for t in texts for w in split_words(t)}
        return cls(vocab | set(extra_words))

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @property
    def special_ids(self) -> list[int]:
        return [self.stoi[s] for s in SPECIALS]

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        ids = [self.stoi.get(w, self.unk_id) for w in split_words(text)]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        specials = set(self.special_ids)
        words = [self.itos[i] for i in (int(t) for t in ids) if i not in specials and 0 <= i < len(self.itos)]
        return re.sub(r" ([,.?!])", r"\1", " ".join(words))

    def __call__(self, texts: list[str], context_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            toks = self.encode(text)
            if len(toks) > context_length:  # keep [EOS] last: the text towers pool on it
                toks = toks[: context_length - 1] + [self.eos_id]
            ids[i, : len(toks)] = torch.tensor(toks)
        return ids, ids != self.pad_id

    def save(self, path: str | os.PathLike) -> None:
        """JSON {"vocab": [...]}, written to a temporary file and renamed, so a crash never leaves a torn one."""
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"vocab": self.itos})))

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        try:
            with open(path) as f:
                itos = json.load(f)["vocab"]
        except (ValueError, KeyError, TypeError) as e:  # bad JSON or UTF-8, or no "vocab" list in it
            raise ValueError(f"path: {path} is not a WordTokenizer vocabulary, it is truncated or corrupted") from e
        if not isinstance(itos, list) or tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"path: {path} is not a WordTokenizer vocabulary")
        tok = cls(itos)
        tok.itos, tok.stoi = itos, {w: i for i, w in enumerate(itos)}
        return tok
