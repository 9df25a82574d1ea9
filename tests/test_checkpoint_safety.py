"""Loading a checkpoint never runs code from it (issue 20): crafted pickles in every state file are refused
without running, the `latest` marker cannot point outside the run, truncated or corrupted files of each kind
are a clear error naming the file, and an old state file is refused with a conversion that works."""

import json
import os
import pickle
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mmkern.data import WordTokenizer
from mmkern.models import VisionTransformer, ViTConfig, load_checkpoint, save_checkpoint
from mmkern.models.sentence import load_sentence_encoder
from mmkern.train import TrainConfig, Trainer
from mmkern.train import checkpoint as ckpt


class Payload:
    """Unpickling this runs code: it creates `marker`. A safe loader must refuse it before that happens."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def write_payload(path: Path, marker: Path, fmt: str) -> None:
    state = {"step": 2, "optimizer": Payload(marker)}
    if fmt == "torch":
        torch.save(state, path)
    else:  # a bare pickle, the other format torch.load accepts
        with open(path, "wb") as f:
            pickle.dump(state, f, protocol=2)


def loss_fn(model, batch):
    return (model(batch["x"]) - batch["y"]).pow(2).mean()


def collate(rows):
    return {"x": torch.stack([r[0] for r in rows]), "y": torch.stack([r[1] for r in rows])}


DATA = [(torch.randn(4, generator=torch.Generator().manual_seed(i)), torch.tensor([float(i % 3)])) for i in range(16)]


def fit(out_dir, steps=2, resume=False):
    torch.manual_seed(0)
    config = TrainConfig(
        steps=steps, batch_size=4, warmup_steps=1, out_dir=out_dir, resume=resume, progress=False, log_every=1
    )
    trainer = Trainer(nn.Linear(4, 1), config, loss_fn)
    return trainer.fit(DATA, collate), trainer


@pytest.fixture
def run(tmp_path):
    """A run directory holding the checkpoint of a 2-step run; -> its checkpoints folder."""
    fit(str(tmp_path / "run"))
    return tmp_path / "run" / "checkpoints"


def test_the_payload_is_live(tmp_path):
    """Control: unpickled without restrictions, the payload does run, so the tests below can fail."""
    marker = tmp_path / "ran"
    write_payload(tmp_path / "f.pt", marker, "torch")
    torch.load(tmp_path / "f.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
@pytest.mark.parametrize("name", ["trainer_state.pt", "rng_rank0.pt"])
def test_pickle_payload_in_a_state_file_does_not_run(run, tmp_path, name, fmt):
    marker = tmp_path / "ran"
    write_payload(run / "step_00000002" / name, marker, fmt)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}: refused to load .*data only") as e:
        fit(str(run.parent), steps=3, resume=True)  # what `mmkern train ... --resume` does
    assert not marker.exists()
    assert "weights_only=False" not in str(e.value).split("trust it")[0]  # no advice to unpickle blindly


def test_pickle_payload_as_weights_does_not_run(run, tmp_path):
    marker = tmp_path / "ran"
    write_payload(run / "step_00000002" / "model.safetensors", marker, "torch")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        ckpt.load_checkpoint(run / "step_00000002")
    assert not marker.exists()


def test_pickle_payload_in_a_model_checkpoint_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    write_payload(tmp_path / "vit.safetensors", marker, "torch")
    with pytest.raises(ValueError, match=r"vit\.safetensors: not a readable safetensors file"):
        load_checkpoint(tmp_path / "vit.safetensors")
    assert not marker.exists()


def test_pickle_payload_in_a_sentence_folder_does_not_run(tmp_path):
    pytest.importorskip("tokenizers")  # load_sentence_encoder's dependency (the interop extra)
    marker = tmp_path / "ran"
    folder = tmp_path / "st"  # a sentence-transformers folder whose weights are a pickle
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "modules.json").write_text(
        json.dumps([{"path": "", "type": "m.Transformer"}, {"path": "1_Pooling", "type": "m.Pooling"}])
    )
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    write_payload(folder / "pytorch_model.bin", marker, "torch")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: refused to load"):
        load_sentence_encoder(folder)
    assert not marker.exists()
    (folder / "modules.json").write_text('[{"path": ""')  # torn
    with pytest.raises(ValueError, match=r"modules\.json is not valid JSON"):
        load_sentence_encoder(folder)


@pytest.mark.parametrize(
    "content",
    ["../elsewhere/checkpoints/step_00000002", "ELSEWHERE", "step_00000002/../../../elsewhere", "sub/step_00000002"],
)
def test_latest_marker_cannot_leave_the_run_directory(run, tmp_path, content):
    fit(str(tmp_path / "elsewhere"))  # a real checkpoint outside the run that a marker could point to
    content = content.replace("ELSEWHERE", str(tmp_path / "elsewhere" / "checkpoints" / "step_00000002"))
    (run / "latest").write_text(content)
    with pytest.raises(ValueError, match=r"latest: names .* not an existing step folder .* directly inside"):
        fit(str(run.parent), steps=3, resume=True)


@pytest.mark.parametrize("content", ["", "step_0000", "step_00000099", "latest", "\x00\xff"])
def test_latest_marker_torn_or_naming_nothing_is_an_error(run, content):
    (run / "latest").write_text(content, errors="surrogateescape")
    with pytest.raises(ValueError, match=r"latest: names"):
        ckpt.latest_checkpoint(run)


def test_latest_marker_cannot_name_a_symlink_out(run, tmp_path):
    fit(str(tmp_path / "elsewhere"))
    (run / "step_00000007").symlink_to(tmp_path / "elsewhere" / "checkpoints" / "step_00000002")
    (run / "latest").write_text("step_00000007")
    with pytest.raises(ValueError, match=r"latest: names 'step_00000007'"):
        ckpt.latest_checkpoint(run)


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt", "rng_rank0.pt"])
@pytest.mark.parametrize("keep", [0.5, 0.0, 0.999])
def test_truncated_checkpoint_file_is_a_clear_error(run, name, keep):
    path = run / "step_00000002" / name
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: .*(truncated or corrupted|refused to load)"):
        ckpt.load_checkpoint(run / "step_00000002")


def test_truncated_or_corrupted_model_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(
        VisionTransformer(ViTConfig(img_size=8, patch_size=4, width=16, depth=1, heads=2)), tmp_path / "v.safetensors"
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    with pytest.raises(ValueError, match=r"v\.safetensors: not a readable safetensors file, it is truncated"):
        load_checkpoint(path)
    # an intact file whose config metadata is torn
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["__metadata__"]["config"] = header["__metadata__"]["config"][:-5]
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + header_len :])
    with pytest.raises(ValueError, match=r"v\.safetensors: the VisionTransformer config in its metadata is corrupted"):
        load_checkpoint(path)


def test_truncated_tokenizer_and_config_files_are_clear_errors(tmp_path):
    tok = WordTokenizer.from_texts(["a red square"])
    tok.save(tmp_path / "tok.json")
    assert os.listdir(tmp_path) == ["tok.json"]  # written atomically: no temporary file left
    assert WordTokenizer.load(tmp_path / "tok.json").itos == tok.itos
    (tmp_path / "tok.json").write_text((tmp_path / "tok.json").read_text()[:-3])
    with pytest.raises(ValueError, match=r"tok\.json is not a WordTokenizer vocabulary, it is truncated"):
        WordTokenizer.load(tmp_path / "tok.json")

    from mmkern.train.cli import train_main

    (tmp_path / "c.json").write_text('{"steps": 2, "batch_')
    with pytest.raises(SystemExit, match=r"--config: .*c\.json is not valid JSON"):
        train_main(["contrastive", "--config", str(tmp_path / "c.json")])


@dataclass
class _Sub:
    size: int


def test_plain_data_converts_what_it_can_and_refuses_the_rest():
    state = {"p": Path("/runs/x"), "sub": _Sub(3), "lr": np.float64(0.5), "t": (1, [torch.ones(2)]), 4: None}
    out = ckpt.plain_data(state)
    assert out["p"] == "/runs/x" and out["sub"] == {"size": 3} and type(out["lr"]) is float and out[4] is None
    assert isinstance(out["t"], tuple) and torch.equal(out["t"][1][0], torch.ones(2))
    with pytest.raises(ValueError, match=r"state\['cfg'\]\[1\]: a builtins.object is not plain data"):
        ckpt.plain_data({"cfg": [1, object()]})
    with pytest.raises(ValueError, match="numpy.ndarray is not plain data"):
        ckpt.save_state({"a": np.zeros(2)}, "/nonexistent/never_written.pt")  # refused before anything is written


def test_run_with_a_path_out_dir_saves_and_resumes(tmp_path):
    """TrainConfig(out_dir=Path(...)) puts a Path into the saved config; it is stored as a string."""
    fit(tmp_path / "b", steps=2)
    resumed, _ = fit(tmp_path / "b", steps=4, resume=True)
    assert [h["step"] for h in resumed] == [3, 4]
    state = ckpt.load_state(tmp_path / "b" / "checkpoints" / "step_00000004" / "trainer_state.pt")
    assert state["config"]["out_dir"] == str(tmp_path / "b")


def test_old_state_file_is_refused_with_a_conversion_that_works(run, tmp_path):
    """An earlier mmkern pickled the config as given, so a Path in it made trainer_state.pt need full pickle."""
    path = run / "step_00000002" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    state["config"]["out_dir"] = Path(state["config"]["out_dir"])
    torch.save(state, path)  # as the earlier mmkern wrote it
    with pytest.raises(ValueError, match=r"trainer_state\.pt: refused to load \(.*pathlib.*\)") as e:
        ckpt.load_checkpoint(run / "step_00000002")
    message = str(e.value)
    assert "If an earlier mmkern wrote this file and you trust it, convert it once with: python -c" in message
    command = shlex.split(message.split("convert it once with: ")[1])
    assert command[0] == "python" and command[-1] == str(path)
    subprocess.run([sys.executable, *command[1:]], check=True)  # the documented conversion, as a user runs it
    _, converted, _ = ckpt.load_checkpoint(run / "step_00000002")
    assert converted["config"]["out_dir"] == str(state["config"]["out_dir"]) and converted["step"] == 2
    resumed, _ = fit(str(run.parent), steps=3, resume=True)
    assert [h["step"] for h in resumed] == [3]
