"""Few-shot transfer: the faded task, cloze class vectors (verbalizer="learned"), few-shot probe / fine-tuning, the
curve over k and seeds, its table and plot, and `mmkern train prompt / cloze / transfer` on a folder of images."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmkern.data import TaskData, WordTokenizer, digits, faded
from mmkern.models.checkpoint import save_checkpoint
from mmkern.train.cloze import ClozeConfig, ClozePrompt, build_cloze_encoder, cloze_accuracy, image_tokens, tune_cloze
from mmkern.train.contrastive import ContrastiveConfig, small_clip
from mmkern.train.fewshot import curve_table, few_shot_curve, method_configs, parse_shots, plot_curve, rises
from mmkern.train.transfer import TransferConfig, train_transfer

TINY_CLIP = ContrastiveConfig(
    image_size=8, patch_size=4, width=32, depth=1, heads=2, text_width=32, text_depth=1, embed_dim=32, context_length=12
)
TEMPLATES = ["a photo of the digit {}."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models train on one thread, as the demo's stage 4 does (mmkern.train.demo.torch_threads): the
    file took 16 s so and 61 s on two threads on the shared 2-core VM."""
    from mmkern.train.demo import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data():
    d = digits(8)
    return d, WordTokenizer.from_texts(d.captions + [t.format(c) for t in TEMPLATES for c in d.classnames])


@pytest.fixture(scope="module")
def clip(data):
    torch.manual_seed(0)
    return small_clip(data[1], TINY_CLIP).eval()


def test_faded_scales_intensity_toward_black(data):
    d = data[0].subset(range(20))
    f = faded(d, 0.4)
    torch.testing.assert_close((f.images + 1) / 2, 0.4 * (d.images + 1) / 2)  # in [0, 1]: v -> 0.4 v
    assert float(f.images.min()) == -1.0 and float(f.images.max()) <= 2 * 0.4 - 1 + 1e-6  # black stays black
    assert f.captions == d.captions and torch.equal(f.labels, d.labels) and torch.equal(d.images, data[0].images[:20])
    assert faded(d, 1.0).images.equal(d.images)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="contrast"):
            faded(d, bad)
    task = TaskData(contrast=0.4)
    train, test = task.load(8, seed=0)
    assert len(train) + len(test) == len(data[0]) and task.shift(test).images.max() < test.images.max()
    with pytest.raises(ValueError, match="dataset"):
        TaskData(dataset="no/such/folder").load(8)


def _cloze_setup(data, clip):
    d, tok = data
    torch.manual_seed(0)  # the fusion layers' initialisation, whatever ran before
    enc = build_cloze_encoder(clip, tok, ClozeConfig(context_length=12)).eval()
    return d, tok, enc


def test_learned_verbalizer_starts_at_the_label_words_and_then_moves(data, clip):
    """At step 0 the class vectors give the label words' scores up to one constant per image (the vocabulary's
    log-normaliser), so the same ranking and the same loss; tuning then moves them, not the encoder."""
    d, tok, enc = _cloze_setup(data, clip)
    words = ClozePrompt(enc, tok, d.classnames, TEMPLATES[0], 5, 1)
    learned = ClozePrompt(enc, tok, d.classnames, TEMPLATES[0], 5, 1, verbalizer="learned")
    embeds = image_tokens(enc, d.images[:16])
    with torch.no_grad():
        a, b = words(embeds), learned(embeds)
    gap = b - a
    torch.testing.assert_close(gap, gap[:, :1].expand_as(gap), rtol=1e-4, atol=1e-4)
    labels = d.labels[:16]
    torch.testing.assert_close(F.cross_entropy(a, labels), F.cross_entropy(b, labels), rtol=1e-4, atol=1e-5)
    assert len(learned.prompt_parameters()) == 4 and len(words.prompt_parameters()) == 2
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    cfg = ClozeConfig(context_length=12, progress=False, steps=3, n_before=5, n_after=1, verbalizer="learned", lr=0.1)
    tuned = tune_cloze(enc, tok, d.few_shot(2), cfg, None, tune="soft")["model"]
    assert not torch.equal(tuned.label_weight, learned.label_weight)
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="verbalizer"):
        ClozePrompt(enc, tok, d.classnames, TEMPLATES[0], verbalizer="free")


def test_method_configs_adapt_where_the_handwritten_prompts_fail(data, clip):
    """On an untrained CLIP the hand-written classifier is near chance; the stage-4 settings of CoOp (a context per
    class, no pull back to the hand-written prompts) and of the cloze prompt (+ class vectors) fit their shots.
    (Over four initialisations of these tiny models: CoOp 0.25-0.63 and cloze 0.30-0.73 from ~0.1.)"""
    from mmkern.train.prompt import train_prompts

    d, tok, enc = _cloze_setup(data, clip)
    shots = faded(d, 0.4).few_shot(4)
    prompt, cloze, _ = method_configs()
    prompt = replace(prompt, steps=40, lr=0.05, shots=4, context_length=12, progress=False)
    r = train_prompts(clip, tok, shots, shots, TEMPLATES, prompt)
    assert r["prompt_learned_top1"] >= r["prompt_handwritten_top1"] + 0.1, r
    cloze = replace(cloze, steps=60, lr=0.3, shots=4, context_length=12, progress=False)
    start = cloze_accuracy(enc, tok, shots, TEMPLATES[0], 12)
    tuned = tune_cloze(enc, tok, shots, cloze, None, tune="soft")["model"]
    assert cloze_accuracy(tuned, tok, shots, TEMPLATES[0], 12) >= start + 0.1


def test_transfer_from_k_shots(data, clip):
    d = data[0]
    train, test = d.split(0.2)
    vis = {k[7:]: v for k, v in clip.state_dict().items() if k.startswith("visual.")}
    c = TransferConfig(steps=2, probe_steps=2, batch_size=64, shots=1, progress=False)
    r = train_transfer(vis, clip.visual.config, train, test.subset(range(50)), c)  # 10 images < batch 64
    assert 0 <= r["linear_probe_top1"] <= 1 and 0 <= r["finetune_top1"] <= 1
    with pytest.raises(ValueError, match="shots"):
        train_transfer(vis, clip.visual.config, train, test, TransferConfig(shots=-1))


def test_few_shot_curve_shapes_seeds_and_zero_shot_lines(data, clip, tmp_path):
    d, tok, enc = _cloze_setup(data, clip)
    pool, test = faded(d, 0.4).split(0.5)
    prompt, cloze, transfer = method_configs()
    prompt, cloze = replace(prompt, steps=2, context_length=12), replace(cloze, steps=2, context_length=12)
    transfer = replace(transfer, steps=2, probe_steps=2)
    test = test.subset(range(60))
    curve = few_shot_curve(clip, tok, pool, test, TEMPLATES, [1, 2], [0, 1], prompt, transfer, cloze, enc, False)
    assert curve["shots"] == [1, 2] and curve["seeds"] == [0, 1]
    assert list(curve["mean"]) == ["zero_shot", "coop", "cloze_zero_shot", "cloze", "linear_probe", "finetune"]
    for m, runs in curve["top1"].items():
        assert len(runs) == 2 and all(len(r) == 2 and all(0 <= a <= 1 for a in r) for r in runs), m
        assert curve["mean"][m] == [sum(r) / 2 for r in runs]
    assert curve["std"]["zero_shot"] == [0.0, 0.0] and len(set(curve["mean"]["cloze_zero_shot"])) == 1
    table = curve_table(curve)
    assert "CoOp, learned context" in table and "k=2" in table and "±" in table
    assert plot_curve(curve, tmp_path / "c.png").stat().st_size > 1000
    no_cloze = few_shot_curve(clip, tok, pool, test, TEMPLATES, [1], [0], prompt, transfer, progress=False)
    assert "cloze" not in no_cloze["mean"] and "coop" in no_cloze["mean"]
    with pytest.raises(ValueError, match="shots"):
        few_shot_curve(clip, tok, pool.few_shot(3), test, TEMPLATES, [4], [0], prompt, transfer, progress=False)
    with pytest.raises(ValueError, match="cloze_encoder"):
        few_shot_curve(clip, tok, pool, test, TEMPLATES, [1], [0], prompt, transfer, cloze, None, False)


def test_parse_shots_and_rises():
    assert parse_shots("1,2,4,8,16") == [1, 2, 4, 8, 16] and parse_shots(" 3 ") == [3]
    for bad in ("", "0,1", "4,2", "1,1", "a,b"):
        with pytest.raises(ValueError, match="curve"):
            parse_shots(bad)
    assert rises([0.5, 0.6, 0.59, 0.7]) and rises([0.5, 0.5, 0.51])
    assert not rises([0.5, 0.6, 0.55, 0.7])  # a drop larger than the slack
    assert not rises([0.5, 0.5, 0.5])  # flat


@pytest.fixture(scope="module")
def folder(tmp_path_factory, data, clip):
    """A user's folder: 8x8 PNGs of 100 digits with captions.jsonl (label field), and the tiny CLIP saved."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    d = data[0].subset(range(100))
    rows = []
    for i in range(len(d)):
        pixels = ((d.images[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": d.captions[i], "label": d.classnames[int(d.labels[i])]})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_checkpoint(clip, root / "clip.safetensors")
    data[1].save(root / "clip_tokenizer.json")
    return root


def test_cli_few_shot_tasks_on_a_folder(folder, tmp_path, capsys):
    """prompt / cloze / transfer on the user's folder (sorted class names as labels), faded; the curve writes its
    plot and the 16-shot keys; a folder without labels is refused naming the argument."""
    from mmkern.train.cli import train_main

    common = ["--clip", str(folder / "clip.safetensors"), "--dataset", str(folder), "--no-progress"]
    common += ["--contrast", "0.4", "--held-out", "0.3"]
    assert train_main(["prompt", *common, "--steps", "2", "--shots", "2", "--context-length", "12"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"prompt_handwritten_top1", "prompt_learned_top1"} <= set(out)
    cloze = ["--pretrain-steps", "2", "--pretrain-batch-size", "16", "--steps", "2", "--shots", "2"]
    cloze += ["--context-length", "12", "--verbalizer", "learned", "--out-dir", str(tmp_path / "cz")]
    assert train_main(["cloze", *common, *cloze]) == 0
    assert "cloze_soft_top1" in json.loads(capsys.readouterr().out)
    enc = tmp_path / "cz" / "cloze_encoder.safetensors"
    assert train_main(["cloze", *common, *cloze[4:], "--cloze-encoder", str(enc)]) == 0  # no MLM pretraining
    assert np.isnan(json.loads(capsys.readouterr().out)["mlm_acc"])
    curve = ["--curve", "1,2", "--seeds", "2", "--steps", "2", "--probe-steps", "2", "--prompt-steps", "2"]
    curve += ["--cloze-steps", "2", "--out-dir", str(tmp_path / "t")]
    assert train_main(["transfer", *common, *curve, "--cloze-encoder", str(enc)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["curve"]["shots"] == [1, 2] and res["curve"]["seeds"] == [0, 1]
    assert {"transfer_coop_top1", "transfer_cloze_top1", "transfer_finetune_top1"} <= set(res)
    assert (tmp_path / "t" / "fewshot.png").stat().st_size > 1000
    assert train_main(["transfer", *common, "--shots", "1", "--steps", "2", "--probe-steps", "2"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"linear_probe_top1", "finetune_top1"}
    unlabelled = tmp_path / "u"
    unlabelled.mkdir()
    (unlabelled / "captions.jsonl").write_text(json.dumps({"image": "0.png", "caption": "a zero."}) + "\n")
    (unlabelled / "0.png").write_bytes((folder / "0.png").read_bytes())
    with pytest.raises(ValueError, match="dataset"):
        train_main(["prompt", "--clip", str(folder / "clip.safetensors"), "--dataset", str(unlabelled)])
