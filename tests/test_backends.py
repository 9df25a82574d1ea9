"""Backend selection, the native bridge and the CLI's info, bench and missing-extra messages."""

import os
import subprocess
import sys

import pytest
import torch

import mmkern
from mmkern import _native, backends, cli
from mmkern.cli import info, main


def test_native_module_imports_without_gpu():
    assert _native._C is not None, _native.IMPORT_ERROR
    assert isinstance(_native._C.cpu_features(), str)
    assert _native._C.cuda_device_count() >= 0


def test_tensor_args_describe_strides_and_dtype():
    t = torch.zeros(4, 6, dtype=torch.float16).t()
    args = _native.tensor_args({"t": t, "absent": None})
    assert args == {"t": (t.data_ptr(), 1, (6, 4), (1, 6), -1), "absent": None}


def test_native_parameters_are_matched_by_name_only():
    x = torch.randn(3, 8)
    out = torch.empty_like(x)
    tensors = {"x": x, "bias": None, "out": out}
    with pytest.raises(TypeError, match="unknown tensor 'bais'"):
        _native.launch("bias_gelu_fwd", x.device, {**tensors, "bais": None}, {"kind": 0})
    with pytest.raises(TypeError, match="missing scalar 'kind'"):
        _native.launch("bias_gelu_fwd", x.device, tensors, {})
    with pytest.raises(TypeError, match="missing tensor 'out'"):
        _native.launch("bias_gelu_fwd", x.device, {"x": x, "bias": None}, {"kind": 0})
    with pytest.raises(TypeError, match="'kind' has the wrong type"):
        _native.launch("bias_gelu_fwd", x.device, tensors, {"kind": "tanh"})
    _native.launch("bias_gelu_fwd", x.device, tensors, {"kind": 0})
    torch.testing.assert_close(out, torch.nn.functional.gelu(x))


def test_malformed_tensor_tuple_is_a_clear_error_before_the_kernel_runs():
    x = torch.randn(3, 8)
    good = _native.tensor_args({"x": x})["x"]
    entry = _native.native().bias_gelu_fwd_cpu
    cases = [
        ((good[0], 0, (3, 8), (8, 1)), r"tensor 'x': expected \(data_ptr, dtype_code, sizes, strides, device_index\)"),
        (("0", 0, (3, 8), (8, 1), -1), "tensor 'x': data_ptr: expected an int, got str"),
        ((good[0], 42, (3, 8), (8, 1), -1), "tensor 'x': dtype_code: unknown code 42"),
        ((good[0], 0, [3, 8], (8, 1), -1), "tensor 'x': sizes, strides: expected tuples"),
        ((good[0], 0, (3, 8.0), (8, 1), -1), "tensor 'x': sizes: expected an int, got float"),
        ((good[0], 0, (3, 8), (8,), -1), "tensor 'x': sizes and strides differ in length"),
        ((good[0], 0, (1,) * 9, (1,) * 9, -1), "tensor 'x': 9 dimensions, more than the 8"),
        ((good[0], 0, (3, 1 << 70), (8, 1), -1), "tensor 'x': sizes: out of the int64 range"),
        ((good[0], 0, (3, 8), (8, 1), None), "tensor 'x': device_index: expected an int, got NoneType"),
        (x, "'x' has the wrong type <class 'torch.Tensor'>"),  # a tensor itself, not its tuple
    ]
    for arg, message in cases:
        with pytest.raises(TypeError, match=f"bias_gelu_fwd_cpu: {message}"):
            entry({"x": arg, "bias": None, "out": good}, {"kind": 0}, 1)
    out = torch.empty_like(x)  # the good tuple still runs
    entry({"x": good, "bias": None, "out": _native.tensor_args({"out": out})["out"]}, {"kind": 0}, 1)
    torch.testing.assert_close(out, torch.nn.functional.gelu(x))


def test_default_backend_on_cpu_is_cpu_where_the_op_measured_faster():
    assert backends.resolve(None, torch.device("cpu")) == "cpu"
    assert backends.resolve(None, torch.device("cpu"), native_faster=lambda: True) == "cpu"
    assert backends.resolve(None, torch.device("cpu"), native_faster=lambda: False) == "torch"
    assert backends.resolve("cpu", torch.device("cpu"), native_faster=lambda: False) == "cpu"  # explicit wins


def test_cuda_default_without_triton_runs_torch_and_says_so(monkeypatch):
    monkeypatch.setattr(backends, "_forced", None)  # the default path, whatever MMKERN_BACKEND was at import
    monkeypatch.setattr(backends, "_triton_import_error", lambda: "triton is not importable (test)")
    with pytest.warns(RuntimeWarning, match=r"PyTorch's own ops instead of the triton kernels \(triton is not"):
        assert backends.resolve(None, torch.device("cuda")) == "torch"


def test_use_backend_context_restores(monkeypatch):
    monkeypatch.setattr(backends, "_forced", None)  # the default path, whatever MMKERN_BACKEND was at import
    with mmkern.use_backend("reference"):
        assert backends.resolve(None, torch.device("cpu")) == "reference"
    assert backends.resolve(None, torch.device("cpu")) == "cpu"


def test_environment_variable_selects_backend():
    """MMKERN_BACKEND is read when mmkern is imported: a fresh interpreter, as a user sets it."""
    resolve = "print(backends.resolve(None, torch.device('cpu')))\n"
    code = "import torch, mmkern\nfrom mmkern import backends, ops\n" + resolve
    code += "with mmkern.use_backend('torch'):\n    " + resolve + resolve
    code += "try:\n    ops.bias_gelu(torch.ones(2, 3))\nexcept ValueError as e:\n    print(e)\n"

    def run(value: str) -> list[str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MMKERN_BACKEND": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
        return out.stdout.splitlines() or out.stderr.splitlines()[-1:]

    assert run("reference") == ["reference", "torch", "reference"]
    # An unknown name: import works, and the first call that needs the choice says what is wrong.
    assert "MMKERN_BACKEND: unknown backend 'nonsense'" in run("nonsense")[-1]


def test_explicit_backend_wins_and_unavailable_is_a_clear_error():
    assert backends.resolve("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend: 'cuda' is not available"):
        backends.resolve("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve("tpu", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend"):
        mmkern.use_backend("tpu")


def test_info_lists_every_backend(capsys):
    text = info()
    for name in backends.BACKENDS:
        assert name in text
    assert main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


def test_missing_train_extra_is_named(monkeypatch, tmp_path):
    """Without a package of the train extra the dataset, and `mmkern demo`, say which extra to install."""
    from mmkern.data import digits

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # what an uninstalled package looks like to import
    with pytest.raises(ImportError, match=r"scikit-learn is not installed.*pip install 'mmkern\[train\]'"):
        digits()
    with pytest.raises(SystemExit, match=r"mmkern demo: scikit-learn is not installed.*mmkern\[train\]"):
        main(["demo", "--size", "tiny", "--no-progress", "--out", str(tmp_path / "demo")])


def test_bench_outside_a_source_checkout_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "BENCHMARKS_DIR", tmp_path / "benchmarks")
    with pytest.raises(SystemExit, match=r"not part of the installed package.*pip install -e"):
        main(["bench", "attention"])
