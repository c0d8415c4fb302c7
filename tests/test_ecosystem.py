"""Fitting the ecosystem (issue 23): ONNX export checked by onnxruntime, TensorBoard logs read back with
TensorBoard's own reader, tonic interop checked against tonic's ToFrame, and output that reads well in a log."""

from __future__ import annotations

import csv
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bestformer
from bestformer.cli import main
from bestformer.data.events import Events, events_to_frames
from bestformer.data.tonic_interop import from_structured, from_tonic, to_structured
from bestformer.errors import ConfigError, InputError
from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
NMNIST = SHARED_DATA / "nmnist" / "nmnist-small.tar.gz"
pytestmark = pytest.mark.usefixtures("plain_neurons")


# ------------------------------------------------------------------------------------------------- ONNX
def _digits(n: int = 359) -> torch.Tensor:
    bundle = bestformer.build_datasets("digits", None)
    return torch.stack([bundle.test[i][0] for i in range(min(n, len(bundle.test)))])


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


#: |onnxruntime - PyTorch| on the logits (measured: at most 2.4e-6 on the digits test split)
ONNX_ATOL = 1e-4


@pytest.mark.parametrize("name", ["bestformer_tiny.digits", "ann_tiny.digits"])
def test_onnx_export_of_zoo_models_matches_pytorch_on_real_digits(tmp_path: Path, name: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnx")
    out = tmp_path / "m.onnx"
    assert main(["export", f"zoo:{name}", "--format", "onnx", "-o", str(out)]) == 0
    assert "dynamic batch" in capsys.readouterr().out
    model, _ = bestformer.load_pretrained(name)
    for x in (_digits(), _digits(1)):  # the whole test split, and a batch of one: the batch size is dynamic
        got = _run_onnx(out, x)
        with torch.no_grad():
            ref = model(x).numpy()
        assert got.shape == ref.shape
        assert (got.argmax(1) == ref.argmax(1)).all() and np.abs(got - ref).max() <= ONNX_ATOL


def test_onnx_graph_holds_exact_binary_weights_and_no_batchnorm(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from bestformer.deploy.onnx_export import export_onnx

    model, _ = bestformer.load_pretrained("bestformer_tiny.digits")
    graph = onnx.load(str(export_onnx(model, tmp_path / "m.onnx"))).graph
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    convs = [n for n in graph.node if n.op_type == "Conv"]
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    binary = [inits[n.input[1]] for n in convs[1:] if n.input[1] in inits]  # every conv after the first is 1-bit
    assert binary and all(set(np.unique(w).tolist()) <= {-1.0, 1.0} for w in binary)


def test_onnx_export_of_a_converted_csdformer_and_event_models(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from bestformer.convert import convert
    from bestformer.deploy.onnx_export import export_onnx

    torch.manual_seed(0)
    snn = convert(bestformer.create_model("csd_tiny", img_size=8, in_channels=1).eval())
    x = _digits(64)
    got = _run_onnx(export_onnx(snn, tmp_path / "csd.onnx"), x)
    with torch.no_grad():
        ref = snn(x).numpy()
    assert (got.argmax(1) == ref.argmax(1)).all() and np.abs(got - ref).max() <= ONNX_ATOL
    event = bestformer.create_model("bestformer_tiny", img_size=8, in_channels=2, time_steps=4).eval()
    frames = torch.poisson(torch.full((4, 3, 2, 8, 8), 0.5))  # event counts [T, B, C, H, W]
    got = _run_onnx(export_onnx(event, tmp_path / "ev.onnx", events=True), frames)
    with torch.no_grad():
        ref = event(frames).numpy()
    assert np.abs(got - ref).max() <= ONNX_ATOL


def test_onnx_export_traces_plain_neurons_whatever_backend_the_model_asks_for(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from bestformer.deploy.onnx_export import export_onnx
    from bestformer.neurons import LIF, use_backend

    torch.manual_seed(0)
    model = bestformer.create_model("bestformer_tiny", img_size=8, neuron_kwargs={"backend": "fused"}).eval()
    x = _digits(16)
    with use_backend("fused"):  # a scope and a per-module backend: the exporter met the compiled kernel before
        got = _run_onnx(export_onnx(model, tmp_path / "f.onnx"), x)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(got - ref).max() <= ONNX_ATOL
    assert {m.backend for m in model.modules() if isinstance(m, LIF)} == {"fused"}  # the model is left as it was


def test_onnx_export_of_what_it_cannot_express_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from bestformer.deploy.onnx_export import export_onnx

    with pytest.raises(ConfigError, match="does not declare in_channels / img_size"):
        export_onnx(torch.nn.Linear(3, 2), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


# ------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_logs_read_back_with_tensorboards_reader(tmp_path: Path) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from bestformer.pipeline import train
    from bestformer.training import TrainConfig

    cfg = TrainConfig(dataset="digits", limit=64, epochs=2, batch_size=32, out=str(tmp_path), name="tb",
                      log="tensorboard", model_args={"embed_dim": 16}, monitor_every=1, neuron_backend="plain")
    run = train(cfg).run_dir
    events = accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr", "firing_rate/mean",
            "profile/energy_uJ", "profile/sops"} <= tags
    assert any(t.startswith("firing_rate/blocks.0.attn") for t in tags)
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    for tag, column in (("accuracy/val", "val_acc"), ("loss/train", "train_loss"), ("lr", "lr")):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2]
        assert [e.value for e in logged] == pytest.approx([float(r[column]) for r in rows], rel=1e-5)
    assert (run / "metrics.csv").is_file() and (run / "curves.png").is_file()  # the defaults stay


# ------------------------------------------------------------------------------------------------- tonic
def _recording(seed: int, n: int = 500) -> Events:
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, 30_000, n))
    return Events(rng.integers(0, 34, n), rng.integers(0, 34, n), rng.integers(0, 2, n), t)


def _recordings() -> list[Events]:
    if not NMNIST.is_file():
        return [_recording(s) for s in range(3)]
    test = bestformer.build_datasets("nmnist", str(NMNIST), limit=8).test
    return [test.events(i) for i in range(8)]


def test_structured_arrays_round_trip() -> None:
    ev = _recording(0)
    arr = to_structured(ev)
    assert arr.dtype.names == ("x", "y", "t", "p")
    back = from_structured(arr)
    assert all(np.array_equal(getattr(back, f), getattr(ev, f)) for f in ("x", "y", "p", "t"))
    with pytest.raises(InputError, match="missing \\['p'\\]"):
        from_structured(np.zeros(3, dtype=[("x", "i2"), ("y", "i2"), ("t", "i8")]))


@pytest.mark.parametrize("time_steps", [4, 7])
def test_framing_by_event_count_equals_tonic_but_for_the_remainder(time_steps: int) -> None:
    """Frames 0..T-2 identical to tonic's ToFrame(n_event_bins=T); our last frame also holds the last N mod T
    events, which tonic drops."""
    tt = pytest.importorskip("tonic.transforms")
    for ev in _recordings():
        theirs = tt.ToFrame(sensor_size=(34, 34, 2), n_event_bins=time_steps)(to_structured(ev)).astype(np.float32)
        ours = events_to_frames(ev.x, ev.y, ev.p, ev.t, time_steps, 34, 34, "number").numpy()
        assert np.array_equal(ours[:-1], theirs[:-1])
        rest = len(ev.t) % time_steps
        tail = np.zeros((2, 34, 34), np.float32)
        if rest:
            np.add.at(tail, (ev.p[-rest:], ev.y[-rest:], ev.x[-rest:]), 1)
        assert np.array_equal(ours[-1] - theirs[-1], tail)


def test_framing_by_time_equals_tonic_when_the_windows_coincide() -> None:
    """With a span divisible by T both windows are span/T; tonic's are half-open and drop the events at the end
    of the span, ours keep them in the last frame."""
    tt = pytest.importorskip("tonic.transforms")
    t_steps = 4
    for ev in _recordings():
        t0 = ev.t.min()
        end = ev.t[(ev.t - t0) % t_steps == 0].max()  # the last event time that makes the span divisible by T
        keep = ev.t <= end
        ev = Events(*(a[keep] for a in ev))
        theirs = tt.ToFrame(sensor_size=(34, 34, 2), n_time_bins=t_steps)(to_structured(ev)).astype(np.float32)
        ours = events_to_frames(ev.x, ev.y, ev.p, ev.t, t_steps, 34, 34, "time").numpy()
        last = ev.t == ev.t.max()
        tail = np.zeros((2, 34, 34), np.float32)
        np.add.at(tail, (ev.p[last], ev.y[last], ev.x[last]), 1)
        assert np.array_equal(ours[:-1], theirs[:-1]) and np.array_equal(ours[-1] - theirs[-1], tail)


@pytest.mark.data
def test_event_datasets_take_a_tonic_transform() -> None:
    tt = pytest.importorskip("tonic.transforms")
    if not NMNIST.is_file():
        pytest.skip("needs ../shared/data/nmnist")
    plain = bestformer.build_datasets("nmnist", str(NMNIST), limit=4).test
    framed = bestformer.build_datasets("nmnist", str(NMNIST), limit=4,
                                       event_transform=tt.ToFrame(sensor_size=(34, 34, 2), n_event_bins=4)).test
    x, y = framed[0]
    assert x.shape == (4, 2, 34, 34) and x.dtype == torch.float32 and y == plain[0][1]
    theirs = tt.ToFrame(sensor_size=(34, 34, 2), n_event_bins=4)(to_structured(plain.events(0)))
    assert torch.equal(x, torch.from_numpy(np.asarray(theirs, np.float32))) and x.sum() > 0
    dropped = bestformer.build_datasets("nmnist", str(NMNIST), limit=4,
                                        event_transform=tt.DropEvent(p=1.0)).test
    assert dropped[0][0].sum() == 0  # events in, events out: framed by us
    with pytest.raises(ConfigError, match="event_transform applies to the event datasets"):
        bestformer.build_datasets("digits", None, event_transform=tt.DropEvent(p=0.5))


def test_a_tonic_dataset_becomes_a_bestformer_dataset() -> None:
    class FakeTonic:  # the interface of tonic.datasets.*: items (structured events, target), sensor_size
        sensor_size = (34, 34, 2)

        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
            return to_structured(_recording(i)), i

    ds = from_tonic(FakeTonic(), time_steps=4)
    x, y = ds[2]
    ev = _recording(2)
    assert y == 2 and torch.equal(x, events_to_frames(ev.x, ev.y, ev.p, ev.t, 4, 34, 34, "number"))
    with pytest.raises(InputError, match="2-polarity sensor_size"):
        from_tonic(FakeTonic(), sensor_size=(34, 34, 1))


# ------------------------------------------------------------------------------------------- output
def test_piped_output_has_no_carriage_returns(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("BESTFORMER_PROGRESS", None)
    proc = subprocess.run([sys.executable, "-m", "bestformer", "train", "--epochs", "1", "--teacher-epochs", "1",
                           "--limit", "64", "--out", str(tmp_path), "--name", "log"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    assert proc.stdout.count("epoch 1: train loss") == 2  # one line per epoch (teacher, student)


def test_top_level_help_is_a_complete_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1].replace("\n", " ")
    assert description.endswith(".") and "exposing" not in description and "``" not in description


def test_packed_model_is_callable(tmp_path: Path) -> None:
    from bestformer.deploy import export_packed
    from bestformer.deploy.runtime import PackedModel

    model, _ = bestformer.load_pretrained("bestformer_tiny.digits")
    pm = PackedModel.load(export_packed(model, tmp_path / "m.bst"))
    x = _digits(8).numpy()
    assert np.array_equal(pm(x), pm.predict(x))


def test_license_metadata_is_an_spdx_expression() -> None:
    meta = importlib.metadata.metadata("bestformer")
    assert meta.get("License-Expression") == "MIT"
    assert 'license = "MIT"' in (REPO / "pyproject.toml").read_text()


@pytest.mark.data
def test_onnx_export_of_the_nmnist_zoo_model_takes_event_frames(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnx")
    if not NMNIST.is_file():
        pytest.skip("needs ../shared/data/nmnist")
    out = tmp_path / "ev.onnx"
    assert main(["export", "zoo:bestformer_tiny.nmnist", "--format", "onnx", "-o", str(out)]) == 0
    assert "[T, B, C, H, W] event frames" in capsys.readouterr().out
    test = bestformer.build_datasets("nmnist", str(NMNIST)).test
    frames = torch.stack([test[i][0] for i in range(len(test))], dim=1)  # [T, B, 2, 34, 34], the real test split
    model, _ = bestformer.load_pretrained("bestformer_tiny.nmnist")
    got = _run_onnx(out, frames)
    with torch.no_grad():
        ref = model(frames).numpy()
    assert (got.argmax(1) == ref.argmax(1)).all() and np.abs(got - ref).max() <= ONNX_ATOL


def test_tensorboard_continues_after_a_resume(tmp_path: Path) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from bestformer.pipeline import resume, train
    from bestformer.training import TrainConfig

    cfg = TrainConfig(dataset="digits", limit=64, epochs=1, batch_size=32, out=str(tmp_path), name="tb",
                      log="tensorboard", model_args={"embed_dim": 16}, neuron_backend="plain", monitor_every=0)
    run = train(cfg).run_dir
    resume(run, epochs=3)
    events = accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("accuracy/val")] == [1, 2, 3]  # each epoch once, across both processes


def test_tensorboard_keeps_the_epochs_when_a_finished_run_resumes_for_its_summary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash during the final evaluation leaves the epochs done and no summary: the resume evaluates and
    profiles, and must not purge the epochs it did not rewrite (it purged them all)."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from bestformer.pipeline import resume, train
    from bestformer.pipeline import run as run_module
    from bestformer.training import TrainConfig

    def crash(*args: object) -> None:
        raise OSError("the machine went down")

    cfg = TrainConfig(dataset="digits", limit=64, epochs=2, batch_size=32, out=str(tmp_path), name="tb",
                      log="tensorboard", model_args={"embed_dim": 16}, neuron_backend="plain", monitor_every=0)
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "evaluate_best", crash)
        with pytest.raises(OSError, match="went down"):
            train(cfg)
    run = tmp_path / "tb"
    assert not (run / "summary.json").exists()
    resume(run)
    events = accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2]
    assert [e.step for e in events.Scalars("profile/sops")] == [2]


def test_torch_func_grad_equals_autograd_on_the_plain_path() -> None:
    # torch.func refuses autograd Functions without setup_context (the spike's was one) and saved-tensor hooks
    # (spike packing); the numba kernels cannot read its wrapped tensors: the documented recipe is the plain
    # backend with packing off (and BatchNorm in eval mode, as for any torch.func use)
    from bestformer.neurons import use_backend

    torch.manual_seed(0)
    model = bestformer.create_model("bestformer_tiny", img_size=8, embed_dim=16, num_heads=2, depth=1,
                                    in_channels=1, num_classes=3).eval()
    model.set_spike_packing(False)
    x = torch.rand(4, 1, 8, 8) * 4  # strong enough input that spikes fire and every branch carries gradient
    buffers = dict(model.named_buffers())

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, {**params, **buffers}, (x,)).square().sum()

    with use_backend("plain"):
        grads = torch.func.grad(loss)({k: v.detach() for k, v in model.named_parameters()})
        loss(dict(model.named_parameters())).backward()
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name, param in model.named_parameters():
        want = param.grad if param.grad is not None else torch.zeros_like(param)
        assert torch.equal(grads[name], want), name
