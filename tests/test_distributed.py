"""Scale-out training (bestformer.training.distributed): sharding, loss weighting, DDP on gloo, crashes, resume.

The multi-process tests fork ranks from a launcher subprocess (this file run as a script) that joins a gloo
process group through torchrun's environment variables; one test goes through torchrun itself. Every subprocess
has a hard timeout.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from bestformer import create_model
from bestformer.errors import ConfigError, InputError
from bestformer.training.distill import HardDistillation
from bestformer.training.distributed import (
    BatchPlan,
    DistContext,
    DistributedError,
    ShardedBatchSampler,
    ShardedSampler,
    all_reduce_sums,
    collective_errors,
    distributed,
    gradient_sync,
    init_distributed,
    plan_batches,
    position_from_samples,
    prepare_teacher,
    read_launch_env,
    remove_option,
    torchrun_command,
    unwrap_model,
    wrap_ddp,
)

HERE = Path(__file__).resolve()
#: a tiny BESTformer for 8x8 digits: 2x2 tokens, T=2 (and an ANN teacher of the same layout)
TINY = dict(img_size=8, in_channels=1, embed_dim=16, num_heads=2, pool_stages=(False, False, True, True))
#: the student's neurons on the plain torch path: the compiled CPU kernels run an OpenMP pool that a child forked
#: after its first use cannot run (the multi-process tests fork their ranks after a warm-up)
PLAIN = {"time_steps": 2, "neuron_kwargs": {"backend": "plain"}}


# ------------------------------------------------------------------------------------------ sampler (pure)
def _plans(n: int, b: int, a: int, w: int, seed: int = 0, epoch: int = 0, start: int = 0):
    out = []
    for r in range(w):
        s = ShardedBatchSampler(n, b, a, w, r, seed=seed)
        s.set_epoch(epoch, start)
        out.append(list(s.micro_batches()))
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 90), b=st.integers(1, 7), a=st.integers(1, 3), w=st.integers(1, 5), seed=st.integers(0, 9))
def test_every_sample_exactly_once_per_epoch(n: int, b: int, a: int, w: int, seed: int) -> None:
    plans = _plans(n, b, a, w, seed)
    order = ShardedBatchSampler(n, b, a, w, 0, seed=seed).order()
    g = b * a * w
    # the same number of micro-batches on every rank (DDP / SyncBatchNorm need matching collectives)
    assert len({len(p) for p in plans}) == 1
    real = [i for p in plans for mb in p for i in mb.indices[: mb.count]]
    assert sorted(real) == list(range(n))  # no duplicates, no losses
    for step in range(-(-n // g)):
        got = sorted(i for p in plans for mb in p if mb.step == step for i in mb.indices[: mb.count])
        assert got == sorted(order[step * g:(step + 1) * g].tolist())  # step i = positions [iG, (i+1)G)
        mbs = [mb for p in plans for mb in p if mb.step == step]
        # DDP averages over w ranks: the loss weights make the step's gradient the mean over its samples
        assert sum(mb.loss_weight for mb in mbs) / w == pytest.approx(1.0)
        assert all(mb.step_count == len(got) for mb in mbs)
    for p in plans:
        assert [mb.last for mb in p] == [j == a - 1 for _ in range(-(-n // g)) for j in range(a)]
        assert all(len(mb.indices) == max(mb.count, 1) for mb in p)
        assert all(mb.count <= b for mb in p)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 80), b=st.integers(1, 5), s=st.sampled_from([1, 2, 4, 6]), seed=st.integers(0, 5))
def test_micro_batches_do_not_depend_on_world_size(n: int, b: int, s: int, seed: int) -> None:
    """Same global batch and batch size -> the same micro-batches however the slots are spread over ranks."""

    def slots(w: int) -> list[tuple[int, tuple[int, ...]]]:
        return sorted((mb.step, mb.indices[: mb.count]) for p in _plans(n, b, s // w, w, seed) for mb in p)

    ref = slots(1)
    for w in (d for d in (2, 3, 6) if s % d == 0):
        assert slots(w) == ref


def test_uneven_last_step_and_filler_by_hand() -> None:
    # 7 samples, batch 2, 2 ranks x 2 accumulation: G = 8 > 7, slots of 2, 2, 2, 1
    plans = _plans(7, 2, 2, 2, seed=3)
    order = ShardedBatchSampler(7, 2, 2, 2, 0, seed=3).order().tolist()
    r0, r1 = plans
    assert [mb.indices for mb in r0] == [tuple(order[0:2]), tuple(order[4:6])]  # slots 0 and 2
    assert [mb.indices for mb in r1] == [tuple(order[2:4]), tuple(order[6:7])]  # slots 1 and 3
    assert [mb.loss_weight for mb in r0 + r1] == [2 * 2 / 7, 2 * 2 / 7, 2 * 2 / 7, 1 * 2 / 7]
    # 3 samples over 4 slots: the empty slot (rank 1, micro-batch 1) gets a zero-weight filler
    r0, r1 = _plans(3, 1, 2, 2)
    assert [mb.count for mb in r0 + r1] == [1, 1, 1, 0]
    assert r1[1].loss_weight == 0.0 and len(r1[1].indices) == 1
    # one sample, four ranks: ranks 1-3 only run fillers
    assert [p[0].count for p in _plans(1, 1, 1, 4)] == [1, 0, 0, 0]


def test_order_is_seeded_per_epoch_and_identical_across_ranks() -> None:
    s0, s1 = ShardedBatchSampler(50, 4, 1, 2, 0, seed=7), ShardedBatchSampler(50, 4, 1, 2, 1, seed=7)
    for e in (0, 1):
        s0.set_epoch(e)
        s1.set_epoch(e)
        assert s0.order().tolist() == s1.order().tolist()
    s0.set_epoch(0)
    first = s0.order().tolist()
    s0.set_epoch(1)
    assert s0.order().tolist() != first
    assert sorted(first) == list(range(50))
    other = ShardedBatchSampler(50, 4, 1, 2, 0, seed=8)
    assert other.order().tolist() != first
    # (seed 0, epoch 1) and (seed 1, epoch 0) are different streams (not seed + epoch)
    a, b = ShardedBatchSampler(50, 4, seed=0), ShardedBatchSampler(50, 4, seed=1)
    a.set_epoch(1)
    assert a.order().tolist() != b.order().tolist()
    assert ShardedBatchSampler(5, 2, shuffle=False).order().tolist() == [0, 1, 2, 3, 4]


def test_sampler_feeds_a_dataloader_and_resumes_on_another_world_size() -> None:
    data = TensorDataset(torch.arange(23.0))
    s = ShardedBatchSampler(data, 2, 2, 2, 1, seed=1)  # G = 8: steps of 8, 8, 7
    got = [batch[0].tolist() for batch in DataLoader(data, batch_sampler=s)]
    assert got == [[float(i) for i in mb.indices] for mb in s.micro_batches()]
    assert len(s) == len(got) == 6
    assert s.steps_per_epoch == 3
    # 2 ranks x 2 accumulation -> 1 rank x 4 accumulation after 16 samples: the remaining step is the same
    single = ShardedBatchSampler(data, 2, 4, 1, 0, seed=1)
    assert single.resume(16) == 0 and single.start_step == 2
    rest = sorted(i for mb in single.micro_batches() for i in mb.indices[: mb.count])
    assert rest == sorted(s.order()[16:].tolist())
    assert len(single) == 4
    assert single.resume(23 * 3 + 8) == 3 and single.start_step == 1


def test_position_from_samples() -> None:
    assert position_from_samples(0, 100, 32) == (0, 0)
    assert position_from_samples(64, 100, 32) == (0, 2)
    assert position_from_samples(100, 100, 32) == (1, 0)  # an epoch ends with the short step
    assert position_from_samples(232, 100, 32) == (2, 1)
    with pytest.raises(ConfigError, match="not a step boundary of global batch 32"):
        position_from_samples(48, 100, 32)
    with pytest.raises(ConfigError, match="samples seen"):
        position_from_samples(-1, 100, 32)


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(InputError, match="map-style"):
        ShardedBatchSampler(iter(range(3)), 2)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="empty"):
        ShardedBatchSampler([], 2)
    with pytest.raises(ConfigError, match=r"rank must be an integer in \[0, 2\)"):
        ShardedBatchSampler(10, 2, world_size=2, rank=2)
    with pytest.raises(ConfigError, match="batch size"):
        ShardedBatchSampler(10, 0)
    with pytest.raises(ConfigError, match="seed"):
        ShardedBatchSampler(10, 2, seed=-1)
    s = ShardedBatchSampler(10, 2)
    with pytest.raises(ConfigError, match="start step 6"):
        s.set_epoch(0, 6)


def test_eval_sampler_contiguous_blocks() -> None:
    blocks = [list(ShardedSampler(10, 3, r)) for r in range(3)]
    assert blocks == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [len(ShardedSampler(2, 3, r)) for r in range(3)] == [0, 1, 1]


def test_plan_batches() -> None:
    assert plan_batches(512, 4) == BatchPlan(512, 128, 1, 4)
    assert plan_batches(512, 2, batch_size=128) == BatchPlan(512, 128, 2, 2)
    assert plan_batches(512, 4, accum_steps=2) == BatchPlan(512, 64, 2, 4)
    assert plan_batches(512, 1, batch_size=128).slots == 4
    with pytest.raises(ConfigError, match="cannot be split evenly over 3 processes"):
        plan_batches(512, 3)
    with pytest.raises(ConfigError, match=r"128 per process, not a multiple of batch size 48; choose a batch size"):
        plan_batches(512, 4, batch_size=48)
    with pytest.raises(ConfigError, match=r"= 64, not the global batch 512"):
        plan_batches(512, 2, batch_size=16, accum_steps=2)


# ---------------------------------------------------------------------------------------- loss weighting
def test_sharded_loss_weights_reproduce_the_global_batch_gradient() -> None:
    """Simulated ranks (no processes): summing the weighted micro-batch gradients and dividing by the world
    size, as DDP does, gives the gradient of the mean loss over the step, fillers and uneven step included.
    Eq. 15's loss with the teacher run on each shard only; float64, BatchNorm frozen (per-micro-batch statistics
    are the subject of the multi-process test)."""
    torch.manual_seed(0)
    student = create_model("bestformer_tiny", **PLAIN, **TINY).double()
    teacher = create_model("ann_tiny", **TINY).double()
    for m in student.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.eval()
    distiller = HardDistillation(teacher)
    x, y = torch.rand(11, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (11,))

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return [g.clone() for g in torch.autograd.grad(loss, list(student.parameters()))]

    w, a, b = 3, 2, 2  # G = 12 > 11: one uneven step with 6 slots of 2, 2, 2, 2, 2, 1
    idx = torch.tensor(ShardedBatchSampler(11, b, a, w, 0, seed=5).order())
    ref = grads(distiller(x[idx], y[idx], student(x[idx])))
    total = [torch.zeros_like(g) for g in ref]
    for p in _plans(11, b, a, w, seed=5):
        for mb in p:
            i = list(mb.indices)
            g = grads(distiller(x[i], y[i], student(x[i])) * mb.loss_weight)
            total = [t + gi / w for t, gi in zip(total, g)]
    for t, r in zip(total, ref):
        torch.testing.assert_close(t, r, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ single-process paths
def test_single_process_context_and_wrappers(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, ctx, sync_bn=True) is model  # nothing to synchronize in one process
    assert unwrap_model(model) is model
    assert all_reduce_sums({"b": 2, "a": 1.5}) == {"a": 1.5, "b": 2.0}
    teacher = prepare_teacher(nn.Linear(2, 2), ctx)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with gradient_sync(model, False):
        pass
    with pytest.raises(ConfigError, match="seconds > 0"):
        init_distributed("cpu", timeout_s=0)


def test_sync_batchnorm_needs_cuda() -> None:
    ctx = DistContext(rank=0, world_size=2, backend="gloo")
    with pytest.raises(ConfigError, match="SyncBatchNorm runs on CUDA only"):
        wrap_ddp(nn.BatchNorm1d(3), ctx, sync_bn=True)


def test_launch_environment_errors() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert read_launch_env(env) == (1, 2, 1)
    assert read_launch_env({}) is None
    with pytest.raises(ConfigError, match="MASTER_PORT is not set: start the run with torchrun"):
        read_launch_env({k: v for k, v in env.items() if k != "MASTER_PORT"})
    with pytest.raises(ConfigError, match="LOCAL_RANK is not set"):
        read_launch_env({k: v for k, v in env.items() if k != "LOCAL_RANK"})
    with pytest.raises(ConfigError, match="RANK=2 must be below WORLD_SIZE=2"):
        read_launch_env({**env, "RANK": "2"})
    with pytest.raises(ConfigError, match="WORLD_SIZE must be an integer, got 'two'"):
        read_launch_env({**env, "WORLD_SIZE": "two"})


def test_backend_failures_become_one_line() -> None:
    ctx = DistContext(rank=1, world_size=4, backend="gloo", timeout_s=30)
    gloo = ("[/x/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1. "
            "This is typically caused by a remote worker crashing.\nmore")
    with pytest.raises(DistributedError) as info, collective_errors(ctx):
        raise RuntimeError(gloo)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("rank 1 of 4 lost contact with the other processes (Connection closed by peer")
    assert "30 s timeout" in msg
    with pytest.raises(DistributedError, match=r"\(Ranks 2 failed to pass monitoredBarrier in 30000 ms\);"), \
            collective_errors(ctx):
        raise RuntimeError("[/x/ProcessGroupGloo.cpp:67] [Rank 1]: Ranks 2 failed to pass monitoredBarrier in "
                           "30000 ms")
    for other in ("shape mismatch", "DataLoader timed out after 5 seconds"):  # not the network: unchanged
        with pytest.raises(RuntimeError, match=other), collective_errors(ctx):
            raise RuntimeError(other)
    with pytest.raises(RuntimeError, match="Connection closed"), collective_errors(DistContext()):
        raise RuntimeError(gloo)  # single process: nothing to translate


def test_launcher_command_line() -> None:
    assert remove_option(["train", "--nproc", "2", "--epochs=3", "--nproc=4", "-x"], "--nproc") == \
        ["train", "--epochs=3", "-x"]
    cmd = torchrun_command(2, ["train", "--epochs", "1"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:] == ["--standalone", "--nproc_per_node=2", "-m", "bestformer", "train", "--epochs", "1"]
    with pytest.raises(ConfigError, match="--nproc must be an integer >= 1"):
        torchrun_command(0, [])


# -------------------------------------------------------------------------------------- multi-process runs
@functools.cache
def _digits(n: int) -> TensorDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n] / 16.0, dtype=torch.float32).unsqueeze(1)
    return TensorDataset(x, torch.tensor(d.target[:n]))


class _Recorder(Dataset):
    """Remembers which indices this process loaded."""

    def __init__(self, data: Dataset) -> None:
        self.data, self.seen = data, []

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        self.seen.append(int(i))
        return self.data[i]


def _run(cfg: dict[str, Any], ctx: DistContext, out: Path) -> dict[str, Any]:
    """A few steps of Eq. 15 distillation on digits with DDP, sharded batches and accumulation. Returns the
    per-step global losses, the loaded and planned indices and the final parameters."""
    torch.manual_seed(cfg["seed"])
    model = create_model("bestformer_tiny", **PLAIN, **TINY)
    teacher = create_model("ann_tiny", **TINY)
    if cfg.get("frozen_bn"):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.eval()
    net = wrap_ddp(model, ctx)
    distiller = HardDistillation(prepare_teacher(teacher, ctx))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    data = _Recorder(_digits(cfg["n"]))
    plan = plan_batches(cfg["global_batch"], ctx.world_size, batch_size=cfg["batch_size"])
    sampler = ShardedBatchSampler.for_context(data, plan, ctx, seed=cfg["seed"])
    seen = 0
    if cfg.get("resume_from"):
        state = torch.load(cfg["resume_from"])
        unwrap_model(net).load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        seen = state["samples_seen"]
        sampler.resume(seen)
    else:
        sampler.set_epoch(0)
    losses, planned, step_loss = [], [], 0.0
    for mb, (x, y) in zip(sampler.micro_batches(), DataLoader(data, batch_sampler=sampler), strict=True):
        planned.append([list(mb.indices), mb.count])
        fault = cfg.get("faults", {}).get(str(ctx.rank)) if mb.step == cfg.get("fault_step") else None
        if fault == "hang":  # alive but stuck (or busy elsewhere) for two minutes
            time.sleep(120)
        if fault:
            raise SystemExit(3)
        with gradient_sync(net, mb.last):
            loss = distiller(x, y, net(x))
            (loss * mb.loss_weight).backward()
        step_loss += loss.item() * mb.count
        if mb.last:
            opt.step()
            opt.zero_grad()
            losses.append(all_reduce_sums({"loss": step_loss})["loss"] / mb.step_count)
            step_loss = 0.0
            seen += mb.step_count
            if seen == cfg.get("save_at") and ctx.is_main:
                torch.save({"model": unwrap_model(net).state_dict(), "opt": opt.state_dict(), "samples_seen": seen},
                           out / "mid.pt")
    params = {k: v.detach().clone() for k, v in unwrap_model(net).named_parameters()}
    buffers = {k: v.detach().clone() for k, v in unwrap_model(net).named_buffers()}
    return {"losses": losses, "seen": data.seen, "planned": planned, "params": params, "buffers": buffers}


def _rank_main(rank: int, world: int, port: int, cfgs: list[dict[str, Any]], out: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    t0 = time.monotonic()
    try:
        with distributed("cpu", timeout_s=cfgs[0].get("timeout_s", 60)) as ctx:
            results = [_run(cfg, ctx, out) for cfg in cfgs]
        torch.save(results, out / f"rank{rank}.pt")
    except DistributedError as err:
        (out / f"rank{rank}.err").write_text(json.dumps({"error": str(err), "after_s": time.monotonic() - t0}))
        raise SystemExit(1) from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warm_up(cfgs: list[dict[str, Any]]) -> None:
    """Pay the one-time costs once, before forking (the ranks inherit them): the digits, DDP's lazy import of
    torch._dynamo, the first forward/backward of both models."""
    import torch._dynamo  # noqa: F401

    for cfg in cfgs:
        _digits(cfg["n"])
    x = _digits(cfgs[0]["n"]).tensors[0][:2]
    for name, kw in (("bestformer_tiny", PLAIN), ("ann_tiny", {})):
        out = create_model(name, **kw, **TINY)(x)
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()


def _fork_ranks(world: int, cfgs: list[dict[str, Any]], out: Path) -> list[int | None]:
    """Fork ``world`` ranks that join one gloo group through torchrun's variables; their exit codes. When one
    fails, the others get 5 s to fail on their own, then are killed (what torchrun's agent would do)."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = [multiprocessing.get_context("fork").Process(target=_rank_main, args=(r, world, port, cfgs, out))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        if any(p.exitcode for p in procs):
            deadline = min(deadline, time.monotonic() + 5)
        time.sleep(0.05)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


#: the multi-process scenarios, run by one launcher subprocess (its start-up is the expensive part)
LIVE = {"n": 35, "global_batch": 16, "batch_size": 4, "seed": 3, "save_at": 16}
FROZEN = {"n": 40, "global_batch": 16, "batch_size": 8, "seed": 4, "frozen_bn": True}
FAULT = {"n": 24, "global_batch": 8, "batch_size": 4, "seed": 0, "fault_step": 1, "timeout_s": 3}
JOBS = {"equivalence": [LIVE, FROZEN], "exit": [{**FAULT, "faults": {"1": "exit"}}],
        "hang": [{**FAULT, "faults": {"1": "hang"}}]}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[int | None], Path]]:
    """Every scenario of :data:`JOBS` on 2 forked gloo ranks: ``name -> (exit codes, output folder)``."""
    out = tmp_path_factory.mktemp("ranks")
    proc = subprocess.run([sys.executable, str(HERE), json.dumps({"jobs": JOBS, "out": str(out)})],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: (codes[name], out / name) for name in JOBS}


def _single(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """The same run in this process, no process group."""
    return _run(cfg, DistContext(), out)


def test_two_processes_match_one_process_and_resume_on_one(two_ranks: dict[str, Any]) -> None:
    """2 gloo ranks x 2 micro-batches of 4 = global batch 16 against one process accumulating 4 micro-batches of
    4: the same micro-batches, so the same BatchNorm batch statistics (per micro-batch) and gradients. 35 digits:
    steps of 16, 16, 3 (the last one with a filler slot). The 2-process run saves after 16 samples and one
    process resumes from there with accumulation 4. A second pair of runs freezes BatchNorm (running
    statistics) and compares 2 x 8 with one batch of 16. SGD, not Adam: Adam's ``g / sqrt(v)`` turns last-bit
    differences of near-zero gradient entries into differences of order ``lr``."""
    codes, out = two_ranks["equivalence"]
    assert codes == [0, 0]
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]

    ref = _single({**LIVE, "save_at": None}, out)
    dist_live = ranks[0][0]
    assert len(dist_live["losses"]) == 3
    torch.testing.assert_close(torch.tensor(dist_live["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=1e-5)
    for k, v in ref["params"].items():
        torch.testing.assert_close(dist_live["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # every sample exactly once across ranks; fillers are the only repeats, and each rank loaded its plan
    real = []
    for r in range(2):
        run = ranks[r][0]
        assert run["seen"] == [i for idx, _ in run["planned"] for i in idx]
        real += [i for idx, count in run["planned"] for i in idx[:count]]
    assert sorted(real) == list(range(35))
    assert sum(count == 0 for r in range(2) for _, count in ranks[r][0]["planned"]) == 1
    # resume on one process with accumulation 4 after the 2-process run's first step
    resumed = _single({**LIVE, "resume_from": str(out / "mid.pt"), "save_at": None}, out)
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(ref["losses"][1:]), rtol=0, atol=1e-5)
    for k, v in ref["params"].items():
        torch.testing.assert_close(resumed["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)

    # frozen BatchNorm: 2 ranks x 8 equal one batch of 16 (parameters and buffers)
    ref_frozen = _single({**FROZEN, "batch_size": 16}, out)
    torch.testing.assert_close(torch.tensor(ranks[1][1]["losses"]), torch.tensor(ref_frozen["losses"]),
                               rtol=0, atol=1e-5)
    for k, v in {**ref_frozen["params"], **ref_frozen["buffers"]}.items():
        torch.testing.assert_close({**ranks[1][1]["params"], **ranks[1][1]["buffers"]}[k], v,
                                   rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_a_failing_rank_stops_the_others_with_a_clear_error(two_ranks: dict[str, Any], fault: str) -> None:
    """Without torchrun's agent: rank 1 exits (or stalls) in step 1; rank 0's next collective fails at once
    (dead peer) or after the 3 s timeout (stalled peer) with one DistributedError line, instead of hanging."""
    codes, out = two_ranks[fault]
    assert codes[0] == 1
    err = json.loads((out / "rank0.err").read_text())
    assert err["error"].startswith("rank 0 of 2 lost contact with the other processes (")
    assert "3 s timeout" in err["error"] and "\n" not in err["error"]
    assert err["after_s"] < 40
    if fault == "hang":
        assert "Timed out" in err["error"] and err["after_s"] >= 3
        assert codes[1] is None  # still asleep: the launcher killed it
    else:
        assert codes[1] == 3


def test_torchrun_stops_all_workers_when_one_fails(tmp_path: Path) -> None:
    """Under torchrun, rank 1 fails while rank 0 computes for two minutes: the agent stops rank 0 and exits
    non-zero within seconds, naming the failed rank."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HERE),
         json.dumps({"torchrun": True})],
        capture_output=True, text=True, timeout=100, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 60
    out = proc.stdout + proc.stderr
    assert "rank      : 1" in out and "exitcode  : 3" in out


def _torchrun_worker() -> None:
    with distributed("cpu", timeout_s=60) as ctx:
        all_reduce_sums({"ready": 1.0})  # both ranks are up
        if ctx.rank == 1:
            raise SystemExit(3)
        time.sleep(120)  # busy elsewhere, no collective: only the agent can stop it


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    if job.get("torchrun"):
        _torchrun_worker()
    else:
        _warm_up([cfg for cfgs in job["jobs"].values() for cfg in cfgs])
        root = Path(job["out"])
        print(json.dumps({name: _fork_ranks(2, cfgs, root / name) for name, cfgs in job["jobs"].items()}))
