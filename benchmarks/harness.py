"""Shared benchmark machinery: timing (median and 20th/80th percentiles), peak memory, result records
appended to JSON with machine and versions, and plots. Every bench_<op>.py builds on this."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from mmkern import _native
from mmkern._extras import MissingExtra, pyplot
from mmkern.cli import cpu_model

RESULTS_DIR = Path(os.environ.get("MMKERN_BENCH_DIR", "bench_results"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, *, device: torch.device, warmup: int = 2, repeats: int = 10, min_seconds: float = 0.0) -> dict:
    """Runs fn() `warmup` times, then at least `repeats` times (and at least `min_seconds`); returns
    median / p20 / p80 in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    start = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start < min_seconds:
        samples.append(_sample_ms(fn, device))
    return _timing(samples)


def time_alternating(fns: dict, *, device: torch.device, warmup: int = 1, repeats: int = 10) -> dict:
    """{name: timing as time_fn gives it} for each {name: fn}, the functions taking turns sample by sample (after
    `warmup` rounds), so that a change in the machine's speed during the run hits all of them alike: timed one
    after the other, the ViT attention ratio moved by 7% from run to run on these VMs."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_sample_ms(fn, device))
    return {name: _timing(xs) for name, xs in samples.items()}


def _sample_ms(fn, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _timing(samples: list[float]) -> dict:
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else [samples[0]] * 4
    return {"median_ms": statistics.median(samples), "p20_ms": q[0], "p80_ms": q[3], "samples": len(samples)}


def pair_records(
    timing: dict, fields: dict, group: str, *, per_call: int = 1, unit: str = "ms", extra=None
) -> list[dict]:
    """The records of a torch / mmkern comparison, torch's first: `fields`, "impl", the implementation's timing (as
    time_alternating gives it, a sample being `per_call` calls) per call in `unit` ("ms" or "us": median_<unit>,
    p20_<unit>, p80_<unit>, samples), the fields extra(impl, timing per call in ms) returns, "vs_torch" (torch's
    median over the implementation's) and "group"."""
    factor = {"ms": 1.0, "us": 1e3}[unit]
    records = []
    for impl in ("torch", "mmkern"):
        timed = timing[impl].items()
        t = {(k[:-2] + unit if k.endswith("_ms") else k): (v * factor / per_call if k.endswith("_ms") else v)
             for k, v in timed}  # fmt: skip
        more = extra(impl, {k: v / per_call if k.endswith("_ms") else v for k, v in timed}) if extra else {}
        records.append({
            **fields, "impl": impl, **t, **more,
            "vs_torch": timing["torch"]["median_ms"] / timing[impl]["median_ms"], "group": group,
        })  # fmt: skip
    return records


def traffic_and_memory(traffic: float, fns: dict, device: torch.device):
    """pair_records' `extra` for a memory-bound op: "gbps" at `traffic` bytes a call, and "peak_mb", the extra peak
    memory of one call of fns[impl] (see peak_memory)."""
    return lambda impl, t: {
        "gbps": traffic / t["median_ms"] / 1e6,
        "peak_mb": peak_memory(fns[impl], device=device) / 2**20,
    }


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory(fn, *, device: torch.device) -> int:
    """Extra peak memory (bytes) of one call of fn(): CUDA allocator peak on GPUs; on the CPU the rise of
    the process's resident-set high-water mark (reset through /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return -1
    base = _rss_bytes("VmRSS")
    fn()
    return max(_rss_bytes("VmHWM") - base, 0)


# What each mmkern CPU level means for torch too: ATen's own kernels, oneDNN (convolutions) and MKL (matmuls) are
# held to the same instructions, so that a forced level measures both sides as a CPU of that level would run them.
CPU_LEVEL_ENV = {
    "avx512_bf16": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
    },
    "avx512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
    },
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def add_cpu_capability_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu-capability",
        choices=sorted(CPU_LEVEL_ENV),
        default=None,
        help="run mmkern's CPU kernels and torch's at this ISA level (at most the CPU's): the figures a CPU of that "
        "level would give (default: the CPU's best)",
    )


def apply_cpu_capability(level: str | None) -> None:
    """Restarts this process with mmkern and torch held to `level` (torch reads its settings when it loads, so the
    environment must be set before that: the benchmark runs again in a fresh interpreter with the same command
    line). Does nothing when level is None or already applied."""
    if level is None:
        return
    env = {"MMKERN_CPU_CAPABILITY": level, **CPU_LEVEL_ENV[level]}
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    os.environ.update(env)
    sys.stdout.flush()
    os.execv(sys.executable, sys.orig_argv)


def machine() -> dict:
    info = {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_features": _native._C.cpu_features() if _native._C is not None else "",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if _native.CPU_ERROR is None:
        info["mmkern_cpu_capability"] = _native.cpu_level
        info["mmkern_cpu_capabilities"] = _native._C.supported_cpu_capabilities()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def save(name: str, records: list[dict], out_dir: Path | None = None) -> Path:
    """Appends this run (machine info + records) to <out_dir>/<name>.json and returns the path."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append({"machine": machine(), "records": records})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(runs, indent=1))
    os.replace(tmp, path)
    return path


def plot_bars(
    name: str,
    records: list[dict],
    *,
    label_key: str,
    group_key: str,
    value_key: str = "median_ms",
    ylabel: str = "median time (ms)",
    out_dir: Path | None = None,
) -> Path | None:
    """Grouped bar chart: one group per record[group_key], one bar per record[label_key]; None without matplotlib
    (a GPU machine may lack it: the JSON is the result, the plot a convenience)."""
    try:
        plt = pyplot()
    except MissingExtra as e:
        print(f"no plot for {name}: {e}")
        return None

    groups = list(dict.fromkeys(r[group_key] for r in records))
    labels = list(dict.fromkeys(r[label_key] for r in records))
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for li, label in enumerate(labels):
        xs, ys = [], []
        for gi, group in enumerate(groups):
            for r in records:
                if r[group_key] == group and r[label_key] == label:
                    xs.append(gi + li * width)
                    ys.append(r[value_key])
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, rotation=15, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(name: str, records: list[dict], columns: list[str], *, label_key: str, out_dir: Path | None = None) -> None:
    """Prints the records' table (these columns), appends them to <name>.json (see save), plots one bar per
    record[label_key] in each record["group"], and prints where both went."""
    print(format_table(records, columns))
    path = save(name, records, out_dir)
    png = plot_bars(name, records, label_key=label_key, group_key="group", out_dir=out_dir)
    print(f"wrote {path} and {png}")


def format_table(records: list[dict], columns: list[str]) -> str:
    rows = [columns] + [[_fmt(r.get(c, "")) for c in columns] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
