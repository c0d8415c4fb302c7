"""Training engine: schedule, batch augmentation, recipes, the loop, distillation wiring, exact resume."""

from __future__ import annotations

import csv
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import bestformer
from bestformer.data.transforms import BatchAugment, random_crop
from bestformer.errors import ConfigError, InputError
from bestformer.neurons import LIF
from bestformer.pipeline import resume, train
from bestformer.training import (
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    list_recipes,
    load_recipe,
    resolve_config,
)
from bestformer.training.checkpoint import read_checkpoint
from bestformer.training.distill import HardDistillation
from bestformer.training.engine import StopSignals, evaluate
from bestformer.training.factories import build_schedule
from bestformer.training.monitor import FiringRateMonitor, layer_health
from bestformer.training.runs import RunFolder
from bestformer.training.schedule import CosineSchedule
from bestformer.training.state import load_resume_state

TINY = {"embed_dim": 16, "num_heads": 2, "depth": 1, "pool_stages": [False, False, True, True]}


# these tests are about training, not kernels: the reference LIF path (conftest's plain_neurons)
pytestmark = pytest.mark.usefixtures("plain_neurons")


def tiny_config(tmp_path: Path, **kw: object) -> TrainConfig:
    """bestformer_tiny at width 16 on 96 digits (2x2 tokens, T=2): about a second per epoch."""
    base = dict(model="bestformer_tiny", dataset="digits", model_args=TINY, time_steps=2, epochs=3, batch_size=16,
                limit=96, lr=0.01, warmup_epochs=1, deterministic=True, out=str(tmp_path / "runs"), name="run",
                monitor_every=2, neuron_backend="plain")
    return TrainConfig(**{**base, **kw})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


def metrics_without_time(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return [{k: v for k, v in row.items() if k not in ("time_s", "wall_s")} for row in csv.DictReader(fh)]


# ---------------------------------------------------------------------------------------------- schedule
def test_schedule_warmup_cosine_cooldown_by_hand() -> None:
    s = CosineSchedule(lr=1.0, min_lr=0.1, warmup_lr=0.0, warmup_epochs=2, epochs=6, cooldown_epochs=2,
                       steps_per_epoch=10)
    assert s(0) == 0.0 and s(10) == pytest.approx(0.5)  # linear warm-up: half way after one of two epochs
    assert s(20) == pytest.approx(1.0)  # peak at the end of the warm-up
    assert s(40) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine half way from epoch 2 to epoch 6
    assert s(30) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s(60) == s(79) == 0.1  # cool-down at min_lr
    assert s.total_epochs == 8
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5.0)
    assert s.apply(opt, 10) == pytest.approx(0.5) and opt.param_groups[0]["lr"] == pytest.approx(0.5)
    # a fractional warm-up (the MNIST recipe's 0.1 epoch): peak after 2 of 20 steps, then the cosine
    f = CosineSchedule(lr=1.0, min_lr=0.0, warmup_lr=0.0, warmup_epochs=0.1, epochs=1, cooldown_epochs=0,
                       steps_per_epoch=20)
    assert f(1) == pytest.approx(0.5) and f(2) == pytest.approx(1.0)
    assert f(11) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_schedule_without_warmup_prefix_is_timms_default() -> None:
    """timm's CosineLRScheduler(t_initial=6, warmup_t=2, warmup_prefix=False), the reference recipes': the same
    warm-up, then ``min + (lr - min) (1 + cos(pi e / 6)) / 2`` from the run's start, so the rate steps down from
    ``lr`` to 0.1 + 0.9 * 0.75 where the warm-up ends."""
    s = CosineSchedule(lr=1.0, min_lr=0.1, warmup_lr=0.0, warmup_epochs=2, epochs=6, cooldown_epochs=2,
                       steps_per_epoch=10, warmup_prefix=False)
    assert s(10) == pytest.approx(0.5) and s(19) == pytest.approx(0.95)
    assert s(20) == pytest.approx(0.1 + 0.9 * 0.75)  # cos(pi / 3) = 1/2
    assert s(30) == pytest.approx(0.1 + 0.9 * 0.5) and s(45) == pytest.approx(0.1 + 0.9 * 0.5 * (1 - 0.5 ** 0.5))
    assert s(60) == s(79) == 0.1
    cfg, _ = resolve_config("cifar10", {})
    assert not cfg.warmup_prefix and build_schedule(cfg, 512, 98, None)[0].warmup_prefix is False
    assert resolve_config("digits", {})[0].warmup_prefix  # ours: the cosine after the warm-up, as measured


# ------------------------------------------------------------------------------------------ augmentation
def test_random_crop_equals_padded_slices() -> None:
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    offsets = torch.tensor([[0, 4], [3, 1]])
    out = random_crop(x, 2, offsets)
    padded = F.pad(x, (2, 2, 2, 2))
    for b, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[b], padded[b, :, dy:dy + 5, dx:dx + 6])


def test_augmentation_is_a_function_of_the_step_and_shared_over_frames() -> None:
    aug = BatchAugment(num_classes=4, crop_padding=2, flip=0.5, random_erasing=0.5, seed=3)
    x = torch.randn(8, 2, 6, 6)
    y = torch.arange(8) % 4
    a1, t1 = aug(x, y, step=5)
    a2, _ = aug(x, y, step=5)
    a3, _ = aug(x, y, step=6)
    assert torch.equal(a1, a2) and not torch.equal(a1, a3) and torch.equal(t1, y)
    # events [T, B, C, H, W]: every frame of a sample gets the same crop / flip / erased box
    frames = x.unsqueeze(0).repeat(3, 1, 1, 1, 1)
    ev, _ = aug(frames, y, step=5)
    assert torch.equal(ev[0], ev[1]) and torch.equal(ev[1], ev[2])
    # the erasing noise is one float32 draw on the CPU, whatever the batch's dtype or device (a generator on the
    # batch's device draws another stream on CUDA, as float64 does here)
    a64, _ = aug(x.double(), y, step=5)
    assert torch.equal(a64, a1.double())


def test_mixup_and_cutmix_targets_match_the_mixed_images() -> None:
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    mix = BatchAugment(num_classes=3, mixup=0.4, seed=1)
    xm, t = mix(x, y, step=0)
    lam = float(t[0, 0])  # sample 0 (class 0) is mixed with sample 5 (class 2)
    assert t.sum(dim=1).allclose(torch.ones(6)) and t[0, 2] == pytest.approx(1 - lam)
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    cut = BatchAugment(num_classes=3, cutmix=1.0, seed=2)
    xc, tc = cut(x, y, step=0)
    from_other = (xc != x).float().mean().item()  # fraction of pixels replaced by the reversed batch
    assert tc[0, 2].item() == pytest.approx(from_other, abs=1e-6)
    assert not cut(x, y, step=0, mix=False)[1].is_floating_point()  # mixing switched off: hard labels


# ----------------------------------------------------------------------------------------------- recipes
def test_recipes_mirror_the_reference_setups() -> None:
    assert {"digits", "cifar10", "cifar100", "imagenet", "cifar10dvs"} <= set(list_recipes())
    c10 = load_recipe("cifar10")
    assert (c10["epochs"], c10["cooldown_epochs"], c10["warmup_epochs"]) == (400, 10, 20)
    assert (c10["weight_decay"], c10["mixup"], c10["mixup_off_epoch"], c10["random_erasing"]) == (0.06, 0.5, 200, 0.25)
    assert c10["batch_size"] * c10["accum_steps"] == 512 and c10["label_smoothing"] == 0.1 and c10["seed"] == 42
    assert load_recipe("cifar100")["dataset"] == "cifar100"
    inet = load_recipe("imagenet")
    assert (inet["epochs"], inet["weight_decay"], inet["batch_size"], inet["mixup"], inet["cutmix"]) == (
        300, 0.05, 96, 0.8, 1.0)
    dvs = load_recipe("cifar10dvs")
    assert (dvs["time_steps"], dvs["lr"], dvs["weight_decay"], dvs["batch_size"], dvs["epochs"]) == (
        16, 0.001, 0.06, 16, 106)
    for name in list_recipes():  # every shipped recipe names a registered model
        assert bestformer.models.is_model(load_recipe(name)["model"])


def test_recipe_errors_name_the_key_and_the_expected_type(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'learning_rate'"):
        load_recipe(str(bad))
    bad.write_text("epochs: three\n")
    with pytest.raises(ConfigError, match="key 'epochs' must be an integer, got 'three'"):
        load_recipe(str(bad))
    bad.write_text("mixup: [1, 2]\n")
    with pytest.raises(ConfigError, match="key 'mixup' must be a number"):
        load_recipe(str(bad))
    bad.write_text("lr: 1e-3\nepochs: 2\n")  # YAML 1.1 reads 1e-3 as text; accepted as the number
    assert load_recipe(str(bad))["lr"] == "1e-3" and resolve_config(str(bad), {})[0].lr == 0.001
    with pytest.raises(ConfigError, match="unknown recipe 'cifar1'.*did you mean"):
        load_recipe("cifar1")


def test_precedence_defaults_recipe_command_line() -> None:
    cfg, recipe = resolve_config(None, {})  # no recipe, dataset digits: the demo recipe
    assert recipe == "digits" and cfg.teacher == load_recipe("digits")["teacher"]
    cfg, _ = resolve_config("cifar10", {"epochs": 3, "model_args": {"depth": 2}})
    assert (cfg.epochs, cfg.weight_decay, cfg.model_args) == (3, 0.06, {"depth": 2})
    cfg, recipe = resolve_config("none", {"dataset": "digits"})
    assert recipe is None and cfg.teacher is None and cfg.epochs == TrainConfig().epochs
    with pytest.raises(ConfigError, match="time_steps must be >= 1"):
        resolve_config(None, {"time_steps": 0})


# ------------------------------------------------------------------------------------------------ health
def test_firing_rate_monitor_counts_spikes_and_flags_dead_and_saturated_layers() -> None:
    net = torch.nn.ModuleDict({"quiet": LIF(), "busy": LIF(), "some": LIF()})
    mon = FiringRateMonitor(net)
    x = torch.rand(4, 3, 5) * 2.5  # T=4
    with mon.sampling():
        net["quiet"](torch.zeros(4, 3, 5))
        net["busy"](torch.full((4, 3, 5), 10.0))
        s = net["some"](x)
    net["some"](torch.full((4, 3, 5), 10.0))  # outside sampling: not counted
    rates = mon.rates()
    assert rates["quiet"] == 0.0 and rates["busy"] == 1.0
    assert rates["some"] == pytest.approx(float(s.mean()))  # binary spikes: the rate is their mean
    assert layer_health(mon.counts()) == (["quiet"], ["busy"])
    assert mon.num_layers == 3
    # a layer nothing was counted in (a rank whose sampled micro-batch was a filler) is listed with (0, 0): the
    # ranks reduce the same keys; it has no rate and is neither dead nor saturated
    mon.reset()
    with mon.sampling():
        net["busy"](torch.full((4, 3, 5), 10.0))
    assert mon.counts() == {"quiet": (0, 0), "busy": (60, 60), "some": (0, 0)} and mon.rates() == {"busy": 1.0}
    assert layer_health(mon.counts()) == ([], ["busy"])
    relu_model = bestformer.create_model("ann_tiny", **TINY, img_size=8, in_channels=1)
    assert FiringRateMonitor(relu_model).num_layers == 0  # ReLU is not a spiking neuron


def test_a_trained_model_keeps_no_monitor_hooks(tmp_path: Path) -> None:
    """The firing-rate hooks sit on the neurons only while a step is sampled: every Trainer left a set behind
    (a model wrapped three times ran three sets), and torch.save(model) failed on the local hook function."""
    model = bestformer.create_model("bestformer_tiny", **TINY, img_size=8, in_channels=1, num_classes=2,
                                    time_steps=2)
    for i in range(2):
        cfg = tiny_config(tmp_path, epochs=1, monitor_every=1, name=f"run{i}")
        trainer = Trainer(model, cfg, _blobs(32), _blobs(16, seed=1), num_classes=2, run=RunFolder(tmp_path / f"r{i}"))
        assert trainer.fit() == "finished"
        assert trainer.progress.history[-1]["firing_rate"] > 0  # it did sample
        assert not any(m._forward_hooks for m in model.modules())
    torch.save(model, tmp_path / "model.pt")


# ---------------------------------------------------------------------------------------------- the loop
def _blobs(n: int = 64, seed: int = 0) -> TensorDataset:
    """Two classes of 8x8 images: a bright top half or a bright bottom half (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    x[y == 0, :, :4] += 1.5
    x[y == 1, :, 4:] += 1.5
    return TensorDataset(x, y)


def _trainer(tmp_path: Path, data: TensorDataset, **kw: object) -> Trainer:
    cfg = tiny_config(tmp_path, **kw)
    model = bestformer.create_model("bestformer_tiny", **TINY, img_size=8, in_channels=1, num_classes=2,
                                    time_steps=2)
    return Trainer(model, cfg, data, _blobs(32, seed=1), num_classes=2, run=RunFolder(tmp_path / "run"))


def test_trainer_learns_and_writes_the_run_files(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, _blobs(128), epochs=4, lr=0.02)
    assert trainer.fit() == "finished"
    hist = trainer.progress.history
    assert len(hist) == 4 and hist[-1]["val_acc"] >= 90.0 and hist[-1]["train_loss"] < hist[0]["train_loss"]
    run = tmp_path / "run"
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    for col in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "time_s", "grad_norm", "firing_rate"):
        assert math.isfinite(float(rows[-1][col])), col
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG" and (run / "firing_rates.csv").is_file()
    _, header = read_checkpoint(run / "best.safetensors")
    assert header["meta"]["epoch"] == trainer.progress.best_epoch
    assert header["model_name"] == "bestformer_tiny" and (run / "best.json").is_file()
    state = load_resume_state(run / "resume.safetensors")
    assert state.progress["finished"] and state.progress["global_step"] == 4 * 8  # 128 samples / 16 per step
    # the final weights equal the "last" checkpoint; evaluation of a fresh copy reproduces the last val_acc
    last = weights(run / "last.safetensors")
    assert all(torch.equal(last[k], v) for k, v in trainer.module.state_dict().items())
    res = evaluate(trainer.module, _blobs(32, seed=1), num_classes=2)
    assert res["acc1"] == pytest.approx(hist[-1]["val_acc"]) and res["count"] == 32


def test_nonfinite_loss_stops_with_step_and_checkpoint_or_is_skipped(tmp_path: Path) -> None:
    data = _blobs()
    data.tensors[0][40] = float("nan")  # one corrupt sample: the step holding it has a NaN loss
    trainer = _trainer(tmp_path / "a", data, epochs=2)
    # the NaN pixel stops at the first LIF (NaN >= V_th is False) but poisons the BatchNorm gradient
    with pytest.raises(NonFiniteLossError, match=r"non-finite (loss|gradient norm \(nan\)) at step \d+ \(epoch "
                                                 r"[12]\); (the last good checkpoint is .*resume\.safetensors|no "
                                                 r"checkpoint was written yet); lower --lr"):
        trainer.fit()
    skipping = _trainer(tmp_path / "b", data, epochs=2, skip_nonfinite=2)
    assert skipping.fit() == "finished"
    hist = skipping.progress.history
    assert [h["skipped_steps"] for h in hist] == [1, 1] and all(math.isfinite(h["train_loss"]) for h in hist)
    state = skipping.module.state_dict()  # weights and BatchNorm statistics untouched by the skipped steps
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert math.isfinite(evaluate(skipping.module, _blobs(32, seed=1), num_classes=2)["loss"])


def test_labels_out_of_range_are_refused(tmp_path: Path) -> None:
    x, y = _blobs().tensors
    trainer = _trainer(tmp_path, TensorDataset(x, y * 3))  # labels 0 and 3 for a 2-class model
    with pytest.raises(InputError, match="training split: label 3 is out of range for 2 classes"):
        trainer.fit()


def test_losses_without_and_with_a_teacher(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, _blobs(), label_smoothing=0.0)
    a, b = torch.randn(4, 2), torch.randn(4, 2)
    y = torch.tensor([0, 1, 1, 0])
    # two heads and no teacher: both heads learn the labels
    expected = (F.cross_entropy(a, y) + F.cross_entropy(b, y)) / 2
    assert torch.allclose(trainer.loss(torch.zeros(4, 1, 8, 8), y, (a, b)), expected)
    teacher = bestformer.create_model("ann_tiny", **TINY, img_size=8, in_channels=1, num_classes=2)
    trainer.distiller = HardDistillation(teacher)
    x = torch.randn(4, 1, 8, 8)
    y_t = teacher.eval()(x).argmax(dim=-1)
    eq15 = (F.cross_entropy(a, y) + F.cross_entropy(b, y_t)) / 2  # Eq. 15
    assert torch.allclose(trainer.loss(x, y, (a, b)), eq15)


# ----------------------------------------------------------------------------------------- runs, resume
def _interrupt_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Send ourselves SIGINT right after optimizer step ``step`` (the real handler then stops the run)."""
    original = Trainer._stop_requested

    def stop_requested(self: Trainer, stop: StopSignals) -> bool:
        if self.progress.global_step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, stop)

    monkeypatch.setattr(Trainer, "_stop_requested", stop_requested)


def test_two_plus_one_epochs_with_resume_equal_three_straight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    aug = dict(mixup=0.5, crop_padding=1, flip=0.5, rand_augment="m9-n1-mstd0.5")  # every augmentation at once
    straight = train(tiny_config(tmp_path / "a", **aug))
    assert straight.status == "finished" and straight.epochs_done == 3
    steps = len(straight.history) and straight.history[0]["step"]  # optimizer steps per epoch
    with monkeypatch.context() as m:
        _interrupt_at_step(m, 2 * steps)  # the last step of epoch 2, before its validation and checkpoint
        first = train(tiny_config(tmp_path / "b", **aug))
    assert first.status == "interrupted" and first.epochs_done == 1
    assert "SIGINT received" in capsys.readouterr().err
    progress = load_resume_state(first.run_dir / "resume.safetensors").progress
    assert (progress["epoch"], progress["global_step"], len(progress["history"])) == (1, 2 * steps, 1)
    second = resume(first.run_dir)
    assert second.status == "finished" and second.epochs_done == 3
    for kind in ("last", "best"):
        a, b = weights(straight.run_dir / f"{kind}.safetensors"), weights(second.run_dir / f"{kind}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind
    assert metrics_without_time(straight.run_dir / "metrics.csv") == metrics_without_time(
        second.run_dir / "metrics.csv")
    assert straight.test == second.test
    # the clock goes on across the resume: the second segment's rows and the total count the first one's time
    walls = [row["wall_s"] for row in second.history]
    assert progress["wall_s"] > walls[0] > 0  # saved at the interruption, after epoch 1's row
    assert walls[2] > walls[1] > progress["wall_s"] and second.seconds > walls[2]


def test_rand_augment_spec_is_checked_with_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="x3"):
        tiny_config(tmp_path, rand_augment="m9-x3")


def test_run_folder_and_resume_rules(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, epochs=1)
    result = train(cfg)
    run = result.run_dir
    text = (run / "config.yaml").read_text()
    assert text.startswith("# bestformer run run: global batch 16 = batch_size 16 x accum_steps 1 x world_size 1")
    assert resolve_config(str(run / "config.yaml"), {})[0] == cfg  # the saved config is a recipe
    with pytest.raises(ConfigError, match="already holds a checkpoint: continue it with --resume"):
        train(cfg)
    with pytest.raises(ConfigError, match="--lr cannot change on --resume"):
        resume(run, lr=0.5)
    more = resume(run, epochs=2)  # more epochs may be asked for
    assert more.status == "finished" and more.epochs_done == 2
    assert resume("last", tmp_path / "runs").epochs_done == 2  # finished: nothing more to do
    with pytest.raises(ConfigError, match="not a run folder"):
        resume(tmp_path)


def test_teacher_is_trained_first_then_distilled(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, epochs=1, teacher="ann_tiny", teacher_epochs=1, teacher_args=TINY)
    result = train(cfg)
    assert result.teacher is not None and result.teacher.model_name == "ann_tiny"
    teacher_ckpt = result.run_dir / "teacher" / "best.safetensors"
    _, header = read_checkpoint(teacher_ckpt)
    assert header["model_args"]["num_classes"] == 10 and header["meta"]["role"] == "teacher"
    _, student = read_checkpoint(result.run_dir / "best.safetensors")
    assert student["meta"]["distill"] == "hard"
    # a checkpoint works as --teacher PATH too; a teacher for other classes is refused
    again = train(tiny_config(tmp_path, epochs=1, name="second", teacher=str(teacher_ckpt)))
    assert again.status == "finished" and again.teacher is None
    other = bestformer.create_model("ann_tiny", **TINY, img_size=8, in_channels=1, num_classes=5)
    bestformer.save_checkpoint(other, tmp_path / "five.safetensors")
    with pytest.raises(ConfigError, match="num_classes=5 but the dataset digits needs 10"):
        train(tiny_config(tmp_path, name="third", teacher=str(tmp_path / "five.safetensors")))


def test_resume_state_restores_rng_streams(tmp_path: Path) -> None:
    from bestformer.training.state import save_resume_state

    model = torch.nn.Linear(3, 2)
    model.model_name, model.model_args = "x", {}
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    path = save_resume_state(tmp_path / "r.safetensors", model, opt, None, {"epoch": 1})
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    state = load_resume_state(path)
    state.restore_rng()
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert __import__("random").random() == expected[2]
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    fresh.load_state_dict(state.optimizer)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert state.progress == {"epoch": 1}


def test_distillation_choice_is_checked_before_training_and_fgd_is_imported_lazily() -> None:
    from bestformer.pipeline import distill_choices, resolve_distill

    assert distill_choices()[:2] == ["none", "hard"] and "fgd" in distill_choices()
    assert resolve_distill(TrainConfig(teacher="ann_tiny")) == "hard"  # the default with a teacher
    assert resolve_distill(TrainConfig()) == "none"
    assert resolve_distill(TrainConfig(teacher="ann_tiny", distill="fgd")) == "fgd"
    assert "fgd" in bestformer.training.list_distillers()  # registered by the import it triggered
    with pytest.raises(ConfigError, match="--distill hard needs a teacher"):
        resolve_distill(TrainConfig(distill="hard"))
    with pytest.raises(ConfigError, match="a teacher was given with --distill none"):
        resolve_distill(TrainConfig(teacher="ann_tiny", distill="none"))
    with pytest.raises(ConfigError, match="unknown distillation 'soft'"):
        resolve_distill(TrainConfig(teacher="ann_tiny", distill="soft"))


def test_event_frames_train_time_first_with_shared_augmentation(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(32, 2, 2, 8, 8, generator=g) < 0.2).float()  # [N, T, C, H, W] event counts
    y = torch.arange(32) % 2
    x[y == 1, :, 0, :4] += 1.0  # class 1: more ON events in the top half
    data = TensorDataset(x, y)
    cfg = tiny_config(tmp_path, epochs=1, crop_padding=1, flip=0.5, random_erasing=0.5, mixup=0.2)
    model = bestformer.create_model("bestformer_tiny", **TINY, img_size=8, in_channels=2, num_classes=2,
                                    time_steps=2)
    trainer = Trainer(model, cfg, data, data, num_classes=2, run=RunFolder(tmp_path / "run"))
    assert trainer.fit() == "finished"
    row = trainer.progress.history[0]
    assert math.isfinite(row["train_loss"]) and row["firing_rate"] > 0
    wrong_t = bestformer.create_model("bestformer_tiny", **TINY, img_size=8, in_channels=2, num_classes=2,
                                      time_steps=3)
    with pytest.raises(InputError, match="event input has T=2 frames but the model has time_steps=3"):
        evaluate(wrong_t, data, num_classes=2)
