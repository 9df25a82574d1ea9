"""The trainer under torch.distributed: 2 gloo processes on CPU must train exactly like one process that sees
the global batch (DDP and FSDP, with and without GradCache accumulation). Every wait has a timeout."""

import os
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmkern.data import ImageTextCollator, WordTokenizer, digits
from mmkern.train import Trainer
from mmkern.train.contrastive import ContrastiveConfig, contrastive_loss_fn, grad_cache_step, small_clip

CFG = ContrastiveConfig(
    image_size=8,
    patch_size=4,
    width=32,
    depth=1,
    text_width=32,
    text_depth=1,
    embed_dim=32,
    heads=2,
    context_length=12,
    progress=False,
    log_every=1,
    steps=2,
    batch_size=8,
    lr=1e-3,
    warmup_steps=1,
    grad_clip=0.0,
)


def _train(config, out_path):
    d = digits(8)
    tok = WordTokenizer.from_texts(d.captions)
    torch.manual_seed(0)
    model = small_clip(tok, config)
    fn = contrastive_loss_fn(config.loss)
    if config.accum_steps > 1:
        trainer = Trainer(model, config, step_fn=grad_cache_step(fn))
    else:
        trainer = Trainer(model, config, fn)
    hist = trainer.fit(d, ImageTextCollator(tok, config.context_length))
    if config.out_dir:
        trainer.save()
    state = {k: v.detach().clone() for k, v in trainer._full_state()[0].items()}
    grads = {}
    for name, p in model.named_parameters():  # the last step's gradients (FSDP: gathered from the shards)
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.detach().clone()
    if out_path is not None:
        torch.save({"state": state, "grads": grads, "hist": hist}, out_path)
    return state, grads, hist


def _worker(rank, world, init_file, config, out_dir):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=__import__("datetime").timedelta(seconds=60),
    )
    torch.set_num_threads(1)
    try:
        _train(config, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_two(tmp_path, config, timeout=240):
    ctx = mp.start_processes(
        _worker, args=(2, str(tmp_path / "init"), config, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.time() + timeout
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish in time")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("mode", ["ddp", "ddp_gradcache", "fsdp"])
def test_two_processes_train_like_one_global_batch(tmp_path, mode):
    config = replace(
        CFG,
        distributed="fsdp" if mode == "fsdp" else "ddp",
        accum_steps=2 if mode == "ddp_gradcache" else 1,
        out_dir=str(tmp_path / "ckpt") if mode == "fsdp" else None,
    )
    results = _run_two(tmp_path, config)
    # one process, batch = the global batch of both ranks (the sampler gives rank r the r-th slice of it)
    single, grads, hist = _train(replace(config, batch_size=2 * CFG.batch_size, distributed="ddp", out_dir=None), None)
    for r in [0] if mode == "fsdp" else [0, 1]:
        # Gradients must agree (a missing average or missing cross-rank negatives would show here); weights
        # get a looser bound because AdamW turns float noise in near-zero gradients (the key bias) into steps.
        for k, v in grads.items():
            torch.testing.assert_close(results[r]["grads"][k], v, rtol=2e-3, atol=1e-5, msg=f"rank {r} grad {k}")
        for k, v in single.items():
            got = results[r]["state"][k]
            if k.endswith("qkv.bias"):  # the key bias has an exactly-zero gradient (softmax shift invariance):
                D = v.shape[0] // 3  # AdamW moves it by +-lr on rounding noise, so leave that slice out
                got, v = torch.cat([got[:D], got[2 * D :]]), torch.cat([v[:D], v[2 * D :]])
            torch.testing.assert_close(got, v, rtol=1e-3, atol=2 * CFG.lr, msg=f"rank {r} {k}")
    losses = [h["loss"] for h in results[0]["hist"]]
    assert losses == pytest.approx([h["loss"] for h in hist], rel=1e-4)
    if mode == "fsdp":
        assert (tmp_path / "ckpt" / "checkpoints" / "latest").exists()
