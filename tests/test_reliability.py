"""Reliability (issue 9): interrupted runs lose nothing, checkpoints are validated, faults give one clear line."""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import bestformer
from bestformer.cli import main
from bestformer.errors import ConfigError, FileFormatError, InputError
from bestformer.neurons import get_backend, set_backend
from bestformer.pipeline import train
from bestformer.training import TrainConfig, Trainer, load_checkpoint, load_weights, save_checkpoint
from bestformer.training.checkpoint import read_checkpoint
from bestformer.training.container import write_container
from bestformer.training.runs import RunFolder
from bestformer.training.state import load_resume_state

REPO = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 8, "num_heads": 1, "depth": 1, "img_size": 8, "in_channels": 1, "time_steps": 2}
#: a CPU run of a few seconds: width-16 bestformer_tiny on 64 digits, T=2, with an ANN teacher trained first
RUN_ARGS = ["train", "--recipe", "none", "--dataset", "digits", "--limit", "64", "--model", "bestformer_tiny",
            "--model-arg", "embed_dim=16", "--model-arg", "num_heads=2", "--model-arg",
            "pool_stages=[false,false,true,true]", "--time-steps", "2", "--epochs", "3", "--batch-size", "16",
            "--lr", "0.01", "--teacher", "ann_tiny", "--teacher-epochs", "1", "--teacher-arg", "embed_dim=16",
            "--teacher-arg", "pool_stages=[false,false,true,true]", "--ckpt-every-steps", "1", "--deterministic",
            "--neuron-backend", "plain", "--monitor-every", "2", "--name", "run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


# these tests are about training, not kernels: the reference LIF path (conftest's plain_neurons)
pytestmark = pytest.mark.usefixtures("plain_neurons")


def _launch(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bestformer", *RUN_ARGS, "--out", str(out), *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent)


def _resume(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bestformer", "train", "--resume", str(out / "run")], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent)


def _finish(proc: subprocess.Popen, code: int = 0) -> str:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    return stdout


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as fh:
        return [{k: v for k, v in row.items() if k not in ("time_s", "wall_s")} for row in csv.DictReader(fh)]


def _same_run(a: Path, b: Path) -> None:
    """Bit-identical weights (last, best, teacher) and identical metrics (wall time aside)."""
    for rel in ("last.safetensors", "best.safetensors", "teacher/best.safetensors"):
        wa, wb = load_file(a / rel), load_file(b / rel)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), rel
    assert _metrics(a) == _metrics(b) and _metrics(a / "teacher") == _metrics(b / "teacher")
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert sa["test"] == sb["test"] and sa["val"] == sb["val"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run, the yardstick of the interrupted ones (in this process, on one thread like the
    subprocesses: the results must not depend on the process they were computed in)."""
    out = tmp_path_factory.mktemp("reference") / "runs"
    threads, backend = torch.get_num_threads(), get_backend()
    torch.set_num_threads(1)
    try:
        assert main([*RUN_ARGS, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
        set_backend(backend)
    return out / "run"


# --------------------------------------------------------------------------------------- interrupted runs
@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "runs"
    rng = random.Random()
    kills: list[tuple[float, int | None]] = []
    finished = False
    for _ in range(3):
        proc = _resume(out) if (out / "run" / "config.yaml").is_file() else _launch(out)
        while not (out / "run" / "config.yaml").is_file() and proc.poll() is None:
            time.sleep(0.02)  # start-up done: from here on a kill may land anywhere
        delay = rng.uniform(0.0, 2.5)
        time.sleep(delay)
        if proc.poll() is not None:  # the run ended before the kill
            _finish(proc)
            finished = True
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        state = out / "run" / "resume.safetensors"
        kills.append((round(delay, 2), load_resume_state(state).progress["global_step"] if state.is_file() else None))
    assert kills, "every run ended before it could be killed: make the run longer"
    if not finished:
        _finish(_resume(out))
    try:
        _same_run(reference, out / "run")
    except AssertionError as err:
        raise AssertionError(f"kills (delay s, step of the last checkpoint): {kills}: {err}") from None
    assert not list((out / "run").glob(".*.tmp"))  # a kill during a write left one: the resume removed it


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_resumes_exactly(tmp_path: Path, reference: Path) -> None:
    """SIGTERM once the student trains: the run saves, says how to resume and exits 143 = 128 + SIGTERM, so that
    `train && export` stops (SIGINT takes the same path, exit 130; tested in-process in test_cli.py)."""
    out = tmp_path / "runs"
    proc = _launch(out)
    state = out / "run" / "resume.safetensors"
    while not state.is_file() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout = _finish(proc, 143)
    assert f"interrupted by SIGTERM: the checkpoint is saved in {out / 'run'}" in stdout
    assert f"bestformer train --resume {out / 'run'}" in stdout
    progress = load_resume_state(state).progress
    assert not progress["finished"] and progress["global_step"] >= 1
    _finish(_resume(out))
    _same_run(reference, out / "run")


# --------------------------------------------------------------------------------- checkpoint validation
@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    model = bestformer.create_model("bestformer_tiny", **TINY)
    return save_checkpoint(model, tmp_path / "model.safetensors", epoch=3)


def _one_line(err: pytest.ExceptionInfo[BaseException], path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_truncated_checkpoint(ckpt: Path) -> None:
    data = ckpt.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 20, 5, 0):
        ckpt.write_bytes(data[:cut])
        with pytest.raises(FileFormatError) as err:
            load_checkpoint(ckpt)
        assert "truncated or corrupt" in _one_line(err, ckpt)


def test_other_architecture_and_other_num_classes_leave_the_model_untouched(tmp_path: Path) -> None:
    target = bestformer.create_model("bestformer_tiny", **TINY)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    other = save_checkpoint(bestformer.create_model("spikformer_tiny", **TINY), tmp_path / "spik.safetensors")
    with pytest.raises(FileFormatError) as err:
        load_weights(target, other)
    assert "holds 'spikformer_tiny', not 'bestformer_tiny'" in _one_line(err, other)
    five = save_checkpoint(bestformer.create_model("bestformer_tiny", **TINY, num_classes=5),
                           tmp_path / "five.safetensors")
    with pytest.raises(FileFormatError) as err:
        load_weights(target, five)
    assert "head.bias is (5,) in the file, (10,) in the model" in _one_line(err, five)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # never half-loaded


def _rewrite(ckpt: Path, state: dict[str, torch.Tensor], header: dict) -> None:
    """A self-consistent file (tensor hash recomputed) with this state and header, without a sidecar."""
    header = {k: v for k, v in header.items() if k != "tensor_sha256"}
    write_container(ckpt, state, "bestformer", header)
    ckpt.with_suffix(".json").unlink(missing_ok=True)


def test_nan_weights_and_newer_format(ckpt: Path) -> None:
    state = load_file(ckpt)
    state["head.weight"][0, 0] = float("nan")
    header = json.loads(ckpt.with_suffix(".json").read_text())
    _rewrite(ckpt, state, header)
    with pytest.raises(FileFormatError) as err:
        load_checkpoint(ckpt)
    assert "non-finite values (NaN/inf) in 'head.weight'" in _one_line(err, ckpt)
    state["head.weight"][0, 0] = 0.0
    header["format_version"] = 99
    _rewrite(ckpt, state, header)  # the embedded header is read when the sidecar is gone
    with pytest.raises(FileFormatError) as err:
        load_checkpoint(ckpt)
    assert "written by a newer bestformer (checkpoint format 99" in _one_line(err, ckpt)


def test_unwritable_run_folder_fails_at_start_up(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = TrainConfig(dataset="digits", out=str(blocker / "runs"), name="x")
    t0 = time.perf_counter()
    with pytest.raises(FileFormatError, match=r"cannot write to .*file/runs/x: Not a directory"):
        train(cfg)
    assert time.perf_counter() - t0 < 30  # before any data is read or any training


def test_full_disk_mid_run_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(32, 1, 8, 8)
    y = torch.arange(32) % 10
    data = torch.utils.data.TensorDataset(x, y)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.01, deterministic=True, monitor_every=0)
    model = bestformer.create_model("bestformer_tiny", **TINY)
    trainer = Trainer(model, cfg, data, data, num_classes=10, run=RunFolder(tmp_path / "run"))
    original = Trainer.end_epoch
    full = {"on": False}

    def end_epoch(self: Trainer) -> bool:
        done = original(self)
        full["on"] = True  # the disk fills up after the first epoch's checkpoint
        return done

    real_write = Path.write_bytes

    def write_bytes(self: Path, data: bytes) -> int:
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Trainer, "end_epoch", end_epoch)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(FileFormatError, match="No space left on device; the previous file .* is intact"):
        trainer.fit()
    monkeypatch.undo()
    last, header = read_checkpoint(tmp_path / "run" / "last.safetensors")
    state = load_resume_state(tmp_path / "run" / "resume.safetensors")
    assert header["meta"]["epoch"] == 1 and state.progress["epoch"] == 1  # the epoch-1 checkpoint is whole
    assert all(torch.equal(last[k], state.model[k]) for k in last)
    assert not list((tmp_path / "run").glob(".*.tmp"))  # failed writes leave no temporary files


def test_a_crash_between_the_weights_and_the_sidecar_leaves_a_loadable_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    old, new = (bestformer.create_model("bestformer_tiny", **TINY) for _ in range(2))
    path = save_checkpoint(old, tmp_path / "best.safetensors", epoch=1)

    def crash(*args: object, **kw: object) -> None:
        raise KeyboardInterrupt  # the process dies once the weights are written, before their sidecar

    monkeypatch.setattr("bestformer.training.checkpoint.atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(new, path, epoch=2)
    monkeypatch.undo()
    loaded, meta = load_checkpoint(path)  # the new weights, described by their embedded header
    assert meta["epoch"] == 2
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), new.state_dict().values()))


def test_empty_training_split_is_refused(tmp_path: Path) -> None:
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    model = bestformer.create_model("bestformer_tiny", **TINY)
    with pytest.raises(InputError, match="empty"):
        Trainer(model, TrainConfig(), empty, None, num_classes=10, run=RunFolder(tmp_path))


# ------------------------------------------------------------------------------------------------- fuzzing
_LONG_RUN = int(os.environ.get("BESTFORMER_FUZZ_EXAMPLES", "0"))  # `make fuzz`: a longer, randomized run
FUZZ = settings(max_examples=_LONG_RUN or 100, deadline=None, derandomize=not _LONG_RUN, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load_or_format_error(path: Path) -> None:
    try:
        model, meta = load_checkpoint(path)
    except FileFormatError as err:
        assert "\n" not in str(err)
        return
    assert isinstance(model, torch.nn.Module) and isinstance(meta, dict)


@FUZZ
@given(data=st.binary(max_size=600))
def test_fuzz_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    _load_or_format_error(path)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_fuzz_mutated_weights_file(ckpt: Path, edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(ckpt.read_bytes())
    for pos, byte in edits:
        data[pos % len(data)] = byte
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    mutated = ckpt.with_name("mutated.safetensors")
    mutated.write_bytes(bytes(data))
    _load_or_format_error(mutated)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(list(b'0123456789{}[]",:-.aeE \x00\xff'))),
                      min_size=1, max_size=6))
def test_fuzz_mutated_sidecar(ckpt: Path, edits: list[tuple[int, int]]) -> None:
    side = ckpt.with_suffix(".json")
    original = side.read_bytes()
    data = bytearray(original)
    for pos, byte in edits:
        data[pos % len(data)] = byte
    side.write_bytes(bytes(data))
    try:
        _load_or_format_error(ckpt)
    finally:
        side.write_bytes(original)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_mutated_resume_state(tmp_path: Path, edits: list[tuple[int, int]]) -> None:
    from bestformer.training.state import save_resume_state

    path = tmp_path / "resume.safetensors"
    if not path.is_file():
        model = bestformer.create_model("bestformer_tiny", **TINY)
        opt = torch.optim.AdamW(model.parameters())
        save_resume_state(path, model, opt, None, {"epoch": 1, "history": [{"val_acc": 50.0}]})
    data = bytearray(path.read_bytes())
    for pos, byte in edits:
        data[pos % len(data)] = byte
    mutated = tmp_path / "mutated.safetensors"
    mutated.write_bytes(bytes(data))
    try:
        state = load_resume_state(mutated)
    except FileFormatError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(state.progress, dict)


@pytest.mark.parametrize("wall", ["12", -1.0, True, float("inf"), None])
def test_resume_state_wall_clock_is_checked(tmp_path: Path, wall: object) -> None:
    """The wall-clock seconds a resumed run goes on from: a number >= 0, or absent (files before 0.2.0)."""
    from bestformer.training.state import save_resume_state

    model = bestformer.create_model("bestformer_tiny", **TINY)
    opt = torch.optim.AdamW(model.parameters())
    path = save_resume_state(tmp_path / "r.safetensors", model, opt, None, {"epoch": 1, "wall_s": wall})
    with pytest.raises(FileFormatError, match=rf"is incomplete or corrupt \(progress wall_s is {wall!r}, expected a "
                                              r"number of seconds >= 0\)"):
        load_resume_state(path)
    for ok in ({"wall_s": 12.5}, {"wall_s": 3}, {}):
        save_resume_state(path, model, opt, None, {"epoch": 1, **ok})
        assert load_resume_state(path).progress.get("wall_s", 0.0) == ok.get("wall_s", 0.0)


def test_resume_state_of_another_model_or_other_data_is_refused(tmp_path: Path) -> None:
    from bestformer.training.state import save_resume_state

    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.arange(32) % 10)
    small = bestformer.create_model("bestformer_tiny", **TINY)
    path = save_resume_state(tmp_path / "resume.safetensors", small, torch.optim.AdamW(small.parameters()), None,
                             {"epoch": 1, "train_size": 32})
    wide = bestformer.create_model("bestformer_tiny", **{**TINY, "embed_dim": 16})
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    trainer = Trainer(wide, TrainConfig(), data, None, num_classes=10, run=RunFolder(tmp_path / "run"))
    with pytest.raises(FileFormatError, match=r"resume state .*resume\.safetensors does not fit this model: "
                                               r"\S+ is \(8"):
        trainer.load_state(load_resume_state(path))
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())
    other_data = Trainer(bestformer.create_model("bestformer_tiny", **TINY), TrainConfig(),
                         torch.utils.data.Subset(data, range(16)), None, num_classes=10, run=RunFolder(tmp_path))
    with pytest.raises(ConfigError, match="trained on 32 training samples, the training split now has 16"):
        other_data.load_state(load_resume_state(path))


# ------------------------------------------------------------------------------------------ run folders
def test_a_default_name_made_of_a_hostile_model_name_writes_nothing(tmp_path: Path) -> None:
    """The default run name is ``<time>-<model>-<dataset>``: checked before the folder or its lock is created."""
    cfg = TrainConfig(model="../../escaped/x", dataset="digits", out=str(tmp_path / "out"), limit=48, epochs=1)
    with pytest.raises(ConfigError, match="name must be one folder name inside --out"):
        train(cfg)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_teacher_folder_in_use_is_not_trained_twice(tmp_path: Path) -> None:
    """A run trains its teacher under the teacher folder's own lock: a second process resuming (or training) that
    folder is refused, and so is the run while another process holds it."""
    cfg = TrainConfig(model="bestformer_tiny", dataset="digits", teacher="ann_tiny", out=str(tmp_path), name="t",
                      limit=48, epochs=1, model_args={"embed_dim": 16, "num_heads": 2},
                      teacher_args={"embed_dim": 16, "num_heads": 2}, neuron_backend="plain")
    with RunFolder(tmp_path / "t" / "teacher").lock(), pytest.raises(ConfigError, match=r"t/teacher is in use"):
        train(cfg)


def test_history_files_of_unfinished_epochs_go_with_them(tmp_path: Path) -> None:
    """A resume that rewrites an empty history removes the firing rates and curves a crashed epoch left."""
    folder = RunFolder(tmp_path)
    row = {"epoch": 1, "train_loss": 1.0, "train_acc": 50.0, "val_loss": 1.0, "val_acc": 50.0}
    folder.write_history([row], [{"epoch": 1, "blocks.0": 0.2}])
    assert folder.firing_path.is_file() and folder.plot_path.is_file()
    folder.write_history([], [])
    assert not folder.firing_path.exists() and not folder.plot_path.exists()
    assert folder.metrics_path.read_text() == ""


def test_a_run_removes_the_temporaries_a_killed_run_left(tmp_path: Path) -> None:
    """A SIGKILL during an atomic write leaves its ``.NAME.XXXXXXXX.tmp`` (a resume state's: the model's size).
    Whoever next holds the folder's lock removes those of the run's own files, and only those: another program's
    temporary in the folder (an export being written) stays."""
    import tempfile

    from bestformer.fileio import atomic_path

    folder = RunFolder(tmp_path)
    dead = []
    for name in ("resume.safetensors", "best.json", "config.yaml", "curves.png", "profile.json"):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=tmp_path)  # as atomic_path names them
        os.close(fd)
        dead.append(Path(tmp))
    with atomic_path(tmp_path / "model.bfpk") as theirs:  # another program, writing while the run starts
        theirs.write_bytes(b"x")
        alive = [theirs, tmp_path / ".notes.tmp", tmp_path / ".resume.safetensors.tmp", tmp_path / "resume.tmp",
                 tmp_path / ".best.json.abcdefgh.tmp"]  # a folder of that name (not a write of ours) stays too
        for path in alive[1:-1]:
            path.write_bytes(b"y")
        alive[-1].mkdir()
        with folder.lock():
            assert not any(p.exists() for p in dead) and all(p.exists() for p in alive)
    assert (tmp_path / "model.bfpk").read_bytes() == b"x"


def test_the_curves_leave_the_callers_matplotlib_backend_alone(tmp_path: Path) -> None:
    import matplotlib

    from bestformer.training.runs import plot_curves

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        row = {"epoch": 1, "train_loss": 1.0, "train_acc": 50.0, "val_loss": 1.0, "val_acc": 50.0}
        plot_curves([row], tmp_path / "c.png")
        assert matplotlib.get_backend() == "svg" and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        matplotlib.use(before)
