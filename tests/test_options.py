"""Where a run's options come from and when they are checked: recipe, command line, saved run and checkpoint
header; precedence, resume and one-line refusals before any work is done."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import bestformer
from bestformer.cli import main
from bestformer.data.registry import DatasetBundle
from bestformer.errors import ConfigError, FileFormatError
from bestformer.pipeline import evaluate_saved, load_weights_spec, train
from bestformer.pipeline import run as run_module
from bestformer.pipeline.config import check_resume_length, execution_config, model_options, resumed_config
from bestformer.training import TrainConfig
from bestformer.training.checkpoint import read_checkpoint, save_checkpoint
from bestformer.training.config import resolve_config
from bestformer.training.dist import DistContext

pytestmark = pytest.mark.usefixtures("plain_neurons")

#: a seconds-long run of the digits recipe (no --recipe: the one named after the dataset)
QUICK = ["--epochs", "1", "--limit", "48", "--teacher", "none", "--model-arg", "embed_dim=16", "--model-arg",
         "num_heads=2", "--neuron-backend", "plain"]
CUDA = DistContext(device=torch.device("cuda"))  # only the device type is read: no GPU needed


def test_the_original_command_resumes_a_run_of_the_implied_recipe(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A run started without --recipe took the digits recipe; its --model-arg merged into the recipe's
    model_args. Repeating the command with --resume is no change (it was refused as a model_args change)."""
    argv = ["train", *QUICK, "--out", str(tmp_path), "--name", "a"]
    assert main(argv) == 0
    assert main([*argv, "--resume", str(tmp_path / "a")]) == 0
    assert main(["train", "--resume", str(tmp_path / "a"), "--model-arg", "embed_dim=32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--model-arg cannot change on --resume" in err and "--model-args" not in err


def test_a_run_resumes_after_its_recipe_file_is_gone(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("dataset: digits\nmodel_args: {embed_dim: 16, num_heads: 2}\n")
    assert main(["train", "--recipe", str(recipe), *QUICK, "--out", str(tmp_path), "--name", "r"]) == 0
    recipe.unlink()
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "--model-arg", "embed_dim=16"]) == 2  # no file to merge


def test_a_batch_size_given_beats_the_recipes_gpu_batch() -> None:
    """cifar10-fast trains at 128 on the CPU and 512 on a GPU; --batch-size 64 is 64 everywhere."""
    cfg, _ = resolve_config("cifar10-fast", {"batch_size": 64})
    assert cfg.cuda_batch_size is None and execution_config(cfg, None, CUDA).batch_size == 64
    cfg, _ = resolve_config("cifar10-fast", {})
    assert execution_config(cfg, None, CUDA).batch_size == 512
    cfg, _ = resolve_config("cifar10-fast", {"batch_size": 64, "cuda_batch_size": 256})
    assert execution_config(cfg, None, CUDA).batch_size == 256


def test_a_new_batch_size_on_resume_is_refused_even_when_it_matched_the_gpu_batch() -> None:
    saved = TrainConfig(batch_size=32, cuda_batch_size=32).to_dict()
    assert resumed_config(saved, None, {}, "run r").batch_size == 32
    with pytest.raises(ConfigError, match="--batch-size cannot change on --resume"):
        resumed_config(saved, None, {"batch_size": 16}, "run r")


def test_grouped_recipe_sections_do_not_outrank_the_command_line(tmp_path: Path) -> None:
    recipe = tmp_path / "grouped.yaml"
    recipe.write_text("optim: {lr: 0.02, batch_size: 32}\narch: {model_args: {embed_dim: 16}}\n")
    cfg, _ = resolve_config(str(recipe), {"lr": 0.5, "batch_size": 8, "model_args": {"depth": 1}})
    assert (cfg.lr, cfg.batch_size, cfg.model_args) == (0.5, 8, {"embed_dim": 16, "depth": 1})
    cfg, _ = resolve_config(str(recipe), {})
    assert (cfg.lr, cfg.batch_size) == (0.02, 32)
    assert resumed_config(cfg.to_dict(), str(recipe), {"epochs": 3}, "run r").epochs == 3  # was a KeyError


def test_distill_none_is_accepted_on_the_command_line(tmp_path: Path) -> None:
    assert main(["train", *QUICK, "--distill", "none", "--out", str(tmp_path), "--name", "b"]) == 0


def test_time_steps_and_a_contradicting_model_option_on_one_command_line_are_refused() -> None:
    with pytest.raises(ConfigError, match="--time-steps 2 and --model-arg time_steps=6 disagree; give one"):
        resolve_config("none", {"time_steps": 2, "model_args": {"time_steps": 6}})
    # a recipe's T and a model option (static images): the model option builds the model, as before 0.2.0
    cfg, _ = resolve_config("mnist", {"model_args": {"time_steps": 2}})
    static = types.SimpleNamespace(name="mnist", num_classes=10, in_channels=1, img_size=28, is_event=False)
    assert model_options(static, cfg.time_steps, cfg.model_args)["time_steps"] == 2
    events = types.SimpleNamespace(name="nmnist", num_classes=10, in_channels=2, img_size=34, is_event=True)
    with pytest.raises(ConfigError, match="time_steps=2 contradicts the dataset nmnist"):
        model_options(events, 4, {"time_steps": 2})


def test_a_schedule_of_time_steps_on_event_data_is_refused_before_the_teacher(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    frames = TensorDataset(torch.zeros(8, 4, 2, 8, 8), torch.zeros(8, dtype=torch.long))
    events = DatasetBundle("events", frames, frames, None, 2, 2, 8, True, ["a", "b"], (0.0, 0.0), (1.0, 1.0))
    monkeypatch.setattr(run_module, "load_bundle", lambda cfg, time_steps: events)
    monkeypatch.setattr(run_module.Run, "teacher", lambda *a: pytest.fail("the teacher was built"))
    cfg = TrainConfig(model="bestformer_tiny", dataset="digits", time_steps=4, time_step_schedule="1:0.5,4:0.5",
                      teacher="ann_tiny", out=str(tmp_path), name="e", neuron_backend="plain")
    with pytest.raises(ConfigError, match="time_step_schedule works on static images; events has event frames"):
        train(cfg)


def test_a_resume_needs_more_epochs_than_the_run_has_started() -> None:
    """4 epochs done: --epochs 1 would log an epoch of no steps; inside epoch 3, --epochs 2 would run epoch 3."""
    for progress, epochs in (({"epoch": 4}, 1), ({"epoch": 2, "sums": {"steps": 3}}, 2)):
        with pytest.raises(ConfigError, match=rf"has done {progress['epoch']} epoch\(s\).*at least "
                                              rf"{progress['epoch'] + 1} to continue it, got {epochs}"):
            check_resume_length(progress, TrainConfig(epochs=epochs), "run r")
    check_resume_length({"epoch": 4}, TrainConfig(epochs=5), "run r")
    check_resume_length({"epoch": 4, "finished": True}, TrainConfig(epochs=1), "run r")  # done: its table again
    check_resume_length({"epoch": 4}, TrainConfig(epochs=3, cooldown_epochs=2), "run r")
    check_resume_length({"epoch": 25}, TrainConfig(epochs=1, max_steps=200), "run r")  # a budget's plan: steps


def test_options_added_since_a_run_was_made_resume_at_its_behaviour() -> None:
    """A run saved before ``warmup_prefix`` existed ran the prefix schedule (the default): repeating its reference
    recipe (which sets it false) is no change, and the run continues with the schedule it had."""
    saved = resolve_config("cifar10", {"epochs": 2})[0].to_dict()
    del saved["warmup_prefix"]
    cfg = resumed_config(saved, "cifar10", {"epochs": 3}, "run r")
    assert cfg.epochs == 3 and cfg.warmup_prefix
    with pytest.raises(ConfigError, match="--warmup-prefix cannot change on --resume"):
        resumed_config(saved, "cifar10", {"warmup_prefix": False}, "run r")


def test_the_gpu_batch_rule_holds_on_resume_too() -> None:
    cfg, _ = resolve_config("cifar10-fast", {"batch_size": 16})
    resumed = resumed_config(cfg.to_dict(), "cifar10-fast", {"batch_size": 16, "epochs": 2}, "run r")
    assert (resumed.batch_size, resumed.cuda_batch_size, resumed.epochs) == (16, None, 2)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_outside_torchs_range_is_refused_when_configured(seed: int) -> None:
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        TrainConfig(seed=seed)


def test_eval_takes_the_runs_limit_and_checks_its_recorded_settings(tmp_path: Path) -> None:
    assert main(["train", *QUICK, "--out", str(tmp_path), "--name", "c"]) == 0
    best = tmp_path / "c" / "best.safetensors"
    model, meta = load_weights_spec(str(best))
    assert evaluate_saved(model, meta)["count"] == 48  # the run's own limit: its recorded test accuracy
    assert evaluate_saved(model, meta, limit=None)["count"] == 359  # whole split
    with pytest.raises(ConfigError, match="amp must be one of .*, got 'bf32'"):  # the caller's, not the file's
        evaluate_saved(model, meta, amp="bf32")
    tensors, header = read_checkpoint(best)
    for key, value in (("amp", "fp32"), ("eval_flip", "yes"), ("limit", -3)):
        bad = {**header["meta"], "config": {**header["meta"]["config"], key: value}}
        model.load_state_dict(tensors)
        path = save_checkpoint(model, tmp_path / f"bad_{key}.safetensors", **bad)
        with pytest.raises(FileFormatError, match=f"records .*{key.split('_')[-1]}={value!r}"):
            evaluate_saved(*load_weights_spec(str(path)), source="the checkpoint")


def test_a_model_option_that_cannot_build_fails_before_the_teacher(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_module.Run, "teacher", lambda *a: pytest.fail("the teacher was built"))
    for option, message in (({"depth": 0}, "depth must be an integer >= 1"),
                            ({"img_size": 16}, "img_size=16 contradicts the dataset digits")):
        cfg = TrainConfig(model="bestformer_tiny", dataset="digits", teacher="ann_tiny", limit=48, out=str(tmp_path),
                          name=f"m-{next(iter(option))}", model_args=option, neuron_backend="plain")
        with pytest.raises(ConfigError, match=message):
            train(cfg)
    assert not any(tmp_path.glob("*/config.yaml"))  # no half-made run left behind


def test_a_recipe_gives_another_model_only_the_options_it_takes() -> None:
    # `--model csd_tiny --dataset digits` failed on the digits recipe's LIF options (neuron_kwargs) for a model
    # that has no neuron option; the width and the pooling still apply, as does what the command line gives
    from bestformer.training.config import resolve_config

    pools = [False, False, False, True]
    cfg, recipe = resolve_config(None, {"model": "csd_tiny", "dataset": "digits"})
    assert recipe == "digits" and cfg.model_args == {"embed_dim": 32, "pool_stages": pools}
    assert bestformer.create_model(cfg.model, **cfg.model_args).embed_dim == 32
    own, _ = resolve_config(None, {"dataset": "digits"})  # the recipe's own model keeps everything
    assert own.model_args == {"embed_dim": 32, "pool_stages": pools, "neuron_kwargs": {"decay_input": False}}
    given, _ = resolve_config(None, {"model": "csd_tiny", "dataset": "digits", "model_args": {"embed_dim": 48}})
    assert given.model_args == {"embed_dim": 48, "pool_stages": pools}
    options = bestformer.models.model_option_names("csd_tiny")
    assert options is not None and "neuron" not in options and {"spiking", "time_steps"} <= set(options)
    # a resume repeating only --model-arg filters for the run's own model, as when it started
    from bestformer.pipeline.config import resumed_config

    again = resumed_config(given.to_dict(), None, {"model_args": {"embed_dim": 48}}, "run X", "digits")
    assert again.model_args == given.model_args


def test_a_nested_model_option_merges_into_the_recipes(tmp_path: Path) -> None:
    # `--model-arg neuron_kwargs={tau: 3}` on a recipe with neuron_kwargs {decay_input: false} replaced the whole
    # mapping: the neuron silently went back to Eq. 1's decayed input charge. Nested mappings merge key by key
    from bestformer.pipeline.config import resumed_config
    from bestformer.training.config import merge_mappings, resolve_config

    cfg, _ = resolve_config("digits", {"model_args": {"neuron_kwargs": {"tau": 3.0}, "embed_dim": 16}})
    assert cfg.model_args["neuron_kwargs"] == {"decay_input": False, "tau": 3.0} and cfg.model_args["embed_dim"] == 16
    params = {m.params for m in bestformer.create_model(cfg.model, **cfg.model_args).modules() if hasattr(m, "params")}
    assert {(p.decay_input, p.tau) for p in params} == {(False, 3.0)}
    # the command line still wins key by key, a None included, and a non-mapping replaces a mapping
    assert resolve_config("digits", {"model_args": {"neuron_kwargs": {"decay_input": True}}})[0].model_args[
        "neuron_kwargs"] == {"decay_input": True}
    assert merge_mappings({"a": {"b": 1, "c": {"d": 2}}}, {"a": {"c": {"e": 3}}, "f": None}) == \
        {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "f": None}
    assert merge_mappings({"a": {"b": 1}}, {"a": None}) == {"a": None} and merge_mappings({"a": 1}, {"a": {}}) == \
        {"a": {}}
    # the recipe's neuron options reach only a neuron that takes them: --model qsd_tiny's IE-LIF, or neuron=ielif,
    # failed on the digits recipe's LIF decay_input (before the nested merge too, without neuron_kwargs given)
    for given, want in (({"model": "qsd_tiny"}, {}),
                        ({"model": "qsd_tiny", "model_args": {"neuron_kwargs": {"levels": 4}}},
                         {"neuron_kwargs": {"levels": 4}}),
                        ({"model_args": {"neuron": "ielif"}}, {"neuron": "ielif"}),
                        ({"model": "a2os2a_tiny"}, {"neuron_kwargs": {"decay_input": False}})):
        run, _ = resolve_config("digits", given)
        assert {k: v for k, v in run.model_args.items() if k in ("neuron", "neuron_kwargs")} == want, given
        bestformer.create_model(run.model, **run.model_args)
    assert bestformer.models.model_option_default("qsd_tiny", "neuron") == "ielif"
    assert bestformer.models.model_option_default("bestformer_tiny", "neuron") == "lif"
    assert "decay_input" in bestformer.neurons.neuron_option_names("lif")
    assert "decay_input" not in bestformer.neurons.neuron_option_names("ielif")
    # for the recipe's own neuron every option stays: a misspelt one fails when the model is built, not silently
    typo = tmp_path / "typo.yaml"
    typo.write_text("model: bestformer_tiny\nmodel_args: {neuron_kwargs: {decay_inptu: false}}\n")
    kept, _ = resolve_config(str(typo), {})
    assert kept.model_args == {"neuron_kwargs": {"decay_inptu": False}}
    with pytest.raises(ConfigError, match="decay_inptu"):
        bestformer.create_model(kept.model, **kept.model_args)
    # a resume that repeats the nested option is no change
    again = resumed_config(cfg.to_dict(), None, {"model_args": {"neuron_kwargs": {"tau": 3.0}, "embed_dim": 16}},
                           "run X", "digits")
    assert again.model_args == cfg.model_args
