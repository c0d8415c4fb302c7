"""Scale-out training on ``torch.distributed``: torchrun process groups, sharded sampling, DDP, rank-0 helpers.

Nothing here is from the papers (BESTformer trained on 4 GPUs with timm's script; the paper says no more); it is
our design on top of PyTorch's own engine (``torchrun``, ``init_process_group``, ``DistributedDataParallel``),
one job per module:

- :mod:`.context`: join the process group torchrun describes (:func:`init_distributed`, :func:`distributed`) with
  a collective timeout, and turn a lost peer into one :class:`DistributedError` line (:func:`collective_errors`);
- :mod:`.collectives`: rank-0-only printing, progress bars and writing, barriers, broadcasts, all-reduced metrics;
- :mod:`.sampler`: :class:`ShardedBatchSampler` (every sample once per epoch across ranks, the same micro-batches
  on any world size with the same global batch) and resume on another world size (:func:`replan_batches`,
  :func:`position_from_samples`);
- :mod:`.ddp`: DDP wrapping (:func:`wrap_ddp`; optional synced BatchNorm: torch's SyncBatchNorm on CUDA,
  :class:`~bestformer.layers.DistributedBatchNorm` on CPU), gradient accumulation (:func:`gradient_sync`) and a
  frozen distillation teacher shared by all ranks (:func:`prepare_teacher`);
- :mod:`.launch`: the ``--nproc`` launcher (:func:`launch_torchrun`).
"""

from .collectives import (
    all_reduce_sums,
    barrier,
    broadcast_module,
    broadcast_object,
    broadcast_tensors,
    get_rank,
    get_world_size,
    is_main_process,
    main_process_first,
    print_main,
    progress,
    rank_zero_only,
)
from .context import (
    DEFAULT_TIMEOUT_S,
    LAUNCH_ENV,
    DistContext,
    DistributedError,
    collective_errors,
    destroy_distributed,
    distributed,
    init_distributed,
    is_comm_failure,
    launch_rank,
    launched_by_torchrun,
    read_launch_env,
    resolve_device,
    timeout_from_env,
)
from .ddp import gradient_sync, prepare_teacher, unwrap_model, wrap_ddp
from .launch import launch_torchrun, remove_option, torchrun_command
from .sampler import (
    BatchPlan,
    MicroBatch,
    ShardedBatchSampler,
    ShardedSampler,
    plan_batches,
    position_from_samples,
    replan_batches,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "LAUNCH_ENV",
    "BatchPlan",
    "DistContext",
    "DistributedError",
    "MicroBatch",
    "ShardedBatchSampler",
    "ShardedSampler",
    "all_reduce_sums",
    "barrier",
    "broadcast_module",
    "broadcast_object",
    "broadcast_tensors",
    "collective_errors",
    "destroy_distributed",
    "distributed",
    "get_rank",
    "get_world_size",
    "gradient_sync",
    "init_distributed",
    "is_comm_failure",
    "is_main_process",
    "launch_rank",
    "launch_torchrun",
    "launched_by_torchrun",
    "main_process_first",
    "plan_batches",
    "position_from_samples",
    "prepare_teacher",
    "print_main",
    "progress",
    "rank_zero_only",
    "read_launch_env",
    "remove_option",
    "replan_batches",
    "resolve_device",
    "timeout_from_env",
    "torchrun_command",
    "unwrap_model",
    "wrap_ddp",
]
