"""Embedded datasets, tokenizer, collators and packing."""

import json

import numpy as np
import pytest
import torch

from mmkern.data import (
    IGNORE_INDEX,
    ImageTextCollator,
    InstructionCollator,
    InstructionDataset,
    WordTokenizer,
    digits,
    from_folder,
    instruction_data,
    instruction_example,
    mask_tokens,
    pack_examples,
    pad_examples,
    shapes,
)


def test_tokenizer_roundtrip_specials_and_truncation(tmp_path):
    tok = WordTokenizer.from_texts(["a photo of the digit seven.", "two red circles."])
    assert tok.pad_id == 0 and len({tok.bos_id, tok.eos_id, tok.mask_id, tok.img_id, tok.sep_id}) == 5
    ids = tok.encode("A photo of the digit seven.")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "a photo of the digit seven."
    assert tok.encode("purple")[1] == tok.unk_id
    batch, mask = tok(["a photo of the digit seven.", "two"], context_length=4)
    assert batch.shape == (2, 4) and batch[0, -1] == tok.eos_id  # truncated rows still end in [EOS]
    assert mask.tolist()[1] == [True, True, True, False]
    tok.save(tmp_path / "v.json")
    assert WordTokenizer.load(tmp_path / "v.json").itos == tok.itos


def test_digits_split_is_deterministic_stratified_and_disjoint():
    d = digits(16)
    assert d.images.shape == (1797, 3, 16, 16) and d.images.min() >= -1 and d.images.max() <= 1
    assert d.captions[7] == "the number seven written by hand." and d.labels[7] == 7
    train, test = d.split(0.2, seed=0)
    _, test2 = d.split(0.2, seed=0)
    assert torch.equal(test.images, test2.images) and len(train) + len(test) == len(d)
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 30  # every digit is held out in proportion
    few = train.few_shot(3)
    assert torch.equal(torch.bincount(few.labels), torch.full((10,), 3))
    shots, rest = d.take_few_shot(5, seed=1)
    assert torch.equal(shots.images, d.few_shot(5, seed=1).images) and len(shots) + len(rest) == len(d)
    assert not any((rest.images == im).flatten(1).all(1).any() for im in shots.images)  # disjoint
    fit, val = d.split_shots(4, 0.25)
    assert torch.equal(torch.bincount(val.labels), torch.ones(10, dtype=torch.long)) and len(fit) == 30


def test_shapes_captions_follow_attributes():
    s = shapes(60, image_size=32, seed=1)
    assert s.images.shape == (60, 3, 32, 32)
    assert torch.equal(shapes(60, image_size=32, seed=1).images, s.images)
    for cap, meta in zip(s.captions, s.meta):
        assert meta["color"] in cap and meta["shape"] in cap
        assert (meta["count"] == "one") == cap.startswith("a ")
    # a coloured shape really is drawn: some pixels differ from the background
    assert (s.images.amax(dim=(1, 2, 3)) > 0).all()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_from_folder(tmp_path, fmt):
    from PIL import Image

    rows = []
    for i in range(4):
        arr = np.full((10, 12, 3), 60 * i, dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"im{i}.png")
        rows.append({"image": f"im{i}.png", "caption": f"picture number {i}", "label": "dark" if i < 2 else "light"})
    if fmt == "jsonl":
        (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = ["image,caption,label"] + [f"{r['image']},{r['caption']},{r['label']}" for r in rows]
        (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    d = from_folder(tmp_path, image_size=8)
    assert d.images.shape == (4, 3, 8, 8) and d.classnames == ["dark", "light"]
    assert d.labels.tolist() == [0, 0, 1, 1] and d.captions[3] == "picture number 3"
    assert d.images[0].max() == -1 and d.images[3].min() > 0


def test_from_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="root"):
        from_folder(tmp_path)


def test_image_text_collator():
    d = digits(16)
    tok = WordTokenizer.from_texts(d.captions)
    b = ImageTextCollator(tok, 12)([d[i] for i in range(5)])
    assert b["images"].shape == (5, 3, 16, 16) and b["input_ids"].shape == (5, 12)
    assert b["labels"].tolist() == [0, 1, 2, 3, 4]


def test_mask_tokens_only_words_and_every_row():
    tok = WordTokenizer.from_texts(["a b c d e f g h"])
    ids, _ = tok(["a b c d e f g h", "a"], 12)
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids, tok, 0.3, generator=g)
    chosen = labels != IGNORE_INDEX
    assert chosen.any(dim=1).all()
    assert not chosen[ids == tok.pad_id].any() and not chosen[ids == tok.bos_id].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    big, _ = tok(["a b c d e f g h"] * 400, 12)
    m, lab = mask_tokens(big, tok, 0.15, generator=g)
    frac = (m[lab != IGNORE_INDEX] == tok.mask_id).float().mean()
    assert 0.7 < frac < 0.9


def test_instruction_example_supervises_only_the_response():
    tok = WordTokenizer.from_texts(["what digit is this? seven"])
    ids, labels = instruction_example(tok, 3, "what digit is this?", "seven")
    assert ids[:4] == [tok.bos_id] + [tok.img_id] * 3
    supervised = [i for i, y in zip(ids, labels) if y != IGNORE_INDEX]
    assert supervised == tok.encode("seven", bos=False, eos=True)
    prompt, _ = instruction_example(tok, 3, "what digit is this?", None)
    assert prompt == ids[: len(prompt)] and prompt[-1] == tok.sep_id


def test_pack_and_pad_agree():
    ex = [([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9]), ([10], [10])]
    p = pack_examples(ex)
    assert p["cu_seqlens"].dtype == torch.int32 and p["cu_seqlens"].tolist() == [0, 3, 5, 6] and p["max_seqlen"] == 3
    assert p["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    padded = pad_examples(ex, pad_id=0)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0], [10, 0, 0]]
    left = pad_examples(ex, pad_id=0, left=True)
    assert left["input_ids"][1].tolist() == [0, 8, 9] and left["attention_mask"][1].tolist() == [False, True, True]


def test_instruction_data_and_packed_collator():
    d = shapes(20, image_size=16)
    rows = instruction_data(d, per_image=2, seed=0)
    assert len(rows) == 40
    for r in rows:
        meta = d.meta[r["image_index"]]
        assert r["response"] == meta[r["task"]]
    tok = WordTokenizer.from_texts([r["instruction"] + " " + r["response"] for r in rows])
    ds = InstructionDataset(d, rows)
    b = InstructionCollator(tok, 4, pack=True)([ds[i] for i in range(3)])
    assert b["images"].shape == (3, 3, 16, 16) and b["cu_seqlens"].shape == (4,)
    assert int((b["input_ids"] == tok.img_id).sum()) == 12
