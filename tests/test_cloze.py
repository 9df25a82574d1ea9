"""Cloze prompts through the fusion encoder: slot and verbalizer, label-word averaging, soft prompt vectors,
few-shot tuning (soft and whole), MLM pretraining end to end, and bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mmkern.data import WordTokenizer, digits
from mmkern.models import CLIP
from mmkern.train.cloze import (
    ClozeConfig,
    ClozePrompt,
    build_cloze_encoder,
    cloze_accuracy,
    cloze_inputs,
    cloze_logits,
    image_tokens,
    train_cloze,
    tune_cloze,
    verbalizer_ids,
)
from mmkern.train.contrastive import ContrastiveConfig, small_clip

TEMPLATE = "a photo of the digit {}."
TINY_CLIP = ContrastiveConfig(
    image_size=8, patch_size=4, width=32, depth=1, heads=2, text_width=32, text_depth=1, embed_dim=32, context_length=12
)


@pytest.fixture(scope="module")
def data():
    d = digits(8)
    return d, WordTokenizer.from_texts(d.captions)


def tiny_encoder(tok, seed=0, **kw):
    torch.manual_seed(seed)
    clip: CLIP = small_clip(tok, TINY_CLIP)
    return build_cloze_encoder(clip, tok, ClozeConfig(context_length=12, **kw)).eval()


def tiny_config(**kw) -> ClozeConfig:
    return ClozeConfig(**{"context_length": 12, "progress": False, "log_every": 1, "warmup_steps": 1, **kw})


def test_slot_position_and_verbalizer(data):
    _, tok = data
    ids, mask, slot = cloze_inputs(tok, TEMPLATE, 12)
    assert ids.shape == mask.shape == (1, 12) and ids[0, 0] == tok.bos_id and slot == 6
    assert ids[0, slot] == tok.mask_id and tok.decode(ids[0]) == "a photo of the digit."
    assert int(mask.sum()) == 9 and ids[0, 8] == tok.eos_id  # [BOS] a photo of the digit [MASK] . [EOS]
    ids, _, slot = cloze_inputs(tok, "{} written by hand.", 12)
    assert slot == 1 and ids[0, 1] == tok.mask_id and ids[0, 2] == tok.stoi["written"]
    vids, w = verbalizer_ids(tok, ["one", "two three", "seven"])
    assert vids.shape == w.shape == (3, 2)
    assert vids[0, 0] == tok.stoi["one"] and vids[1].tolist() == [tok.stoi["two"], tok.stoi["three"]]
    assert w.tolist() == [[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]]


def test_multi_word_labels_score_the_mean_of_their_words(data):
    d, tok = data
    enc = tiny_encoder(tok)
    names = ["one", "two three", "four five six"]
    with torch.no_grad():
        scores = cloze_logits(enc, tok, d.images[:5], names, TEMPLATE, 12)
        ids, mask, slot = cloze_inputs(tok, TEMPLATE, 12)
        ids, mask = ids.expand(5, -1), mask.expand(5, -1)
        fused = enc.fuse(enc.encode_text(ids, mask), mask, enc.encode_image(d.images[:5]))
        logp = F.log_softmax(enc.mlm_logits(fused[:, slot]), -1)
    s = tok.stoi
    want = torch.stack(
        [
            logp[:, s["one"]],
            (logp[:, s["two"]] + logp[:, s["three"]]) / 2,
            (logp[:, s["four"]] + logp[:, s["five"]] + logp[:, s["six"]]) / 3,
        ],
        1,
    )
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
    assert (scores <= 0).all()


def test_soft_prompt_starts_at_the_template_changes_scores_and_gets_gradients(data):
    d, tok = data
    enc = tiny_encoder(tok)
    prompt = ClozePrompt(enc, tok, d.classnames, TEMPLATE, n_before=2, n_after=1)
    emb = enc.text.token_embedding.weight
    assert torch.equal(prompt.before, emb[[tok.stoi["the"], tok.stoi["digit"]]])
    assert torch.equal(prompt.after, emb[[tok.stoi["."]]]) and prompt.slot == 6
    e = image_tokens(enc, d.images[:8])
    with torch.no_grad():
        torch.testing.assert_close(prompt(e), cloze_logits(enc, tok, None, d.classnames, TEMPLATE, 12, image_embeds=e))
    scores = prompt(e)
    F.cross_entropy(scores, d.labels[:8]).backward()
    assert prompt.before.grad.abs().sum() > 0 and prompt.after.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    with torch.no_grad():
        prompt.before.add_(torch.randn_like(prompt.before))
        assert not torch.allclose(prompt(e), scores)
    inserted = ClozePrompt(enc, tok, d.classnames, TEMPLATE, n_before=2, n_after=1, init="random")
    assert inserted.slot == 6 + 2 and inserted.ids[0, inserted.slot] == tok.mask_id and inserted.ids.shape[1] == 12
    assert inserted(e).shape == (8, 10)


def test_soft_tuning_moves_only_the_prompt_vectors(data):
    d, tok = data
    enc = tiny_encoder(tok)
    before = copy.deepcopy(enc.state_dict())
    fit, val = d.split_shots(4, 0.25, seed=0)
    assert len(fit) == 30 and len(val) == 10
    r = tune_cloze(enc, tok, fit, tiny_config(steps=6, batch_size=10, lr=0.1, eval_every=2), val)
    prompt = r["model"]
    assert isinstance(prompt, ClozePrompt) and r["best_step"] in (0, 2, 4, 6) and 0 <= r["val_top1"] <= 1
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())  # frozen encoder unchanged
    assert all(p.requires_grad for p in enc.parameters())  # flags restored after the tuning
    r = tune_cloze(enc, tok, fit, tiny_config(steps=6, batch_size=10, lr=0.1))  # no validation: last state
    start = enc.text.token_embedding.weight[[tok.stoi["the"], tok.stoi["digit"]]]
    assert not torch.allclose(r["model"].before, start) and len(r["history"]) == 6
    assert 0 <= cloze_accuracy(r["model"], tok, d.subset(range(50))) <= 1


def test_whole_model_tuning_changes_the_encoder(data):
    d, tok = data
    enc = tiny_encoder(tok)
    enc.visual.requires_grad_(False)
    start = copy.deepcopy(enc.state_dict())
    r = tune_cloze(enc, tok, d.few_shot(2), tiny_config(steps=3, batch_size=10, whole_lr=1e-3), tune="whole")
    assert r["model"] is enc and len(r["history"]) == 3
    changed = {k for k, v in enc.state_dict().items() if not torch.equal(v, start[k])}
    assert any(k.startswith("visual.") for k in changed) and any(k.startswith("text.") for k in changed)


def test_pretrained_cloze_learns_above_chance(data):
    """End to end on an easy setting: a randomly initialised (untrained) CLIP image tower, trained with the
    fusion encoder by MLM on the digit captions; the held-out cloze accuracy must be far above chance (0.1)."""
    d, tok = data
    train, test = d.split(0.2, seed=0)
    torch.manual_seed(0)
    clip = small_clip(tok, TINY_CLIP)
    cfg = tiny_config(
        pretrain_steps=150,
        mask_prob=0.5,
        pretrain_batch_size=64,
        pretrain_lr=5e-3,
        freeze_vision=False,
        steps=10,
        shots=4,
        eval_every=5,
        tune="both",
        log_every=20,
    )
    r = train_cloze(clip, tok, train, test, cfg)
    assert r["cloze_zero_shot_top1"] > 0.6, r
    assert r["cloze_soft_top1"] > 0.6 and r["cloze_whole_top1"] > 0.6 and r["cloze_top1"] == r["cloze_soft_top1"]
    assert r["mlm_acc"] > 0.6


def test_bad_input_names_the_argument(data):
    d, tok = data
    enc = tiny_encoder(tok)
    with pytest.raises(ValueError, match="template"):
        cloze_inputs(tok, "a photo without a slot.", 12)
    with pytest.raises(ValueError, match="template"):
        cloze_inputs(tok, "{} and {}", 12)
    with pytest.raises(ValueError, match="template"):
        cloze_logits(enc, tok, d.images[:2], d.classnames, "a zebra {}.", 12)
    with pytest.raises(ValueError, match="classnames"):
        cloze_logits(enc, tok, d.images[:2], ["one", "eleven"], TEMPLATE, 12)
    with pytest.raises(ValueError, match="context_length"):
        cloze_inputs(tok, TEMPLATE, 5)
    with pytest.raises(ValueError, match="n_before"):
        ClozePrompt(enc, tok, d.classnames, TEMPLATE, n_before=6)
    with pytest.raises(ValueError, match="n_after"):
        ClozePrompt(enc, tok, d.classnames, TEMPLATE, n_before=1, n_after=2)
    with pytest.raises(ValueError, match="n_before"):
        ClozePrompt(enc, tok, d.classnames, TEMPLATE, n_before=3, n_after=1, init="random")  # 13 > 12 tokens
    with pytest.raises(ValueError, match="init"):
        ClozePrompt(enc, tok, d.classnames, TEMPLATE, init="zeros")
    with pytest.raises(ValueError, match="tune"):
        tune_cloze(enc, tok, d.few_shot(1), tiny_config(), tune="head")


def test_mlm_alone_on_precomputed_image_tokens_equals_the_image_path(data):
    from mmkern.data import ImageTextCollator
    from mmkern.train.vlp import VLPConfig, VLPModel, vlp_loss_fn

    d, tok = data
    enc = tiny_encoder(tok)
    model = VLPModel(enc)
    c = VLPConfig(itc_weight=0.0, itm_weight=0.0, mlm_weight=1.0, mask_prob=0.3)
    batch = ImageTextCollator(tok, 12)([d[i] for i in range(16)])
    loss_fn = vlp_loss_fn(tok, c)
    torch.manual_seed(3)
    loss, logs = loss_fn(model, batch)
    torch.manual_seed(3)
    cached, _ = loss_fn(model, {**batch, "image_embeds": image_tokens(enc, batch["images"])})
    torch.testing.assert_close(cached, loss)
    assert set(logs) == {"loss_mlm", "mlm_acc"}


def test_cli_train_cloze(tmp_path, capsys, data):
    import json

    from mmkern.models.checkpoint import save_checkpoint
    from mmkern.train.cli import train_main

    _, tok = data
    save_checkpoint(small_clip(tok, TINY_CLIP), tmp_path / "clip.safetensors")
    tok.save(tmp_path / "clip_tokenizer.json")
    flags = ["--pretrain-steps", "2", "--pretrain-batch-size", "16", "--steps", "2", "--shots", "2", "--tune", "both"]
    out = tmp_path / "run"
    assert (
        train_main(
            ["cloze", "--clip", str(tmp_path / "clip.safetensors"), "--no-progress", "--out-dir", str(out), *flags]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    want = {"cloze_zero_shot_top1", "cloze_soft_top1", "cloze_whole_top1", "cloze_top1", "mlm_acc"}
    assert set(printed) == want and json.loads((out / "results.json").read_text()) == printed
    assert (out / "cloze_encoder.safetensors").stat().st_size > 0 and (out / "pretrain" / "metrics.jsonl").exists()
