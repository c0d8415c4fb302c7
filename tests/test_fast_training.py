"""Time-to-accuracy training: the budget planner, the time-step schedule, batched uint8 data with batched
augmentation (checked against PIL), flip test-time augmentation, and a budgeted run end to end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

import bestformer
from bestformer.data import ImageArrayDataset, ImageBatch, batched, collate
from bestformer.data.transforms import BatchAugment
from bestformer.errors import ConfigError
from bestformer.pipeline import train
from bestformer.training import TrainConfig, load_recipe
from bestformer.training.budget import parse_duration, parse_time_step_schedule, plan_budget
from bestformer.training.engine import evaluate
from bestformer.training.schedule import CosineSchedule
from bestformer.training.state import load_resume_state

TINY = {"embed_dim": 16, "num_heads": 2, "depth": 1, "pool_stages": [False, False, True, True]}


# these tests are about training, not kernels: the reference LIF path (conftest's plain_neurons)
pytestmark = pytest.mark.usefixtures("plain_neurons")


# ------------------------------------------------------------------------------------------------ planner
def test_durations() -> None:
    assert parse_duration("60m") == 3600.0 and parse_duration("1.5h") == 5400.0
    assert parse_duration("900s") == 900.0 and parse_duration("90") == 90.0 and parse_duration(" 2 min ") == 120.0
    for bad in ("", "m", "-5m", "0", "nan", "1e9h", "5 days", "inf"):
        with pytest.raises(ConfigError, match="time budget"):
            parse_duration(bad)


def test_time_step_schedule_phases_and_checks() -> None:
    s = parse_time_step_schedule("1:0.6,2:0.2,4:0.2", final=4)
    assert s.final == 4 and s.time_steps == [1, 2, 4]
    assert s.boundaries(100) == [60, 80]
    assert [s.at(i, 100) for i in (0, 59, 60, 79, 80, 99, 150)] == [1, 1, 2, 2, 4, 4, 4]
    assert s.mean_step_seconds({1: 1.0, 2: 2.0, 4: 4.0}) == pytest.approx(0.6 + 0.4 + 0.8)
    assert parse_time_step_schedule(None, final=4).phases == ((4, 1.0),)
    assert parse_time_step_schedule("4").phases == ((4, 1.0),)
    for bad, msg in (("1:0.5,4:0.4", "sum to 0.9"), ("1:0.5,2:0.5", "ends at T=2"), ("a:1", "T:fraction"),
                     ("0:1", "T must be"), ("8:0.5,4:0.5", "exceeds")):
        with pytest.raises(ConfigError, match=msg):
            parse_time_step_schedule(bad, final=4)
    with pytest.raises(ConfigError, match="time_step_schedule|sum"):
        TrainConfig(time_step_schedule="1:0.3,4:0.3")


def test_plan_fills_the_budget_by_hand() -> None:
    sched = parse_time_step_schedule("1:0.5,4:0.5", final=4)
    # mean step 0.5 * 1 + 0.5 * 3 = 2 s; 10 steps per epoch, so an epoch costs 20 s + 5 s of validation
    plan = plan_budget(1000.0, 100.0, {1: 1.0, 4: 3.0}, sched, 10, eval_s=5.0, final_s=40.0, reserve=0.01)
    # available: 1000 - 100 - 40 - 10 = 850 s; 850 / (2 + 0.5) = 340 steps = 34 epochs: 680 + 170 = 850 fits
    assert plan.total_steps == 340 and plan.evaluations == 34 and plan.epochs == 34.0
    # one second less: 339 steps would still need 34 validations (680 - 2 + 170 > 849), so 337 (33.7 epochs)
    tight = plan_budget(999.0, 100.0, {1: 1.0, 4: 3.0}, sched, 10, eval_s=5.0, final_s=40.0, reserve=0.0)
    assert tight.total_steps * 2.0 + math.ceil(tight.total_steps / 10) * 5.0 <= 859.0
    assert (tight.total_steps + 1) * 2.0 + math.ceil((tight.total_steps + 1) / 10) * 5.0 > 859.0
    assert "340 steps" in plan.describe() and plan.to_dict()["step_s"] == {"1": 1.0, "4": 3.0}
    with pytest.raises(ConfigError, match="too small.*at least"):
        plan_budget(60.0, 55.0, {4: 3.0}, parse_time_step_schedule("4"), 10, eval_s=5.0, final_s=1.0)
    with pytest.raises(ConfigError, match="no valid step time measured for T=1"):
        plan_budget(600.0, 0.0, {4: 3.0}, sched, 10, eval_s=5.0, final_s=1.0)


def test_cosine_schedule_ends_at_a_planned_step_count() -> None:
    f = CosineSchedule(lr=1.0, min_lr=0.0, warmup_lr=0.0, warmup_epochs=0.0, epochs=25 / 10, cooldown_epochs=0,
                       steps_per_epoch=10)
    assert f.total_epochs == 3 and f(0) == 1.0 and f(25) == 0.0
    assert f(12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 12 / 25)))


# --------------------------------------------------------------------------------------- time-step schedule
def test_model_runs_fewer_time_steps_with_the_first_lambdas() -> None:
    model = bestformer.create_model("bestformer_tiny", **TINY, img_size=8, in_channels=1, time_steps=4).eval()
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.lam.copy_(torch.arange(1.0, 5.0).view(4, 1, 1, 1, 1))
    x = torch.randn(3, 1, 8, 8)
    streams4 = model.forward_streams(x)
    model.set_time_steps(2)
    streams2 = model.forward_streams(x)
    # the first two steps of a T=4 run are exactly a T=2 run: the neurons are causal and lambda is per step
    assert all(torch.equal(a[:2], b) for a, b in zip(streams4, streams2))
    assert streams2[0].shape[0] == 2
    with pytest.raises(ConfigError, match=r"in \[1, 4\]"):
        model.set_time_steps(5)
    model.set_time_steps(4)
    assert torch.equal(model.forward_streams(x)[0], streams4[0])


def _digits_config(tmp_path: Path, **kw: object) -> TrainConfig:
    base = dict(model="bestformer_tiny", dataset="digits", model_args=TINY, time_steps=4, epochs=2, batch_size=32,
                limit=160, lr=0.01, deterministic=True, out=str(tmp_path), name="run", neuron_backend="plain",
                monitor_every=0)
    return TrainConfig(**{**base, **kw})


def test_trainer_switches_time_steps_by_step_and_validates_at_the_full_t(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    from bestformer.models.spiking_transformer import SpikingTransformer

    original = SpikingTransformer.forward

    def spy(self: SpikingTransformer, x: torch.Tensor) -> object:
        seen.append(self.time_steps if self.training else -self.time_steps)
        return original(self, x)

    monkeypatch.setattr(SpikingTransformer, "forward", spy)
    result = train(_digits_config(tmp_path, time_step_schedule="1:0.5,2:0.25,4:0.25", max_steps=8))
    train_t = [t for t in seen if t > 0]
    assert train_t == [1, 1, 1, 1, 2, 2, 4, 4]  # 8 steps: 4 at T=1, 2 at T=2, 2 at T=4
    assert all(t == -4 for t in seen if t < 0)  # every evaluation at the model's T
    assert result.status == "finished" and result.history[-1]["step"] == 8 and result.history[-1]["time_steps"] == 4


# ------------------------------------------------------------------------------------- data and augmentation
def test_batched_fetch_equals_the_per_image_path() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 5, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=20)
    ds = ImageArrayDataset(images, labels, np.array([3, 7, 1, 19, 0]), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    assert ds.pixels.dtype == torch.uint8 and ds.pixels.shape == (5, 3, 5, 6)
    batch = ds.fetch([4, 0, 2])
    assert isinstance(batch, ImageBatch)
    for row, i in enumerate([4, 0, 2]):
        x, y = ds[i]
        ref = (torch.from_numpy(images[ds.indices[i]].astype(np.float64)).permute(2, 0, 1) / 255
               - torch.tensor([0.5, 0.4, 0.3], dtype=torch.float64).view(3, 1, 1)) \
            / torch.tensor([0.2, 0.25, 0.3], dtype=torch.float64).view(3, 1, 1)
        assert torch.equal(batch.x[row], x) and int(batch.y[row]) == y == labels[ds.indices[i]]
        assert torch.allclose(x.double(), ref, atol=1e-6)
    calls: list[list[int]] = []
    fetch = ds.fetch
    ds.fetch = lambda idx: calls.append(list(idx)) or fetch(idx)  # type: ignore[method-assign]
    loader = DataLoader(batched(ds), batch_size=2, collate_fn=collate)
    xs, ys = zip(*loader)
    assert calls == [[0, 1], [2, 3], [4]]  # the loader fetched each batch whole, not image by image
    assert torch.equal(torch.cat(xs), torch.stack([ds[i][0] for i in range(5)]))
    assert torch.equal(torch.cat(ys), ds.targets)
    plain = DataLoader(ds, batch_size=5)  # any other loader still gets single samples
    assert torch.equal(next(iter(plain))[0], torch.cat(xs))


def test_batched_crop_and_flip_equal_pil() -> None:
    """The torch batch augmentation against PIL on the same draws: zero padding, crop box, mirror."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    aug = BatchAugment(num_classes=10, crop_padding=3, flip=0.5, seed=5)
    out, _ = aug(x, torch.zeros(6, dtype=torch.long), step=7)
    draws = np.random.Generator(np.random.PCG64([5, 0, 7]))  # the augmentation's generator for this step
    offsets = draws.integers(0, 7, size=(6, 2))
    flips = draws.random(6) < 0.5
    assert flips.any() and not flips.all()
    for i in range(6):
        img = ImageOps.expand(Image.fromarray(images[i]), border=3, fill=0)
        dy, dx = offsets[i]
        img = img.crop((int(dx), int(dy), int(dx) + 8, int(dy) + 8))
        if flips[i]:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert torch.equal(out[i], torch.from_numpy(np.array(img)).permute(2, 0, 1).float()), i


def test_flip_tta_averages_the_logits_of_both_mirrors() -> None:
    model = bestformer.create_model("ann_tiny", **TINY, img_size=8, in_channels=1, num_classes=3).eval()
    x = torch.randn(10, 1, 8, 8)
    y = torch.arange(10) % 3
    ds = torch.utils.data.TensorDataset(x, y)
    res = evaluate(model, ds, num_classes=3, flip=True)
    with torch.no_grad():
        logits = (model(x) + model(x.flip(-1))) / 2
    expected = 100.0 * float((logits.argmax(-1) == y).float().mean())
    assert res["acc1"] == pytest.approx(expected)
    assert res["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)


# -------------------------------------------------------------------------------------------- budgeted run
def test_budgeted_run_plans_its_steps_and_ends_within_the_budget(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    budget = 25.0
    t0 = time.perf_counter()
    result = train(_digits_config(tmp_path, time_budget=f"{budget}s", epochs=1, limit=None,
                                  time_step_schedule="1:0.5,4:0.5", warmup_epochs=0.2))
    wall = time.perf_counter() - t0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    plan = run["budget_plan"]
    cfg = load_recipe(str(tmp_path / "run" / "config.yaml"))
    assert cfg["max_steps"] == plan["total_steps"] >= 10 and set(plan["step_s"]) == {"1", "4"}
    # after each epoch the remaining steps are re-fitted to the time left; the run ends at the last plan's step
    final_plan = load_resume_state(tmp_path / "run" / "resume.safetensors").progress["config"]["max_steps"]
    ended = result.history[-1]["step"]
    # on a loaded machine the deadline may stop the run a step or two before the last plan's end: said on stderr
    assert result.status == "finished" and (ended == final_plan or (
        ended < final_plan and f"the time budget ran out at step {ended} of the planned" in capsys.readouterr().err))
    assert wall <= budget + 3.0  # the budget counts from the run's start; a little slack for the test machine
    assert result.history[-1]["wall_s"] <= budget and result.val is not None


def test_a_budget_without_a_validation_split_plans_the_test_pass(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from bestformer.pipeline import run as run_module

    planned: list[tuple[float, float]] = []

    class Planned(Exception):
        pass

    def plan_budget(*args: object) -> None:  # (budget, elapsed, step_s, schedule, steps_per_epoch, eval_s, final_s)
        planned.append((args[5], args[6]))
        raise Planned

    monkeypatch.setattr(run_module, "plan_budget", plan_budget)
    for val_fraction in (0.0, 0.2):
        with pytest.raises(Planned):
            train(_digits_config(tmp_path, time_budget="1h", epochs=1, val_fraction=val_fraction,
                                 name=f"v{val_fraction}"))
    (no_val_eval, no_val_final), (eval_s, final_s) = planned
    # without validation the evaluation cost is measured on the test split, whose pass after training is planned
    # (it was 0: the run overran its budget by the test pass)
    assert no_val_eval == 0.0 and no_val_final > run_module.PROFILE_SECONDS
    assert eval_s > 0.0 and final_s > run_module.PROFILE_SECONDS


def test_fast_recipe_keeps_the_papers_properties() -> None:
    from bestformer.quant import weight_bits_of

    recipe = load_recipe("cifar10-fast")
    cfg = TrainConfig(**{k: v for k, v in recipe.items()})
    model = bestformer.create_model(cfg.model, **cfg.model_args)
    sched = parse_time_step_schedule(cfg.time_step_schedule, model.time_steps)
    assert sched.final == model.time_steps >= 4 and cfg.time_budget is not None
    assert model.attention == "token" and model.reversible and model.distill_head  # Eq. 8-9, 12, 15
    bits = {name: weight_bits_of(m) for name, m in model.named_modules() if weight_bits_of(m) is not None}
    full = sorted(n for n, b in bits.items() if b != 1)
    assert full == ["head", "head_dist", "patch_embed.proj.conv"]  # 1-bit everywhere but the first conv and heads


def test_lr_scaling_rules_and_the_cuda_batch_size(tmp_path: Path) -> None:
    cfg = TrainConfig(lr=0.01, warmup_lr=0.001, lr_scaling="sqrt", lr_base_batch=128)
    assert cfg.lr_factor(512) == pytest.approx(2.0) and cfg.lr_factor(128) == 1.0
    assert TrainConfig(lr_scaling="linear", lr_base_batch=64).lr_factor(512) == 8.0
    assert TrainConfig().lr_factor(4096) == 1.0
    from bestformer.training import Trainer
    from bestformer.training.runs import RunFolder

    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 8, 8), torch.arange(64) % 2)
    model = bestformer.create_model("bestformer_tiny", **TINY, img_size=8, in_channels=1, num_classes=2)
    trainer = Trainer(model, _digits_config(tmp_path, batch_size=32, lr=0.01, warmup_lr=0.001, warmup_epochs=1,
                                            lr_scaling="linear", lr_base_batch=16), data, None, num_classes=2,
                      run=RunFolder(tmp_path / "r"))
    assert trainer.schedule.lr == pytest.approx(0.02) and trainer.schedule.warmup_lr == pytest.approx(0.002)
    with pytest.raises(ConfigError, match="cuda_batch_size"):
        TrainConfig(cuda_batch_size=0)
    recipe = load_recipe("cifar10-fast")
    assert recipe["cuda_batch_size"] > recipe["batch_size"] and recipe["lr_scaling"] == "sqrt"


def test_refit_after_an_epoch_by_hand() -> None:
    from bestformer.training.budget import planned_seconds, refit_steps

    sched = parse_time_step_schedule("1:0.5,4:0.5", final=4)
    step_s = {1: 1.0, 4: 3.0}
    # 100 steps: 50 at 1 s then 50 at 3 s; steps 40..60 cost 10 * 1 + 10 * 3
    assert planned_seconds(step_s, sched, 40, 60, 100) == 40.0
    assert planned_seconds(step_s, sched, 0, 100, 100) == 200.0
    # after 10 of 100 planned steps (epochs of 10), steps ran as planned: 190 s of steps and 9 end-of-epoch passes of
    # 2 s remain; with exactly 208 s left the plan holds, with less it shrinks, with more it grows
    args = dict(step_s=step_s, schedule=sched, done=10, total_steps=100, steps_per_epoch=10, epochs_done=1)
    assert refit_steps(**args, slowdown=1.0, overhead_s=2.0, left_s=208.0) == 100
    assert refit_steps(**args, slowdown=1.0, overhead_s=2.0, left_s=150.0) < 100
    assert refit_steps(**args, slowdown=1.0, overhead_s=2.0, left_s=300.0) > 100
    # twice as slow as measured: about half the remaining steps fit
    slow = refit_steps(**args, slowdown=2.0, overhead_s=0.0, left_s=380.0)
    assert 2.0 * planned_seconds(step_s, sched, 10, slow, slow) <= 380.0 < 2.0 * planned_seconds(
        step_s, sched, 10, slow + 1, slow + 1)
    assert refit_steps(**args, slowdown=1.0, overhead_s=2.0, left_s=0.0) == 10  # no time left: stop now


def test_measuring_the_costs_leaves_the_run_untouched(tmp_path: Path) -> None:
    from bestformer.training import Trainer
    from bestformer.training.runs import RunFolder

    data = torch.utils.data.TensorDataset(torch.randn(96, 1, 8, 8), torch.arange(96) % 2)
    model = bestformer.create_model("bestformer_tiny", **TINY, img_size=8, in_channels=1, num_classes=2, time_steps=4)
    trainer = Trainer(model, _digits_config(tmp_path, time_step_schedule="1:0.5,4:0.5"), data, data, num_classes=2,
                      run=RunFolder(tmp_path / "r"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step_s, eval_s = trainer.measure_costs(steps=1, eval_batches=1)
    assert set(step_s) == {1, 4} and all(v > 0 for v in step_s.values()) and eval_s > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not trainer.optimizer.state and all(p.grad is None for p in model.parameters())
    assert model.time_steps == 4
