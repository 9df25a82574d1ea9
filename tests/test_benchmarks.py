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
