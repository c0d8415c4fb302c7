"""The ``bestformer train`` / ``bestformer eval`` command line: options, one-line errors, the table, eval."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import bestformer
from bestformer.cli import main
from bestformer.deploy.fold import export_packed
from bestformer.deploy.packfile import read_packed
from bestformer.hardware import cpu_info
from bestformer.neurons import get_backend, set_backend
from bestformer.training import load_checkpoint

SMALL = ["--recipe", "none", "--dataset", "digits", "--limit", "48", "--model-arg", "embed_dim=16",
         "--model-arg", "num_heads=2", "--model-arg", "pool_stages=[false,false,true,true]", "--time-steps", "2",
         "--batch-size", "16", "--neuron-backend", "plain", "--deterministic"]


@pytest.fixture(autouse=True)
def _plain_neurons() -> Iterator[None]:
    before = get_backend()
    yield
    set_backend(before)


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2) -> str:
    """Run the CLI expecting failure; return its single stderr line."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    assert rc == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1
    return err[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch run through the CLI, with a teacher trained first (the demo's shape, much smaller)."""
    out = tmp_path_factory.mktemp("cli") / "runs"
    before = get_backend()
    rc = main(["train", *SMALL, "--epochs", "1", "--teacher", "ann_tiny", "--teacher-epochs", "1",
               "--teacher-arg", "embed_dim=16", "--out", str(out), "--name", "demo"])
    set_backend(before)
    assert rc == 0
    return out / "demo"


def test_train_help_lists_the_common_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--dataset", "--data-dir", "--epochs", "--batch-size", "--lr", "--time-steps", "--seed",
                 "--device", "--out", "--name", "--resume", "--recipe", "--teacher", "--distill", "--neuron-backend",
                 "--ckpt-every-steps", "--skip-nonfinite", "--deterministic", "--model-arg", "--mixup", "--cutmix"):
        assert flag in text, flag
    assert "{none,hard," in text.replace(" ", "")  # distillation choices come from the registry


def test_demo_table_and_run_files(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["teacher"]["model_name"] == "ann_tiny" and summary["model_name"] == "bestformer_tiny"
    for name in ("config.yaml", "run.json", "metrics.csv", "curves.png", "last.safetensors", "last.json",
                 "best.safetensors", "best.json", "resume.safetensors", "teacher/best.safetensors"):
        assert (trained / name).is_file(), name
    model, meta = load_checkpoint(trained / "best.safetensors")
    # independent counts: the +-1 weights the packed file stores, and every parameter of the model
    data, _ = read_packed(export_packed(model, trained.parent / "counted.bst"))
    one_bit = sum(t.size for t in data.tensors.values() if t.dtype == np.int8)
    total = sum(p.numel() for p in model.parameters())
    assert (summary["one_bit_params"], summary["full_precision_params"]) == (one_bit, total - one_bit)
    assert 0 < one_bit < total
    assert meta["dataset"] == "digits" and meta["distill"] == "hard" and meta["recipe"] is None
    run_info = json.loads((trained / "run.json").read_text())
    assert run_info["global_batch"] == 16 and run_info["world_size"] == 1
    assert run_info["cpu"] == cpu_info().describe()  # every run's wall-clock is read beside the CPU it ran on


def test_results_table_lists_teacher_and_student(trained: Path) -> None:
    from bestformer.pipeline import TrainResult, results_table

    summary = json.loads((trained / "summary.json").read_text())
    teacher = TrainResult(trained / "teacher", "finished", "ann_tiny", 1, val={"acc1": 97.5}, test={"acc1": 96.25},
                          params=(0, 1234))
    student = TrainResult(trained, "finished", "bestformer_tiny", 1, val={"acc1": 91.0}, test={"acc1": 90.5},
                          params=(summary["one_bit_params"], summary["full_precision_params"]), teacher=teacher)
    lines = results_table(student).splitlines()
    assert lines[0].split() == ["model", "role", "val", "acc", "test", "acc", "1-bit", "params", "full-precision",
                                "params"]
    assert lines[2].split() == ["ann_tiny", "teacher", "97.50%", "96.25%", "0", "1,234"]
    assert lines[3].split()[:4] == ["bestformer_tiny", "student", "91.00%", "90.50%"]
    assert lines[3].split()[4] == f"{summary['one_bit_params']:,}"


def test_eval_rebuilds_from_the_sidecar_and_reports_top1_top5(trained: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    ckpt = str(trained / "best.safetensors")
    assert main(["eval", ckpt, "--device", "cpu", "--limit", "48"]) == 0
    out = capsys.readouterr().out
    assert "bestformer_tiny on digits test (48 samples): top-1 " in out
    assert f"top-1 {summary['test']['acc1']:.2f}%" in out and f"top-5 {summary['test']['acc5']:.2f}%" in out
    assert main(["eval", ckpt, "--dataset", "digits", "--split", "val", "--limit", "48"]) == 0
    assert f"top-1 {summary['val']['acc1']:.2f}%" in capsys.readouterr().out  # the same carved validation split


@pytest.mark.data
def test_eval_reads_the_data_where_the_run_did(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # a run on mnist from --data-dir: `eval CKPT` without --data-dir looked in the cache folder and failed
    monkeypatch.setenv("BESTFORMER_DATA", str(tmp_path / "data"))  # nothing in the default place
    model = bestformer.create_model("bestformer_tiny", img_size=28, in_channels=1, num_classes=10, embed_dim=16)
    ckpt = bestformer.save_checkpoint(model, tmp_path / "m.safetensors",
                                      config={"dataset": "mnist", "data_dir": str(shared_data / "mnist")})
    assert main(["eval", str(ckpt), "--limit", "16"]) == 0
    assert "bestformer_tiny on mnist test (16 samples)" in capsys.readouterr().out
    gone = bestformer.save_checkpoint(model, tmp_path / "g.safetensors",
                                      config={"dataset": "mnist", "data_dir": str(tmp_path / "gone")})
    assert "pass download=True (--download)" in _error_line(capsys, ["eval", str(gone), "--limit", "16"])
    # the default place first: a recorded folder that exists here but holds something else does not hide it
    (tmp_path / "other").mkdir()
    other = bestformer.save_checkpoint(model, tmp_path / "o.safetensors",
                                       config={"dataset": "mnist", "data_dir": str(tmp_path / "other")})
    monkeypatch.setenv("BESTFORMER_DATA", str(shared_data))
    assert main(["eval", str(other), "--limit", "16"]) == 0


def test_resume_of_a_finished_run_prints_the_table(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(trained)]) == 0
    assert "bestformer_tiny  student" in capsys.readouterr().out


def test_one_line_errors(tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error_line(capsys, ["train", "--epocs", "3"])
    assert "unrecognized arguments: --epocs 3" in line
    line = _error_line(capsys, ["train", "--time-steps", "0", "--out", str(tmp_path)])
    assert line == "bestformer train: error: options: time_steps must be >= 1, got 0"
    line = _error_line(capsys, ["train", "--lr", "fast"])
    assert "--lr expects float, got 'fast'" in line
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 2\nbatch: 32\n")
    line = _error_line(capsys, ["train", "--recipe", str(recipe)])
    assert line.startswith(f"bestformer train: error: recipe {recipe}: unknown key 'batch' (did you mean "
                           "'batch_size'") and line.endswith("see `bestformer train --help` for the options")
    recipe.write_text("epochs: 2\nflip: yes please\n")
    line = _error_line(capsys, ["train", "--recipe", str(recipe)])
    assert line == f"bestformer train: error: recipe {recipe}: key 'flip' must be a number, got 'yes please' (str)"
    line = _error_line(capsys, ["train", "--model", "bestformer_tyni", "--out", str(tmp_path)])
    assert "unknown model 'bestformer_tyni'" in line and "bestformer_tiny" in line
    line = _error_line(capsys, ["train", *SMALL, "--model-arg", "img_size=16", "--out", str(tmp_path)])
    assert "img_size=16 contradicts the dataset digits (img_size=8)" in line
    line = _error_line(capsys, ["train", "--resume", str(trained), "--lr", "0.1"])
    assert "--lr cannot change on --resume" in line
    line = _error_line(capsys, ["train", *SMALL, "--teacher", "no_such_thing", "--out", str(tmp_path)])
    assert "--teacher 'no_such_thing' is neither a checkpoint file nor a model name" in line


def test_eval_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    five = bestformer.create_model("bestformer_tiny", img_size=8, in_channels=1, num_classes=5, embed_dim=16)
    path = bestformer.save_checkpoint(five, tmp_path / "five.safetensors")
    line = _error_line(capsys, ["eval", str(path)])
    assert "does not record its dataset; pass --dataset NAME" in line
    line = _error_line(capsys, ["eval", str(path), "--dataset", "digits"])
    assert line == (f"bestformer eval: error: digits has 10 classes but the checkpoint {path} predicts 5; "
                    "evaluate it on the dataset it was trained on")
    line = _error_line(capsys, ["eval", str(tmp_path / "missing.safetensors"), "--dataset", "digits"])
    assert line == f"bestformer eval: error: checkpoint not found: {tmp_path / 'missing.safetensors'}"


@pytest.mark.data
def test_eval_on_a_dataset_of_another_image_size(trained: Path, shared_data: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    line = _error_line(capsys, ["eval", str(trained / "best.safetensors"), "--dataset", "mnist", "--data-dir",
                                str(shared_data / "mnist"), "--limit", "8"])
    assert line == "bestformer eval: error: input is 28x28, the model expects img_size=8 (8x8)"


def test_ctrl_c_saves_and_prints_how_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from bestformer.training import Trainer

    original = Trainer.end_epoch

    def end_epoch(self: Trainer) -> bool:
        done = original(self)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the first epoch's bookkeeping
        return done

    monkeypatch.setattr(Trainer, "end_epoch", end_epoch)
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(tmp_path), "--name", "x"]) == 130  # 128 + SIGINT
    captured = capsys.readouterr()
    assert "SIGINT received: finishing the current step and writing a checkpoint" in captured.err
    assert f"continue with\n  bestformer train --resume {tmp_path / 'x'}" in captured.out
    _, header = load_checkpoint(tmp_path / "x" / "last.safetensors")
    assert header["epoch"] == 1
