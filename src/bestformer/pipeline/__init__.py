"""The job runner: training runs (:func:`train`, :func:`resume`) and evaluation jobs, composed from the training
engine, the data, the analysis (a run's profile) and the zoo (``zoo:NAME`` weights). It sits above the zoo and
below the command line.

One module per job: :mod:`.config` (the config of a job), :mod:`.run` (one run in its folder), :mod:`.teacher`,
:mod:`.jobs` (train / resume), :mod:`.evaluation` (final and saved-model evaluation), :mod:`.weights` (saved
models named on the command line) and :mod:`.ranks` (what the processes of a job agree on).
"""

from ..analysis import profile_model  # re-exported with the deployment-file size registered (by .evaluation)
from ..training.config import resolve_config
from ..training.evaluation import evaluate
from ..training.result import TrainResult, parameter_counts, results_table
from .config import RESUMABLE, distill_choices, resolve_distill
from .evaluation import evaluate_saved, write_profile
from .jobs import resume, train
from .run import Run, load_bundle, seed_everything
from .weights import load_weights_spec

__all__ = ["RESUMABLE", "Run", "TrainResult", "distill_choices", "evaluate", "evaluate_saved", "load_bundle",
           "load_weights_spec", "parameter_counts", "profile_model", "resolve_config", "resolve_distill",
           "results_table", "resume", "seed_everything", "train", "write_profile"]
