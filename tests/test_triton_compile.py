"""The compile report's fast subset: every Triton kernel variant the ops launch, compiled for sm_90 with the first
config the launcher would try (head dim 64 for attention), must compile within the target's shared memory,
spill nothing in fp16 / bf16 (dropout: at most DROPOUT_SPILL_LIMIT bytes) and keep cp.async pipelining in
the causal and window variants. The whole report (every config, sm_90 and sm_80) is
`python -m benchmarks.triton_compile`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
if "nvidia" not in getattr(triton.backends, "backends", {}):
    pytest.skip("this triton has no NVIDIA backend to compile for", allow_module_level=True)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """The report's records, from a process of its own: this one imported the kernels for the interpreter."""
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "benchmarks.triton_compile", "--arch", "90", "--first-config", "--head-dims", "64"]
    cmd += ["--jobs", str(os.cpu_count() or 1), "--out", str(out)]
    run = subprocess.run(cmd, check=False, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())["records"]


def test_every_variant_compiles_and_meets_the_targets(records):
    from benchmarks import triton_compile

    assert {r["op"] for r in records} == {"attention", "fused", "contrastive", "patch_embed"}
    assert triton_compile.check(records) == []


def test_attention_uses_tensor_cores_and_pipelined_loads(records):
    from benchmarks import triton_compile

    attention = [r for r in records if r["op"] == "attention"]
    assert len(attention) == 3 * 3 * len(triton_compile.ATTENTION_FEATURES)  # dtypes x kernels x features
    for r in attention:
        assert r["cp_async"] > 0, r
        if not r["variant"].startswith("fp32"):  # fp32 without TF32 multiplies on the FMA units
            assert r["tensor_core_ops"] == "wgmma", r


def test_fp32_d256_dkdv_keeps_a_config_that_fits_sm80():
    """fp32 dK/dV at head dim 256 (IEEE products) had no config within sm_80's shared memory, and the fallback, 16 x 64,
    compiled to 172-176 KB of its 163 KB (triton 3.6 and 3.7.1): it could not launch on an A100. The pruning now keeps
    one of the kernel's own configs there by the estimate (16 x 32, one stage: 100 KB in the compile report)."""
    import triton

    from benchmarks import triton_compile
    from mmkern.kernels.triton import attention

    configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in
               dict.fromkeys(attention.IEEE_CONFIGS["dkdv"] + attention.CONFIGS_WIDE["dkdv"])]  # fmt: skip
    for arch in (80, 90):
        limit = triton_compile.SHARED_LIMIT[arch]
        kept = attention.fitting_configs(configs, 4, {"PREC": "ieee", "BD": 256, "BDV": 256}, limit, "dkdv", arch)
        assert kept, arch
        for c in kept:
            assert attention._key(c) in attention.IEEE_CONFIGS["dkdv"], (arch, attention._key(c))
            bm, bn, _, stages = attention._key(c)
            assert attention.shared_bytes_estimate(bm, bn, stages, 256, 256, 4, True) <= limit
