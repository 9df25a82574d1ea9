"""The benchmark harness: the implementations compared in one run take turns sample by sample."""

from __future__ import annotations

import torch

from benchmarks import harness


def test_time_alternating_takes_turns():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("mmkern", "torch")}
    timings = harness.time_alternating(fns, device=torch.device("cpu"), warmup=1, repeats=3)
    assert calls == ["mmkern", "torch"] * 4  # one warm-up round, then three timed rounds
    assert {name: t["samples"] for name, t in timings.items()} == {"mmkern": 3, "torch": 3}
    assert all(0 <= t["p20_ms"] <= t["median_ms"] <= t["p80_ms"] for t in timings.values())


def test_pair_records_per_call_units_and_ratio():
    timing = {
        "mmkern": {"median_ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0, "samples": 5},
        "torch": {"median_ms": 4.0, "p20_ms": 3.0, "p80_ms": 5.0, "samples": 5},
    }
    seen = []

    def extra(impl, t):
        seen.append((impl, t["median_ms"]))
        return {"calls": 4}

    records = harness.pair_records(timing, {"op": "x", "mode": "fwd"}, "x fwd", per_call=4, unit="us", extra=extra)
    assert records == [
        {"op": "x", "mode": "fwd", "impl": "torch", "median_us": 1000.0, "p20_us": 750.0, "p80_us": 1250.0,
         "samples": 5, "calls": 4, "vs_torch": 1.0, "group": "x fwd"},
        {"op": "x", "mode": "fwd", "impl": "mmkern", "median_us": 500.0, "p20_us": 250.0, "p80_us": 750.0,
         "samples": 5, "calls": 4, "vs_torch": 2.0, "group": "x fwd"},
    ]  # fmt: skip
    assert seen == [("torch", 1.0), ("mmkern", 0.5)]  # extra sees the per-call timing in ms
    ms = harness.pair_records(timing, {}, "g")
    assert [r["median_ms"] for r in ms] == [4.0, 2.0] and list(ms[1])[1:5] == [
        "median_ms",
        "p20_ms",
        "p80_ms",
        "samples",
    ]
