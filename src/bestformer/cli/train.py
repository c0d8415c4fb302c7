"""``bestformer train``: train a model; with no arguments, the README demo (``bestformer_tiny`` on
scikit-learn's digits, distilled from an ANN teacher trained first).

Options come from the defaults, then the recipe (``--recipe NAME_OR_PATH``; without it the recipe named after
the dataset when one ships, ``digits`` for the demo), then the command line: every recipe key is an option
(``batch_size`` -> ``--batch-size``).

Several processes: under ``torchrun ... -m bestformer train ...`` every worker joins the process group and trains
its shard (docs/distributed.md); ``--nproc N`` starts that torchrun on this machine with the same options.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import yaml

HELP = "train a model (no arguments: the demo, bestformer_tiny on scikit-learn digits)"

_BOOL_TRUE, _BOOL_FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _typed(base: type, nullable: bool, key: str) -> Any:
    def parse(text: str) -> Any:
        if nullable and text.lower() in ("none", "null"):
            return None
        try:
            value = base(text)
        except ValueError:
            value = None
        finite = value is not None and not (base is float and not math.isfinite(value))  # NaN passes range checks
        if not finite:
            raise argparse.ArgumentTypeError(f"--{key.replace('_', '-')} expects {base.__name__}"
                                             f"{' or none' if nullable else ''}{' (finite)' if value else ''}, "
                                             f"got {text!r}")
        return value
    parse.__name__ = base.__name__  # argparse names the type in its messages
    return parse


def key_value(text: str) -> tuple[str, Any]:
    """argparse type of ``KEY=VALUE`` options: the key and its value parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot parse the value of {text!r}") from None
    if isinstance(parsed, float) and not math.isfinite(parsed):
        raise argparse.ArgumentTypeError(f"{key.strip()} must be a finite number, got {value!r}")
    return key.strip(), parsed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..neurons import supported_backends
    from ..pipeline import distill_choices
    from ..training.config import TrainConfig, cli_fields, field_choices, field_help, field_types, list_recipes

    run = parser.add_argument_group("run")
    run.add_argument("--recipe", default=None, metavar="NAME_OR_PATH",
                     help=f"recipe: {', '.join(list_recipes())}, a YAML file, or 'none' "
                          "(default: the recipe named after --dataset when one exists)")
    run.add_argument("--resume", default=None, metavar="RUN",
                     help="continue a run: its folder (runs/<name>), a checkpoint in it, or 'last'")
    run.add_argument("--nproc", type=_typed(int, False, "nproc"), default=None, metavar="N",
                     help="train in N processes on this machine (starts torchrun with the other options; "
                          "batch_size is per process, the global batch is N times larger)")
    opts = parser.add_argument_group("options (recipe keys; default: the recipe's, else the value shown)")
    defaults = TrainConfig()
    for key in cli_fields():
        base, nullable = field_types(key)
        flag = "--" + key.replace("_", "-")
        kw: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS,
                              "help": f"{field_help(key)} (default: {getattr(defaults, key)})"}
        if key == "distill":
            kw["choices"] = distill_choices()
            nullable = False  # "none" is one of the choices (no distillation), not a null that the choices refuse
        elif key == "neuron_backend":
            kw["choices"] = sorted({"plain", "fused", *supported_backends()})
        elif field_choices(key):
            kw["choices"] = field_choices(key)
        if base is bool:
            opts.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            if "choices" not in kw:
                kw["metavar"] = key.upper()
            opts.add_argument(flag, type=_typed(base, nullable, key), **kw)
    opts.add_argument("--model-arg", dest="model_args", action="append", type=key_value, metavar="KEY=VALUE",
                      default=argparse.SUPPRESS, help="a model option, e.g. depth=2 (repeatable)")
    opts.add_argument("--teacher-arg", dest="teacher_args", action="append", type=key_value,
                      metavar="KEY=VALUE", default=argparse.SUPPRESS,
                      help="an option of a teacher trained in this run (repeatable)")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (mappings from their KEY=VALUE lists)."""
    given = {k: v for k, v in vars(args).items() if k not in ("recipe", "resume", "nproc", "command")}
    for key in ("model_args", "teacher_args"):
        if key in given:
            given[key] = dict(given[key])
    return given


def _yaml_value(value: Any) -> str:
    """``value`` as the YAML text that ``--model-arg KEY=VALUE`` parses back to it (strings quoted when needed)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("...\n").strip()


def command_line(args: argparse.Namespace) -> list[str]:
    """``train`` and the options of ``args`` as a command line (what ``--nproc`` hands to every worker), without
    ``--nproc``; parsing it again gives the same options."""
    argv = ["train"]
    for key in ("recipe", "resume"):
        if getattr(args, key, None) is not None:
            argv += [f"--{key}", getattr(args, key)]
    for key, value in overrides_from(args).items():
        if key in ("model_args", "teacher_args"):
            flag = "--model-arg" if key == "model_args" else "--teacher-arg"
            for k, v in value.items():
                argv += [flag, f"{k}={_yaml_value(v)}"]
        elif isinstance(value, bool):
            argv.append(f"--{'' if value else 'no-'}{key.replace('_', '-')}")
        else:
            argv += [f"--{key.replace('_', '-')}", "none" if value is None else repr(value)
                     if isinstance(value, float) else str(value)]
    return argv


def _train(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    from ..pipeline import resolve_config
    from ..pipeline import resume as resume_run
    from ..pipeline import train as train_run
    from ..training.dist import launch_rank

    if args.resume is not None:  # the original command may be repeated: only changed values are checked
        out = overrides.pop("out", "runs")
        return resume_run(args.resume, out, recipe=args.recipe, **overrides)
    cfg, recipe = resolve_config(args.recipe, overrides)
    if launch_rank() == 0:
        print(f"recipe: {recipe or 'none (defaults)'}")
    return train_run(cfg, recipe=recipe)


def run(args: argparse.Namespace) -> int:
    from ..pipeline import results_table
    from ..training.dist import launch_rank, launch_torchrun

    if args.nproc is not None:
        return launch_torchrun(args.nproc, command_line(args))
    result = _train(args, overrides_from(args))
    if launch_rank() != 0:  # rank 0 reports for the whole run
        return result.exit_code
    if result.status == "interrupted":  # exit 130 / 143, so that `train ... && export ...` stops here
        print(f"\ninterrupted by {result.stopped_by}: the checkpoint is saved in {result.run_dir}; continue with\n"
              f"  bestformer train --resume {result.run_dir}")
        return result.exit_code
    if result.status == "stopped_early":
        print(f"stopped early at epoch {result.epochs_done} (best validation at epoch {result.best_epoch})")
    print()
    print(results_table(result))
    print(f"\nrun folder: {result.run_dir} ({result.seconds:.0f} s)")
    return 0
