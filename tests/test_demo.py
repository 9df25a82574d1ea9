"""The demo end to end at a tiny size (the real run takes minutes and is not a unit test)."""

import json

from mmkern.train.demo import run_demo

KEYS = {
    "zero_shot_top1",
    "retrieval_r1",
    "prompt_handwritten_top1",
    "prompt_learned_top1",
    "prompt_cloze_zero_shot_top1",
    "prompt_cloze_top1",
    "prompt_cloze_whole_top1",
    "transfer_zero_shot_top1",
    "transfer_coop_top1",
    "transfer_cloze_zero_shot_top1",
    "transfer_cloze_top1",
    "transfer_linear_probe_top1",
    "transfer_finetune_top1",
    "instruction_exact_match",
    "throughput_ratio_vs_pytorch",
    "throughput_ratio_every_row",
    "seconds",
}


def test_run_demo_tiny_writes_metrics_plots_and_checkpoints(tmp_path):
    m = run_demo(str(tmp_path), size="tiny", progress=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert KEYS <= set(saved) and saved["size"] == "tiny"
    ratios = {"throughput_ratio_vs_pytorch", "throughput_ratio_every_row"}
    for k in KEYS - ratios - {"seconds"}:
        assert 0.0 <= saved[k] <= 1.0, k
    assert all(saved[k] > 0 for k in ratios) and m["seconds"] > 0
    for key in ("native_resolution_top1", "native_resolution_resized_top1"):  # tiny: two test sizes, one unseen
        assert set(saved[key]) == {"16x32", "12x36"} and all(0.0 <= v <= 1.0 for v in saved[key].values()), key
    assert saved["native_resolution_unseen"] == ["12x36"]
    curve = saved["transfer_curve"]  # tiny: k = 1, 2 and one seed; the 16-shot keys hold the last k
    assert curve["shots"] == [1, 2] and saved["transfer_shots"] == 2 and len(curve["seeds"]) == 1
    assert set(curve["mean"]) == {"zero_shot", "coop", "cloze_zero_shot", "cloze", "linear_probe", "finetune"}
    assert all(len(v) == 2 for v in curve["mean"].values()) and saved["transfer_coop_top1"] == curve["mean"]["coop"][1]
    files = (
        "demo.png",
        "fewshot.png",
        "clip.safetensors",
        "decoder.safetensors",
        "cloze_encoder.safetensors",
        "pretrain/metrics.jsonl",
    )
    for f in files:
        assert (tmp_path / f).stat().st_size > 0, f


def test_demo_main_exits_zero_and_prints_the_summary(tmp_path, capsys):
    from mmkern.train.cli import demo_main

    assert demo_main(["--out", str(tmp_path), "--size", "tiny", "--no-progress"]) == 0
    out = capsys.readouterr().out
    targets = json.loads((tmp_path / "metrics.json").read_text())["targets"]
    assert len(targets) == 8 and "targets met" in out
    for metric in ("zero_shot_top1", "prompt_learned_top1", "instruction_exact_match", "seconds"):
        assert any(line.startswith(metric) and ("PASS" in line or "MISS" in line) for line in out.splitlines())
    assert any(line.startswith("prompt_cloze_top1 ") for line in out.splitlines())
    for metric in ("transfer_coop_top1", "transfer_cloze_top1", "transfer_coop curve", "transfer_cloze curve"):
        assert any(line.startswith(metric) and ("PASS" in line or "MISS" in line) for line in out.splitlines())
    assert "CoOp, learned context" in out  # the few-shot table
