"""`mmkern` command line: info, bench, demo, train."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from pathlib import Path

from mmkern._extras import MissingExtra

# The benchmarks are not part of the installed package (a harness, plots, JSON under bench_results/): they sit
# beside it in a source checkout, which `pip install -e .` runs from.
BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
NO_BENCHMARKS = (
    "mmkern bench: the benchmarks are not part of the installed package; they run from a source checkout. Clone "
    'the mmkern repository, `pip install -e ".[train]"` in it, then `mmkern bench <op>` or, from its root, '
    "`python -m benchmarks.bench_<op>`."
)


def info() -> str:
    """Versions, backends (available or why not), compiled CUDA archs and CPU features."""
    import torch

    import mmkern
    from mmkern import _native, backends

    lines = [f"mmkern {mmkern.__version__}", f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    lines.append(f"torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        lines.append(
            f"GPU {torch.cuda.get_device_name()} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))})"
        )
    else:
        lines.append("GPU none visible to torch")
    if _native._C is not None:
        level = _native.CPU_ERROR or _native.cpu_level
        lines.append(f"CPU kernels: running at {level}; compiled in: {', '.join(_native._C.cpu_capabilities())}")
        lines.append(f"CPU: {cpu_model()}; features: {_native._C.cpu_features() or 'none of note'}")
        archs = _native._C.cuda_archs()
        lines.append(f"CUDA kernels: {'sm_' + ', sm_'.join(archs.split(';')) if archs else 'not compiled'}")
    else:
        lines.append(f"native module: {_native.IMPORT_ERROR}")
    lines.append("backends:")
    for backend, reason in backends.availability().items():
        lines.append(f"  {backend:<9} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_benchmark(op: str):
    if not (BENCHMARKS_DIR / "harness.py").exists():
        raise SystemExit(NO_BENCHMARKS)
    path = BENCHMARKS_DIR / f"bench_{op}.py"
    if not path.exists():
        known = sorted(p.stem[len("bench_") :] for p in BENCHMARKS_DIR.glob("bench_*.py"))
        raise SystemExit(f"mmkern bench: unknown benchmark {op!r}; choose from {', '.join(known)}")
    if str(BENCHMARKS_DIR.parent) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS_DIR.parent))
    spec = importlib.util.spec_from_file_location(f"benchmarks.bench_{op}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends and hardware")
    bench = sub.add_parser(
        "bench", help="run benchmarks/bench_<op>.py of a source checkout (e.g. `mmkern bench patch_embed --quick`)"
    )
    bench.add_argument("op")
    demo = sub.add_parser("demo", help="the end-to-end demo", add_help=False)
    train = sub.add_parser("train", help="training tasks (see `mmkern train --help`)", add_help=False)
    del demo, train
    args, rest = parser.parse_known_args(argv)

    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        print(info())
        return 0
    try:
        if args.command == "bench":
            return _load_benchmark(args.op).main(rest) or 0
        if args.command == "demo":
            from mmkern.train.cli import demo_main

            return demo_main(rest) or 0
        from mmkern.train.cli import train_main

        return train_main(rest) or 0
    except MissingExtra as e:  # a clear line instead of a traceback
        raise SystemExit(f"mmkern {args.command}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
