"""A plain training loop to read and extend: mixed precision, gradient clipping and accumulation, gradient
checkpointing, optional torch.compile, warmup + cosine LR, DDP / FSDP, checkpoint + exact resume, a tqdm bar
with samples/s, metrics JSONL and PNG curves.

    trainer = Trainer(model, TrainConfig(steps=500, batch_size=64, out_dir="runs/x"), loss_fn)
    history = trainer.fit(dataset, collate)

`loss_fn(model, batch) -> loss` or `(loss, {"name": float})`. A task whose step is not "forward, backward per
micro-batch" (GradCache for contrastive losses) passes `step_fn(trainer, micro_batches) -> metrics` instead
and uses trainer.forward / trainer.backward / trainer.autocast / trainer.no_sync.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mmkern._extras import pyplot, train_module
from mmkern._files import atomic_write
from mmkern.train import checkpoint as ckpt


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 64  # samples per optimizer step and process, split into accum_steps micro-batches
    accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    grad_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    out_dir: str | None = None  # metrics.jsonl, curves.png, checkpoints/
    log_every: int = 10
    ckpt_every: int = 0  # 0: one checkpoint at the end (when out_dir is set)
    keep_checkpoints: int = 2
    resume: bool = False  # continue from out_dir/checkpoints/latest if there is one
    progress: bool = True
    distributed: str = "ddp"  # ddp | fsdp; used only when torch.distributed is initialised with > 1 process
    device: str = "auto"


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * min(t, 1.0))) if config.schedule == "cosine" else max(0.0, 1 - t)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape


class BatchSampler:
    """Index batches from a seeded permutation per epoch; the state (epoch, position) is the data position a
    checkpoint stores. With several processes each takes its slice of the global batch."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if batch_size * world > n:
            raise ValueError(f"batch_size: {batch_size} x {world} processes exceeds the dataset size {n}")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.pos = 0, 0

    def next(self) -> list[int]:
        global_batch = self.batch_size * self.world
        if self.pos + global_batch > self.n:  # drop the ragged tail: every step sees a full batch
            self.epoch, self.pos = self.epoch + 1, 0
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        start = self.pos + self.rank * self.batch_size
        self.pos += global_batch
        return perm[start : start + self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


class _TaskModule(nn.Module):
    """Puts the task's function inside forward, so DDP sees every forward (its gradient sync hooks depend on it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def move(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move(v, device) for v in batch)
    return batch


def seed_everything(seed: int) -> None:
    """Seeds torch and random. Each task calls it before it builds its models (their initialisation draws from
    torch's generator), and the Trainer again before training, so a run depends on its seed only."""
    torch.manual_seed(seed)
    random.seed(seed)


class KeepBest:
    """A copy of `tensors` at the best validation seen (higher accuracy, then lower loss); `restore()` copies it
    back. Few-shot tuners keep the step that validates best, so tuning that does not help falls back to the start."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self.key, self.step, self.state, self.val_top1 = None, 0, None, float("nan")

    @torch.no_grad()
    def update(self, step: int, acc: float, loss: float) -> None:
        if self.key is None or (acc, -loss) > self.key:
            self.key, self.step, self.val_top1 = (acc, -loss), step, acc
            self.state = [t.detach().clone() for t in self.tensors]

    @torch.no_grad()
    def restore(self) -> None:
        if self.state is not None:
            for t, saved in zip(self.tensors, self.state):
                t.copy_(saved)


def adamw(params, lr: float, device: torch.device, fused: bool = True) -> torch.optim.AdamW:
    """torch's AdamW, fused (one multi-threaded kernel over every parameter) where torch has that for the device
    (several times faster than the default per-tensor loop; README). fused=False keeps the default (FSDP's sharded parameters)."""
    fused = fused and device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=lr, fused=fused or None)


class Trainer:
    def __init__(self, model: nn.Module, config: TrainConfig, loss_fn=None, *, step_fn=None, parameters=None):
        if (loss_fn is None) == (step_fn is None):
            raise ValueError("loss_fn: pass exactly one of loss_fn and step_fn")
        if config.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision: expected fp32, bf16 or fp16, got {config.precision!r}")
        if config.batch_size % config.accum_steps:
            raise ValueError(f"accum_steps: {config.accum_steps} does not divide batch_size {config.batch_size}")
        self.config, self.loss_fn, self.step_fn = config, loss_fn, step_fn
        self.rank, self.world = world()
        dev = config.device
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev)
        seed_everything(config.seed)
        self.model = model.to(self.device)
        if config.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError("grad_checkpointing: the model has no set_grad_checkpointing()")
            model.set_grad_checkpointing(True)
        self._replicated: set = set()
        self.engine = self._wrap(_TaskModule(self.model))
        params = [p for p in (parameters if parameters is not None else self.model.parameters()) if p.requires_grad]
        self.params = params
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        sharded = self.world > 1 and config.distributed == "fsdp"
        self.optimizer = adamw([g for g in groups if g["params"]], config.lr, self.device, fused=not sharded)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.step, self.history = 0, []
        self.sampler: BatchSampler | None = None
        self.out = Path(config.out_dir) if config.out_dir else None

    # ---- building blocks a step_fn uses -------------------------------------------------------------------
    def _wrap(self, module: nn.Module) -> nn.Module:
        if self.world > 1 and self.config.distributed == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        elif self.world > 1 and self.config.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # FSDP2 cannot shard 0-dim parameters (CLIP's logit scale / bias): they stay replicated and their
            # gradients are averaged by hand in train_step.
            self._replicated = {p for p in self.model.parameters() if p.ndim == 0}
            for sub in self.model.modules():  # shard each Transformer block, then the rest
                if type(sub).__name__ == "Block":
                    fully_shard(sub)
            fully_shard(module, ignored_params=self._replicated)
        elif self.world > 1:
            raise ValueError(f"distributed: expected ddp or fsdp, got {self.config.distributed!r}")
        return torch.compile(module) if self.config.compile else module

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def forward(self, fn, *args, **kwargs):
        """fn(model, *args, **kwargs) through the (DDP / compiled) wrapper, under autocast."""
        with self.autocast():
            return self.engine(fn, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def no_sync(self, last: bool):
        """Skips DDP's gradient all-reduce on all but the last micro-batch of a step."""
        engine = getattr(self.engine, "_orig_mod", self.engine)
        if last or not isinstance(engine, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return engine.no_sync()

    # ---- one optimizer step -----------------------------------------------------------------------------
    def _default_step(self, micro_batches: list) -> dict:
        totals: dict[str, float] = {}
        k = len(micro_batches)
        for i, mb in enumerate(micro_batches):
            with self.no_sync(i == k - 1):
                out = self.forward(self.loss_fn, mb)
                loss, extra = out if isinstance(out, tuple) else (out, {})
                self.backward(loss / k)
            for name, v in {"loss": loss.detach(), **extra}.items():
                totals[name] = totals.get(name, 0.0) + float(v) / k
        return totals

    def train_step(self, batch: dict) -> dict:
        micro = _split(batch, self.config.accum_steps)
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self.step_fn(self, micro) if self.step_fn else self._default_step(micro)
        for p in self._replicated:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world
        if self.world > 1:  # log the mean over processes: each rank's loss covers its own rows only
            names = sorted(metrics)
            t = torch.tensor([float(metrics[n]) for n in names], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            metrics = dict(zip(names, (t / self.world).tolist()))
        self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            metrics["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        return metrics

    # ---- the loop -----------------------------------------------------------------------------------------
    def fit(self, dataset, collate, eval_fn=None, eval_every: int = 0, sampler=None) -> list[dict]:
        """Runs until config.steps; eval_fn(model) -> dict of metrics, every eval_every steps and at the end.
        `sampler` (next() -> indices, state_dict, load_state_dict) chooses each step's samples; default: batches of
        config.batch_size (BatchSampler). -> the metrics history (one dict per logged step)."""
        tqdm = train_module("tqdm.auto").tqdm

        c = self.config
        self.sampler = sampler or BatchSampler(len(dataset), c.batch_size, c.seed, self.rank, self.world)
        if c.resume and self.out is not None and ckpt.latest_checkpoint(self.out / "checkpoints"):
            self.load(ckpt.latest_checkpoint(self.out / "checkpoints"))
        log = None
        if self.out is not None and self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_jsonl(self.out / "metrics.jsonl", self.step)
            log = open(self.out / "metrics.jsonl", "a")  # noqa: SIM115 (open for the whole run, closed below)
        bar = tqdm(total=c.steps, initial=self.step, disable=not c.progress or self.rank != 0, dynamic_ncols=True)
        self.model.train()
        window_t, window_n = time.perf_counter(), 0
        try:
            while self.step < c.steps:
                indices = self.sampler.next()
                batch = move(collate([dataset[i] for i in indices]), self.device)
                metrics = self.train_step(batch)
                window_n += len(indices) * self.world
                bar.update(1)
                last = self.step == c.steps
                evaluate = eval_fn is not None and ((eval_every and self.step % eval_every == 0) or last)
                if evaluate:
                    self.model.eval()
                    with torch.no_grad(), self.autocast():
                        metrics.update(eval_fn(self.model))
                    self.model.train()
                if self.step % c.log_every == 0 or last or evaluate:
                    elapsed = time.perf_counter() - window_t
                    record = {"step": self.step, **metrics, "samples_per_s": window_n / max(elapsed, 1e-9)}
                    window_t, window_n = time.perf_counter(), 0
                    self.history.append(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.0f}")
                    if log is not None:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                if self.out is not None and ((c.ckpt_every and self.step % c.ckpt_every == 0) or last):
                    self.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
        if self.out is not None and self.rank == 0:
            plot_metrics(self.out / "metrics.jsonl", self.out / "curves.png")
        return self.history

    # ---- checkpoints --------------------------------------------------------------------------------------
    def _full_state(self) -> tuple[dict, dict]:
        if self.config.distributed == "fsdp" and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_state_dict(self.model, self.optimizer, options=opts)
        return self.model.state_dict(), self.optimizer.state_dict()

    def save(self) -> Path:
        weights, optim = self._full_state()
        state = {
            "step": self.step,
            "optimizer": optim,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict() if self.sampler else None,
            "config": asdict(self.config),
        }
        barrier = dist.barrier if self.world > 1 else None
        return ckpt.save_checkpoint(
            self.out / "checkpoints",
            self.step,
            weights if self.rank == 0 else None,
            state if self.rank == 0 else None,
            self.rank,
            self.config.keep_checkpoints,
            barrier,
        )

    def load(self, path) -> None:
        weights, state, rng = ckpt.load_checkpoint(path, self.rank)
        if self.config.distributed == "fsdp" and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            set_state_dict(
                self.model, self.optimizer, model_state_dict=weights, optim_state_dict=state["optimizer"], options=opts
            )
        else:
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.sampler is not None and state["sampler"] is not None:
            self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        if rng is not None:
            ckpt.set_rng_state(rng)


def _split(batch, k: int) -> list:
    """A dict of tensors or lists (leading dim B) -> k micro-batch dicts, split as tensor.chunk does; other values
    are shared."""
    if k == 1:
        return [batch]
    out = [{} for _ in range(k)]
    for key, v in batch.items():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            parts = v.chunk(k)
        elif isinstance(v, list):  # images of different sizes
            n = -(-len(v) // k)
            parts = [v[i : i + n] for i in range(0, len(v), n)]
        else:
            parts = [v] * k
        for d, p in zip(out, parts):
            d[key] = p
    return out


def _truncate_jsonl(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint's step so the log has no duplicate steps."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, lambda p: Path(p).write_text("".join(line + "\n" for line in keep)))


def plot_metrics(jsonl: str | os.PathLike, png: str | os.PathLike, keys: list[str] | None = None) -> Path:
    """One panel per numeric metric (loss, accuracies, lr, ...) against the step, saved as PNG (Agg)."""
    plt = pyplot()

    records = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    names = keys or sorted({k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    cols = min(3, max(1, len(names)))
    rows = math.ceil(len(names) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = [(r["step"], r[name]) for r in records if name in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return Path(png)
