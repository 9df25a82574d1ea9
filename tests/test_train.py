"""Training loop, checkpoints, resume, GradCache, and each task for a few steps on tiny models."""

import copy
import json
from dataclasses import replace

import pytest
import torch

from mmkern.data import ImageTextCollator, WordTokenizer, digits
from mmkern.models import state_dict
from mmkern.train import BatchSampler, TrainConfig, Trainer, lr_factor
from mmkern.train import checkpoint as ckpt
from mmkern.train.baseline import PlainCLIP, naive_clip_loss
from mmkern.train.contrastive import ContrastiveConfig, contrastive_loss_fn, grad_cache_step, small_clip

TINY = {
    "image_size": 8,
    "patch_size": 4,
    "width": 32,
    "depth": 1,
    "text_width": 32,
    "text_depth": 1,
    "embed_dim": 32,
    "heads": 2,
    "context_length": 12,
    "progress": False,
    "log_every": 1,
    "warmup_steps": 2,
}


@pytest.fixture(scope="module")
def data():
    d = digits(8)
    return d, WordTokenizer.from_texts(d.captions)


def tiny_setup(data, **kw):
    tok = data[1]
    c = ContrastiveConfig(**{**TINY, "steps": 4, "batch_size": 16, **kw})
    torch.manual_seed(0)
    return c, small_clip(tok, c), ImageTextCollator(tok, c.context_length)


def test_lr_schedule():
    c = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(100, c) == pytest.approx(0.1) and 0.1 < lr_factor(55, c) < 1.0
    assert lr_factor(50, replace(c, schedule="constant")) == 1.0


def test_batch_sampler_state_resumes_the_stream():
    a = BatchSampler(10, 4, seed=3)
    seq = [a.next() for _ in range(5)]
    b = BatchSampler(10, 4, seed=3)
    [b.next() for _ in range(2)]
    c = BatchSampler(10, 4, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next() for _ in range(3)] == seq[2:]
    assert all(len(x) == 4 for x in seq) and len(set(seq[0] + seq[1])) == 8  # no repeats within an epoch
    ranks = [BatchSampler(10, 2, seed=1, rank=r, world=2).next() for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])


def test_loop_trains_and_writes_logs(tmp_path, data):
    c, model, collate = tiny_setup(data, steps=8, batch_size=32, lr=3e-3, out_dir=str(tmp_path))
    hist = Trainer(model, c, contrastive_loss_fn("clip")).fit(data[0], collate)
    assert len(hist) == 8 and hist[-1]["loss"] < hist[0]["loss"]
    assert all(h["samples_per_s"] > 0 for h in hist)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 9))
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step_00000008"


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_grad_cache_matches_one_big_batch(data, loss):
    c, model, collate = tiny_setup(data, loss=loss, batch_size=16, accum_steps=4, grad_clip=0.0)
    batch = collate([data[0][i] for i in range(16)])
    ref = copy.deepcopy(model)
    fn = contrastive_loss_fn(loss)
    fn(ref, batch)[0].backward()
    trainer = Trainer(model, c, step_fn=grad_cache_step(fn))
    trainer.optimizer.zero_grad()
    from mmkern.train.loop import _split

    out = trainer.step_fn(trainer, _split(batch, 4))
    assert out["loss"] == pytest.approx(float(fn(ref, batch)[0].detach()), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_plain_accumulation_equals_big_batch_for_a_mean_loss(data):
    c, model, collate = tiny_setup(data, batch_size=16, accum_steps=2, grad_clip=0.0, steps=1, lr=1e-3)
    batch = collate([data[0][i] for i in range(16)])

    def loss_fn(m, b):  # a per-sample mean loss: accumulation is exact for it
        return m.encode_image(b["images"]).pow(2).mean()

    ref = copy.deepcopy(model)
    loss_fn(ref, batch).backward()
    t = Trainer(model, c, loss_fn)
    t.optimizer.zero_grad()
    from mmkern.train.loop import _split

    t._default_step(_split(batch, 2))
    for p, q in zip(model.parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)


def _crash_after(fn, n):
    calls = {"n": 0}

    def wrapped(model, batch):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt("simulated crash")
        return fn(model, batch)

    return wrapped


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, data, precision):
    c, model, collate = tiny_setup(data, steps=6, ckpt_every=3, keep_checkpoints=5, precision=precision)
    init = copy.deepcopy(model.state_dict())
    fn = contrastive_loss_fn("clip")
    full = Trainer(model, replace(c, out_dir=str(tmp_path / "a")), fn).fit(data[0], collate)

    m2 = small_clip(data[1], c)
    m2.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):
        Trainer(m2, replace(c, out_dir=str(tmp_path / "b")), _crash_after(fn, 4)).fit(data[0], collate)
    m3 = small_clip(data[1], c)  # a fresh process would rebuild the model from scratch
    resumed = Trainer(m3, replace(c, out_dir=str(tmp_path / "b"), resume=True), fn).fit(data[0], collate)
    assert [h["step"] for h in resumed] == [4, 5, 6]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full[3:]]
    for k, v in model.state_dict().items():
        assert torch.equal(v, m3.state_dict()[k]), k
    logged = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch, data):
    c, model, collate = tiny_setup(data, steps=2, ckpt_every=1, out_dir=str(tmp_path))
    t = Trainer(model, c, contrastive_loss_fn("clip"))
    t.fit(data[0], collate)
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step_00000002"

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(state_dict, "save_file", broken)
    t.step = 3
    with pytest.raises(OSError):
        t.save()
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step_00000002" and not (tmp_path / "checkpoints" / "step_00000003").exists()
    weights, state, rng = ckpt.load_checkpoint(latest)
    assert state["step"] == 2 and rng is not None and set(weights) == set(model.state_dict())


def test_checkpoint_stores_tied_weights_once(tmp_path):
    """The trainer's weights file follows the model checkpoints' rule: a tied weight is stored once and comes back
    under both names; a tensor that only shares memory with another (a view of part of it) is stored as a copy."""
    emb = torch.randn(5, 3)
    weights = {"embed": emb, "head": emb, "first_rows": emb[:2], "bias": torch.zeros(3)}
    folder = ckpt.save_checkpoint(tmp_path, 1, weights, {"step": 1})
    stored, meta = state_dict.read_safetensors(folder / "model.safetensors")
    assert set(stored) == {"embed", "first_rows", "bias"} and json.loads(meta["aliases"]) == {"head": "embed"}
    loaded, state, _ = ckpt.load_checkpoint(folder)
    assert set(loaded) == set(weights) and state["step"] == 1
    for k, v in weights.items():
        assert torch.equal(loaded[k], v), k


def test_bf16_and_grad_checkpointing_run(data):
    c, model, collate = tiny_setup(data, steps=2, precision="bf16", grad_checkpointing=True)
    hist = Trainer(model, c, contrastive_loss_fn("clip")).fit(data[0], collate)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)


def test_grad_checkpointing_gives_the_same_gradients(data):
    _, model, collate = tiny_setup(data)
    batch = collate([data[0][i] for i in range(8)])
    ref = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    fn = contrastive_loss_fn("clip")
    fn(model, batch)[0].backward()
    fn(ref, batch)[0].backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_trainer_rejects_bad_config(data):
    c, model, _ = tiny_setup(data)
    with pytest.raises(ValueError, match="precision"):
        Trainer(model, replace(c, precision="fp8"), contrastive_loss_fn("clip"))
    with pytest.raises(ValueError, match="accum_steps"):
        Trainer(model, replace(c, batch_size=10, accum_steps=3), contrastive_loss_fn("clip"))
    with pytest.raises(ValueError, match="loss"):
        contrastive_loss_fn("triplet")


def test_plain_pytorch_twin_matches_the_mmkern_clip(data):
    _, model, collate = tiny_setup(data)
    plain = PlainCLIP.from_clip(model)
    batch = collate([data[0][i] for i in range(8)])
    a = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    b = plain(batch["images"], batch["input_ids"], batch["attention_mask"])
    for x, y in zip(a[:3], b[:3]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(naive_clip_loss(*b[:3]), contrastive_loss_fn("clip").pool_loss(*a), rtol=1e-5, atol=1e-6)


# ---- tasks, a few steps each ---------------------------------------------------------------------------------
def test_task_contrastive_siglip_with_grad_cache():
    from mmkern.train.contrastive import train_contrastive

    c = ContrastiveConfig(**{**TINY, "steps": 2, "batch_size": 16, "accum_steps": 2, "loss": "siglip"})
    r = train_contrastive(c)
    assert 0 <= r["metrics"]["zero_shot_top1"] <= 1 and 0 <= r["metrics"]["retrieval_r1"] <= 1


def test_task_depends_on_its_seed_only():
    """The model is built after seeding (its initialisation draws from torch's generator), so whatever ran before
    in the process, the same seed gives the same run and another seed a different one."""
    from mmkern.train.contrastive import train_contrastive

    def weights(seed):
        torch.rand(int(torch.randint(1, 100, ()).item()))  # disturb the global generator
        model = train_contrastive(ContrastiveConfig(**{**TINY, "steps": 2, "batch_size": 16, "seed": seed}))["model"]
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    first = weights(0)
    assert torch.equal(first, weights(0))
    assert not torch.equal(first, weights(1))


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (0, 1, 0, 0), (0, 0, 0, 1)])
def test_task_vlp(weights):
    from mmkern.train.vlp import VLPConfig, train_vlp

    itc, itm, mlm, mvm = weights
    c = VLPConfig(
        image_size=8,
        patch_size=4,
        width=32,
        depth=1,
        text_depth=2,
        fusion_layer=1,
        heads=2,
        steps=2,
        batch_size=8,
        progress=False,
        log_every=1,
        itc_weight=itc,
        itm_weight=itm,
        mlm_weight=mlm,
        mvm_weight=mvm,
    )
    r = train_vlp(c)
    names = {n for n, w in zip(("itc", "itm", "mlm", "mvm"), weights) if w}
    assert {k[5:] for k in r["history"][-1] if k.startswith("loss_")} == names


def test_hard_negatives_never_pick_a_positive():
    from mmkern.train.vlp import hard_negatives

    sim = torch.randn(6, 6)
    same = torch.eye(6, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    for _ in range(20):
        neg = hard_negatives(sim, same)
        assert not same[torch.arange(6), neg].any()


def test_task_prompt_and_transfer(data):
    from mmkern.train.prompt import PromptConfig, train_prompts
    from mmkern.train.transfer import TransferConfig, train_transfer

    _, model, _ = tiny_setup(data)
    train, test = data[0].split(0.2)
    r = train_prompts(
        model,
        data[1],
        train,
        test,
        ["a photo of the digit {}."],
        PromptConfig(steps=2, shots=2, progress=False, context_length=12),
    )
    assert 0 <= r["prompt_learned_top1"] <= 1 and r["learner"].ctx[0].shape == (5, 32)
    assert all(p.requires_grad for p in model.parameters())  # the towers are unfrozen again afterwards
    vis = {k[7:]: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    t = train_transfer(
        vis, model.visual.config, train, test, TransferConfig(steps=2, probe_steps=2, batch_size=16, progress=False)
    )
    assert 0 <= t["linear_probe_top1"] <= 1 and 0 <= t["finetune_top1"] <= 1


@pytest.mark.parametrize("pack", [True, False])
def test_task_instruct(data, pack):
    from mmkern.train.instruct import InstructConfig, train_instruct

    d = data[0].subset(range(60))
    train, test = d.subset(range(50)), d.subset(range(50, 60))
    c = InstructConfig(
        steps=2, stage1_steps=1, batch_size=4, width=32, depth=1, heads=2, progress=False, pack=pack, max_new_tokens=3
    )
    r = train_instruct(train, test, c)
    assert [h["stage"] for h in r["history"]] == ["stage1", "stage2"]
    assert 0 <= r["metrics"]["instruction_exact_match"] <= 1
    assert not any(p.requires_grad for p in r["model"].visual.parameters())


def test_packed_and_padded_instruction_losses_agree(data):
    from mmkern.data import InstructionCollator, InstructionDataset, instruction_data
    from mmkern.train.instruct import InstructConfig, build_decoder, instruction_loss

    d = data[0].subset(range(6))
    rows = instruction_data(d, 2)
    tok = WordTokenizer.from_texts([r["instruction"] + " " + r["response"] for r in rows])
    model = build_decoder(
        small_clip(data[1], ContrastiveConfig(**TINY)).visual.config, tok, InstructConfig(width=32, depth=1, heads=2)
    )
    items = [InstructionDataset(d, rows)[i] for i in range(4)]
    packed = instruction_loss(model, InstructionCollator(tok, model.tokens_per_image, pack=True)(items))
    padded = instruction_loss(model, InstructionCollator(tok, model.tokens_per_image, pack=False)(items))
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)


def test_cli_train_with_config_file(tmp_path, capsys):
    from mmkern.train.cli import train_main

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({k: v for k, v in TINY.items() if k != "progress"} | {"steps": 2, "batch_size": 16}))
    assert train_main(["contrastive", "--config", str(cfg), "--no-progress", "--out-dir", str(tmp_path / "o")]) == 0
    out = json.loads((tmp_path / "o" / "results.json").read_text())
    assert set(out) == {"zero_shot_top1", "retrieval_r1"}
    assert (tmp_path / "o" / "clip.safetensors").exists()
    with pytest.raises(SystemExit):
        train_main(["contrastive", "--config", str(cfg), "--precision", "fp64x", "--steps", "oops"])


def test_prompt_context_starts_as_the_handwritten_classifier(data):
    """init="templates": at step 0 the learned contexts are the templates' word embeddings, so the learner's class
    features equal CLIP's template-averaged zero-shot classifier, and with no step kept the accuracies agree."""
    from mmkern.train.prompt import PromptConfig, PromptLearner, train_prompts

    _, model, _ = tiny_setup(data)
    tok, templates = data[1], ["a photo of the digit {}.", "the digit {}."]
    model.eval()
    names = data[0].classnames
    learner = PromptLearner(model, tok, names, templates, context_length=12)
    emb = model.text.token_embedding.weight
    assert torch.equal(learner.ctx[1], emb[tok.encode("the digit", bos=False, eos=False)])
    clf = model.zero_shot_classifier(lambda t: tok(t, 12), names, templates)
    with torch.no_grad():
        torch.testing.assert_close(learner(), clf.T, rtol=1e-5, atol=1e-5)
    train, test = data[0].split(0.2)
    r = train_prompts(
        model, tok, train, test, templates, PromptConfig(steps=0, shots=4, progress=False, context_length=12)
    )
    assert r["best_step"] == 0 and r["prompt_learned_top1"] == r["prompt_handwritten_top1"]
    r = train_prompts(
        model,
        tok,
        train,
        test,
        templates,
        PromptConfig(steps=4, shots=4, lr=0.5, eval_every=2, progress=False, context_length=12),
    )
    assert r["best_step"] in (0, 2, 4) and 0 <= r["val_top1"] <= 1
    with pytest.raises(ValueError, match="templates"):
        PromptLearner(model, tok, names, ["no slot"])


def test_prompt_kg_regulariser_pulls_towards_the_handwritten_classifier(data):
    """KgCoOp term: from random contexts, a large kg_weight moves the class features towards the hand-written
    classifier."""
    from mmkern.train.prompt import PromptConfig, train_prompts

    _, model, _ = tiny_setup(data)
    tok, templates, names = data[1], ["a photo of the digit {}."], data[0].classnames
    train, test = data[0].split(0.2)
    clf = model.zero_shot_classifier(lambda t: tok(t, 12), names, templates).T.detach()

    def distance(kg, steps):
        cfg = PromptConfig(steps=steps, shots=4, val_fraction=0, init="random", kg_weight=kg, lr=0.05)
        r = train_prompts(model, tok, train, test, templates, replace(cfg, progress=False, context_length=12))
        with torch.no_grad():
            return float((r["learner"]() - clf).pow(2).sum(-1).mean())

    torch.manual_seed(0)
    start = distance(1e3, 0)
    torch.manual_seed(0)
    assert distance(1e3, 30) < 0.5 * start
