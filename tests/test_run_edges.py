"""A run's accounting and resume at the edges: a skipped step, a loss scaler's skip, a stop on the last step, a
budget's deadline, a teacher trained inside the run, a resume on a GPU, and the random streams of many GPUs."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bestformer.errors import ConfigError
from bestformer.pipeline import resume, train
from bestformer.pipeline.config import execution_config, run_is_done
from bestformer.training import TrainConfig, Trainer
from bestformer.training import measure as measure_module
from bestformer.training.dist import DistContext
from bestformer.training.state import Progress, capture_rng, load_resume_state, restore_rng
from test_training import TINY, _blobs, _interrupt_at_step, _trainer, tiny_config, weights

pytestmark = pytest.mark.usefixtures("plain_neurons")


def test_a_skipped_step_leaves_no_trace_in_the_epochs_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _blobs()
    data.tensors[0][40] = float("nan")  # the step holding sample 40 is skipped (its gradient is NaN)
    trainer = _trainer(tmp_path, data, epochs=1, skip_nonfinite=2, mixup=0.0, label_smoothing=0.0)
    seen: list[tuple[int, float, int]] = []  # (step, loss, samples) of every forward
    skipped: list[int] = []
    loss, nonfinite = trainer.loss, trainer._nonfinite

    def spy_loss(x: torch.Tensor, target: torch.Tensor, out: object) -> torch.Tensor:
        value = loss(x, target, out)
        seen.append((trainer.progress.global_step, float(value.detach()), int(target.shape[0])))
        return value

    def spy_nonfinite(what: str) -> None:
        skipped.append(trainer.progress.global_step)
        nonfinite(what)

    monkeypatch.setattr(trainer, "loss", spy_loss)
    monkeypatch.setattr(trainer, "_nonfinite", spy_nonfinite)
    assert trainer.fit() == "finished"
    row = trainer.progress.history[0]
    assert row["skipped_steps"] == 1 and len(skipped) == 1
    taken = [(v, n) for step, v, n in seen if step not in skipped and math.isfinite(v)]
    # the mean over the samples of the steps taken; counting the skipped step's samples (the bug) gave 3/4 of it
    expected = sum(v * n for v, n in taken) / sum(n for _, n in taken)
    assert row["train_loss"] == pytest.approx(expected, rel=1e-6)


def test_a_loss_scaler_skip_leaves_the_mean_gradient_norm_unbiased(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _trainer(tmp_path, _blobs(), epochs=1, mixup=0.0, label_smoothing=0.0)
    norms: list[float] = []  # every step's norm; step 1 overflows, as an fp16 loss scaler's would
    clip = torch.nn.utils.clip_grad_norm_

    def overflow_once(params: object, max_norm: float) -> torch.Tensor:
        norm = float(clip(params, max_norm))
        norms.append(math.inf if len(norms) == 1 else norm)
        return torch.tensor(norms[-1])

    class Scaler(torch.amp.GradScaler):  # skips the step of a non-finite gradient, as an enabled one does
        def is_enabled(self) -> bool:
            return True

        def scale(self, loss: torch.Tensor) -> torch.Tensor:
            return loss

        def step(self, optimizer: torch.optim.Optimizer) -> None:
            if math.isfinite(norms[-1]):
                optimizer.step()

        def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
            pass

        def update(self) -> None:
            pass

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflow_once)
    monkeypatch.setattr(trainer, "scaler", Scaler("cpu", enabled=False))
    assert trainer.fit() == "finished"
    row, finite = trainer.progress.history[0], [n for n in norms if math.isfinite(n)]
    assert len(norms) == len(finite) + 1 == 4 and row["skipped_steps"] == 0  # the scaler's skip is not ours
    # the mean over the steps that had a norm; dividing by every step (the bug) gave 3/4 of it
    assert row["grad_norm"] == pytest.approx(sum(finite) / len(finite)) and row["grad_norm_max"] == max(finite)


def test_a_resume_state_saved_before_the_norm_count_keeps_its_mean() -> None:
    saved = {"epoch": 0, "sums": {"grad_norm": 6.0, "steps": 3}}  # mid-epoch sums of an older version
    assert Progress.from_json(saved).sums["grad_norm_steps"] == 3


def test_a_stop_on_the_last_step_resumes_to_the_same_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 64 samples, batch 16: 4 steps per epoch; the 6-step cap ends in the middle of epoch 2
    torch.manual_seed(0)  # the same initial weights in both runs
    straight = _trainer(tmp_path / "a", _blobs(), epochs=3, max_steps=6)
    assert straight.fit() == "finished" and straight.progress.global_step == 6
    with monkeypatch.context() as m:
        _interrupt_at_step(m, 6)  # the signal arrives with the run's last step
        torch.manual_seed(0)
        first = _trainer(tmp_path / "b", _blobs(), epochs=3, max_steps=6)
        assert first.fit() == "interrupted"
    second = _trainer(tmp_path / "b", _blobs(), epochs=3, max_steps=6)
    second.load_state(load_resume_state(tmp_path / "b" / "run" / "resume.safetensors"))
    assert second.fit() == "finished"
    assert (second.progress.global_step, second.progress.samples_seen) == (6, 96)  # not one step more
    a, b = weights(tmp_path / "a" / "run" / "last.safetensors"), weights(tmp_path / "b" / "run" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_its_deadline_stopped_is_done_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    fit = Trainer.fit

    def late_fit(self: Trainer) -> str:  # the machine was slower than the plan: the deadline passes at once
        self.deadline = 0.0
        return fit(self)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "fit", late_fit)
        first = train(tiny_config(tmp_path, epochs=3, max_steps=12))
    assert first.status == "finished" and first.history[-1]["step"] == 1
    assert "the time budget ran out at step 1 of the planned 12" in capsys.readouterr().err
    progress = load_resume_state(first.run_dir / "resume.safetensors").progress
    assert progress["config"]["max_steps"] == 1  # the stop is saved with the run
    summary = (first.run_dir / "summary.json").read_bytes()
    again = resume(first.run_dir)  # was: a crash ("16 samples seen do not fall in epoch 2")
    assert again.status == "finished" and again.history[-1]["step"] == 1
    assert "has already finished" in capsys.readouterr().out
    assert (first.run_dir / "summary.json").read_bytes() == summary  # the final phase did not run again


def test_run_is_done_by_epochs_early_stop_or_step_cap() -> None:
    cfg = TrainConfig(epochs=3)
    assert run_is_done({"finished": True, "epoch": 3}, cfg)
    assert not run_is_done({"finished": True, "epoch": 3}, cfg.replace(epochs=4))  # more epochs asked for
    assert run_is_done({"finished": True, "epoch": 1, "stopped_early": True}, cfg.replace(epochs=4))
    capped = cfg.replace(max_steps=6)
    assert run_is_done({"finished": True, "epoch": 2, "global_step": 6}, capped)
    assert not run_is_done({"finished": True, "epoch": 2, "global_step": 5}, capped)
    assert not run_is_done({"finished": False, "epoch": 3, "global_step": 6}, capped)


def test_a_resume_with_more_epochs_keeps_the_teacher(tmp_path: Path) -> None:
    first = train(tiny_config(tmp_path, epochs=1, teacher="ann_tiny", teacher_args=TINY))
    best = first.run_dir / "teacher" / "best.safetensors"
    digest = hashlib.sha256(best.read_bytes()).hexdigest()
    assert "teacher_epochs: 1" in (first.run_dir / "config.yaml").read_text()  # fixed when the run started
    more = resume(first.run_dir, epochs=2)
    assert more.status == "finished" and more.epochs_done == 2
    assert more.teacher is not None and more.teacher.epochs_done == 1  # was retrained for 2 epochs
    assert hashlib.sha256(best.read_bytes()).hexdigest() == digest


def test_execution_config_on_a_gpu_keeps_a_resumed_runs_global_batch() -> None:
    cfg = TrainConfig(batch_size=128, cuda_batch_size=512, teacher="ann_tiny", epochs=20)
    gpu = DistContext(device=torch.device("cuda"))  # a context only: nothing runs on the device
    new = execution_config(cfg, None, gpu)
    assert (new.batch_size, new.teacher_epochs) == (512, 20)  # the recipe's GPU batch; the teacher's epochs fixed
    saved = execution_config(cfg.replace(teacher="runs/x/teacher/best.safetensors"), None, DistContext())
    assert saved.teacher_epochs is None  # a saved teacher is not trained: no epochs to fix
    assert execution_config(cfg, None, DistContext()).batch_size == 128  # on the CPU
    resumed = execution_config(cfg, {"global_batch": 128, "world_size": 1}, gpu)
    assert resumed.batch_size * resumed.accum_steps == 128 and resumed.teacher_epochs is None
    two = execution_config(cfg.replace(batch_size=512), {"global_batch": 512, "world_size": 1},
                           DistContext(world_size=2, device=torch.device("cuda")))
    assert two.batch_size * two.accum_steps * 2 == 512


def test_budget_measurement_validates_on_the_runs_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _trainer(tmp_path, _blobs(), epochs=1)
    trainer.ctx = DistContext(device=torch.device("cpu"))  # another object than evaluate's default
    calls: list[object] = []
    monkeypatch.setattr(measure_module, "evaluate", lambda *a, **kw: calls.append(kw.get("ctx")))
    measure_module.measure_costs(trainer, steps=1, eval_batches=1)
    assert calls == [trainer.ctx]  # was None: a GPU run's batches went to the CPU


def test_cuda_random_streams_return_to_their_own_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    tensors, meta = capture_rng()
    for i in range(12):  # 12 devices: sorted as text, "rng.cuda.10" comes before "rng.cuda.2"
        tensors[f"rng.cuda.{i}"] = torch.full((4,), i, dtype=torch.uint8)
    restored: dict[int, int] = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 12)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.__setitem__(i, int(s[0])))
    restore_rng(tensors, meta)
    assert restored == {i: i for i in range(12)}


def test_a_run_puts_back_torchs_process_wide_switches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deterministic run on its own thread count switched the caller's whole session to deterministic
    algorithms, cuDNN's deterministic kernels and that thread count, and left it so after train() returned; its
    seeding reset the caller's random generators (a search drew the same value after every run)."""
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.benchmark, cudnn.deterministic,
              torch.get_num_threads())
    threads = 2 if before[3] == 1 else 1
    seen: list[tuple[bool, int]] = []
    original = Trainer.fit

    def fit(self: Trainer, *args: object, **kwargs: object) -> object:
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit)

    def draws() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    rngs = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    want = draws()
    random.setstate(rngs[0])
    np.random.set_state(rngs[1])
    torch.set_rng_state(rngs[2])
    train(tiny_config(tmp_path, epochs=1, deterministic=not before[0], threads=threads))
    assert draws() == want  # the run's seeding left the caller's generators where they were
    assert seen == [(not before[0], threads)]  # the run itself trained as configured
    assert (torch.are_deterministic_algorithms_enabled(), cudnn.benchmark, cudnn.deterministic,
            torch.get_num_threads()) == before


def test_grad_checkpointing_trains_the_same_weights_and_is_resumable(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--grad-checkpointing changes memory, not results: the same run with and without it ends with bit-identical
    weights (deterministic, one thread); it may change on --resume; a model without the method is refused."""
    from bestformer.models import base

    checkpointed: list[bool] = []
    original = base.checkpoint_module
    monkeypatch.setattr(base, "checkpoint_module", lambda *a: checkpointed.append(True) or original(*a))
    runs = []
    for ckpt in (False, True):
        result = train(tiny_config(tmp_path / str(ckpt), epochs=1, grad_checkpointing=ckpt, threads=1))
        runs.append(weights(result.run_dir / "last.safetensors"))
        assert bool(checkpointed) == ckpt  # the option reached the model
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    from bestformer.pipeline.config import RESUMABLE
    from bestformer.training.factories import prepare_model

    assert "grad_checkpointing" in RESUMABLE
    with pytest.raises(ConfigError, match="--grad-checkpointing: Linear has no set_grad_checkpointing"):
        prepare_model(torch.nn.Linear(2, 2), tiny_config(tmp_path, grad_checkpointing=True), DistContext())
