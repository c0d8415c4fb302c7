"""The model zoo (issue 17): every shipped entry loads with its hash checked and reproduces the accuracy its
manifest records on a fixed slice of its data, exactly; 1-bit weights are stored as bits and restore the trained
binary weights exactly; a packed export of a zoo model equals PyTorch; the Hub layout round-trips, offline and
against a mocked hub client."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import bestformer
from bestformer import zoo
from bestformer.cli import main
from bestformer.errors import ConfigError, FileFormatError
from bestformer.quant import BinaryLinear
from bestformer.zoo import bits, hub

REPO = Path(__file__).resolve().parents[1]
ENTRIES = bestformer.list_pretrained()
pytestmark = pytest.mark.usefixtures("plain_neurons")


def _data_dir(entry: dict, shared: Path | None) -> str | None:
    """The entry's data folder under ../shared/data (None: digits, bundled with scikit-learn)."""
    if entry["data"] == "scikit-learn digits":
        return None
    if shared is None:
        pytest.skip("needs ../shared/data")
    return str(shared / entry["data"].removeprefix("../shared/data/"))


@pytest.fixture(scope="module")
def shared() -> Path | None:
    from conftest import SHARED_DATA

    return SHARED_DATA if SHARED_DATA.is_dir() else None


def test_the_manifest_lists_the_issue_entries_with_the_required_keys() -> None:
    names = {e["name"] for e in ENTRIES}
    assert {"bestformer_tiny.digits", "bestformer_tiny.mnist", "bestformer_tiny.nmnist", "a2os2a_tiny.mnist",
            "qsd_tiny.mnist", "csd_tiny.mnist", "bestformer_cifar_fast.cifar10", "ann_tiny.mnist"} <= names
    for e in ENTRIES:
        assert {"name", "model", "tag", "dataset", "split", "top1", "file", "sha256", "command", "slice"} <= set(e)
        assert e["name"] == f"{e['model']}.{e['tag']}" and (zoo.ZOO_DIR / e["file"]).is_file()
    mnist = zoo.get_entry("bestformer_tiny.mnist")
    assert mnist["top1"] >= 99.0 and mnist["split"] == "test" and mnist["count"] == 10_000
    cifar = zoo.get_entry("bestformer_cifar_fast.cifar10")
    assert cifar["split"] == "val" and cifar["top1"] == pytest.approx(76.82, abs=0.005)  # the fast recipe's run
    total = sum(f.stat().st_size for f in zoo.ZOO_DIR.rglob("*") if f.is_file())
    assert total < 5e6, total  # small enough to ship in the wheel


@pytest.mark.parametrize("name", [e["name"] for e in ENTRIES])
def test_every_entry_loads_and_reproduces_its_slice_exactly(name: str, shared: Path | None) -> None:
    entry = zoo.get_entry(name)
    model, header = bestformer.load_pretrained(name)
    assert header["model_name"] == entry["model"] and not model.training
    s = entry["slice"]
    assert zoo.slice_accuracy(name, _data_dir(entry, shared), s["split"], s["limit"]) == (s["count"], s["top1"])


def test_an_entry_being_built_is_measured_from_its_folder(tmp_path: Path) -> None:
    """benchmarks/zoo.py measures a folder it just wrote, before the manifest names it (it failed for every entry:
    a new name was unknown, a rebuilt file disagreed with the old manifest's hash)."""
    entry = zoo.get_entry("bestformer_tiny.digits")
    folder = tmp_path / "bestformer_tiny.digits2"
    shutil.copytree(zoo.ZOO_DIR / "bestformer_tiny.digits", folder)
    s = entry["slice"]
    assert zoo.slice_accuracy(folder, None, s["split"], s["limit"]) == (s["count"], s["top1"])


def test_entries_are_copies_of_the_manifest() -> None:
    entry = zoo.get_entry("bestformer_tiny.digits")
    entry["slice"]["top1"], entry["eval"]["flip"] = -1.0, "changed"
    listed = zoo.list_pretrained("bestformer_tiny.digits")[0]
    listed["slice"]["count"] = -1
    again = zoo.get_entry("bestformer_tiny.digits")
    assert again["slice"]["top1"] >= 0 and again["eval"]["flip"] != "changed" and again["slice"]["count"] > 0


def test_a_damaged_or_replaced_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "weights"
    shutil.copytree(zoo.ZOO_DIR / "bestformer_tiny.digits", copy / "bestformer_tiny.digits")
    monkeypatch.setattr(zoo, "ZOO_DIR", copy)
    weights = copy / "bestformer_tiny.digits" / hub.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match=r"bestformer_tiny.digits: .* has SHA-256 .*, the manifest records"):
        bestformer.load_pretrained("bestformer_tiny.digits")
    with pytest.raises(FileFormatError, match="SHA-256 of its tensor data differs"):  # the file's own hash too
        hub.from_pretrained(copy / "bestformer_tiny.digits")


def test_create_model_pretrained_and_its_errors() -> None:
    model = bestformer.create_model("bestformer_tiny", pretrained="digits")
    ref, _ = bestformer.load_pretrained("bestformer_tiny.digits")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    default = bestformer.create_model("bestformer_tiny", pretrained=True)  # the model's default entry: MNIST
    assert default.img_size == 28
    fresh = bestformer.create_model("bestformer_tiny")
    assert not torch.equal(fresh.head.weight, default.head.weight)
    with pytest.raises(ConfigError, match=r"no zoo entry 'bestformer_tiny.mnst' \(did you mean"):
        bestformer.create_model("bestformer_tiny", pretrained="mnst")
    with pytest.raises(ConfigError, match="no pretrained weights for 'spikformer_tiny'"):
        bestformer.create_model("spikformer_tiny", pretrained=True)
    # timm's "model.tag" names: the tag picks the entry with pretrained, and is ignored without it
    tagged = bestformer.create_model("bestformer_tiny.digits", pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(tagged.state_dict().values(), ref.state_dict().values()))
    assert not tagged.training and bestformer.create_model("bestformer_tiny.digits", pretrained="digits").img_size == 8
    untrained = bestformer.create_model("bestformer_tiny.digits")
    assert untrained.training and untrained.img_size == fresh.img_size == 28  # the architecture's own defaults
    with pytest.raises(ConfigError, match="names the tag 'digits' but pretrained='mnist'"):
        bestformer.create_model("bestformer_tiny.digits", pretrained="mnist")
    with pytest.raises(ConfigError, match=r"no zoo entry 'bestformer_tiny.mnst'"):
        bestformer.create_model("bestformer_tiny.mnst", pretrained=True)
    with pytest.raises(ConfigError, match=r"pretrained must be True, False \(or None\) or a tag, got ''"):
        bestformer.create_model("bestformer_tiny", pretrained="")  # was a random model, silently
    # timm's list_models(pretrained=True): the names create_model(name, pretrained=True) loads
    names = bestformer.list_models("bestformer_tiny*", pretrained=True)
    assert names == ["bestformer_tiny.digits", "bestformer_tiny.mnist", "bestformer_tiny.nmnist"]
    assert bestformer.list_models("bestformer_tiny", pretrained=True) == names  # a model's name lists its tags
    assert bestformer.create_model("bestformer_tiny", pretrained=None).training  # None (an argparse default): False
    assert bestformer.list_models("*", pretrained=True) == sorted(e["name"] for e in bestformer.list_pretrained())
    assert bestformer.list_models("bestformer_t*") == ["bestformer_tiny"]  # without it: the architectures
    with pytest.raises(ConfigError, match="pretrained must be True or False"):
        bestformer.list_models(pretrained="yes")


# ------------------------------------------------------------------------------------- bits, exactly
def test_binary_weights_are_stored_as_bits_and_restore_the_trained_binary_weights() -> None:
    torch.manual_seed(0)
    model = bestformer.create_model("bestformer_tiny", img_size=8, in_channels=1, embed_dim=16, num_heads=2).eval()
    with torch.no_grad():  # latent weights with a large mean: the rebuilt ones must still binarize the same
        for name, _q in bits.binary_weights(model).items():
            model.get_parameter(name).add_(3.0)
    tensors, packed = bits.pack_state(model)
    binary = bits.binary_weights(model)
    assert set(packed) == set(binary) and len(binary) > 5
    for key, shape in packed.items():
        n = torch.Size(shape).numel()
        assert tensors[key + bits.BITS].dtype == torch.uint8 and tensors[key + bits.BITS].numel() == (n + 7) // 8
        assert key not in tensors
    restored = bestformer.create_model("bestformer_tiny", img_size=8, in_channels=1, embed_dim=16, num_heads=2).eval()
    restored.load_state_dict(bits.unpack_state(tensors, packed, "test"))
    for key, q in binary.items():
        assert torch.equal(q.codes(model.get_parameter(key))[0], q.codes(restored.get_parameter(key))[0]), key
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))  # bit-identical evaluation
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert stored < full / 3


def test_a_binary_layer_with_one_weight_per_channel_packs_and_restores() -> None:
    model = nn.Sequential(BinaryLinear(1, 5), BinaryLinear(5, 2))
    tensors, packed = bits.pack_state(model)
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    restored = nn.Sequential(BinaryLinear(1, 5), BinaryLinear(5, 2))
    restored.load_state_dict(bits.unpack_state(tensors, packed, "test"))
    x = torch.randn(3, 1)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


def test_unpacking_checks_the_file_before_allocating() -> None:
    model = bestformer.create_model("bestformer_tiny", img_size=8, in_channels=1, embed_dim=16, num_heads=2)
    tensors, packed = bits.pack_state(model)
    key = next(iter(packed))
    with pytest.raises(FileFormatError, match="does not match its shape"):
        bits.unpack_state(tensors, {**packed, key: [10**6, 10**3]}, "f")
    with pytest.raises(FileFormatError, match="invalid shape"):
        bits.unpack_state(tensors, {**packed, key: [-1]}, "f")


def test_a_packed_export_of_a_zoo_model_equals_pytorch(tmp_path: Path) -> None:
    from test_deploy import assert_same_spikes, packed

    model, _ = bestformer.load_pretrained("bestformer_tiny.digits")
    bundle = bestformer.build_datasets("digits", None, limit=32)
    x = torch.stack([bundle.test[i][0] for i in range(16)])
    assert_same_spikes(model, packed(model), x)
    from bestformer.deploy import export_packed
    from bestformer.deploy.runtime import PackedModel

    pm = PackedModel.load(export_packed(model, tmp_path / "m.bst"))
    with torch.no_grad():
        assert (pm.predict(x.numpy()).argmax(1) == model(x).numpy().argmax(1)).all()


# -------------------------------------------------------------------------------------- the command line
def test_zoo_command_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert all(e["name"] in out for e in ENTRIES) and "bestformer eval zoo:NAME" in out
    assert main(["zoo", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listed] == [e["name"] for e in ENTRIES]
    assert all({"name", "model", "tag", "dataset", "split", "top1", "file"} <= set(e) for e in listed)


def test_eval_a_zoo_entry_reproduces_the_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    entry = zoo.get_entry("bestformer_tiny.digits")
    assert main(["eval", "zoo:bestformer_tiny.digits"]) == 0
    assert f"top-1 {entry['top1']:.2f}%" in capsys.readouterr().out


def test_profile_a_zoo_entry_as_eval_and_export_take_it(capsys: pytest.CaptureFixture[str]) -> None:
    entry = zoo.get_entry("bestformer_tiny.digits")
    assert main(["profile", "zoo:bestformer_tiny.digits", "--synthetic", "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    assert profile["model"] == entry["model"] and profile["params"] == entry["params"]


def test_train_init_from_a_zoo_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bestformer.pipeline import train
    from bestformer.training import TrainConfig

    cfg = TrainConfig(dataset="digits", limit=64, epochs=1, lr=1e-9, warmup_lr=1e-9, min_lr=1e-9, batch_size=32,
                      model_args={"embed_dim": 32, "pool_stages": [False, False, False, True],
                                  "neuron_kwargs": {"decay_input": False}},
                      init="zoo:bestformer_tiny.digits", out=str(tmp_path), name="ft", neuron_backend="plain")
    result = train(cfg)
    tuned, _ = bestformer.load_checkpoint(result.run_dir / "last.safetensors")
    start, _ = bestformer.load_pretrained("bestformer_tiny.digits")
    diff = max((a - b).abs().max().item() for a, b in zip(tuned.parameters(), start.parameters()))
    assert diff < 1e-3  # started from the zoo's weights (a 1e-9 learning rate barely moves them)
    with pytest.raises(FileFormatError, match="does not fit this model"):
        train(cfg.replace(model_args={"embed_dim": 16}, name="bad"))
    with_teacher = cfg.replace(teacher="ann_tiny", teacher_epochs=1, name="teacher")  # the teacher is not --init'ed
    assert train(with_teacher).teacher.status == "finished"
    # a checkpoint of another label set: its body, a new head of the dataset's 10 classes (timm's fine-tuning)
    other = bestformer.create_model(start.model_name, **{**start.model_args, "num_classes": 5})
    other.load_state_dict({**start.state_dict(), **{k: v for k, v in other.state_dict().items()
                                                     if k.startswith("head")}})
    path = bestformer.save_checkpoint(other, tmp_path / "five.safetensors")
    capsys.readouterr()
    relabelled = train(cfg.replace(init=str(path), name="five"))
    assert "its 5-class head replaced by a new 10-class one" in capsys.readouterr().out
    tuned, _ = bestformer.load_checkpoint(relabelled.run_dir / "last.safetensors")
    assert tuned.num_classes == 10
    tuned_params = dict(tuned.named_parameters())  # (BatchNorm statistics move whatever the learning rate)
    assert max((tuned_params[k] - p).abs().max().item() for k, p in start.named_parameters()
               if not k.startswith("head")) < 1e-3


def test_the_readme_table_is_the_manifests() -> None:
    assert zoo.markdown_table() in (REPO / "README.md").read_text()


# ---------------------------------------------------------------------------------- the Hub's layout
def test_save_and_from_pretrained_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = bestformer.load_pretrained("bestformer_tiny.digits")
    folder = bestformer.save_pretrained(model, tmp_path / "m", metrics={"top1": 94.7}, command="bestformer train")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: bestformer") and "| top1 | 94.7 |" in card and "bestformer train" in card
    again, _ = bestformer.from_pretrained(folder)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["embed_dim"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileFormatError, match="config.json disagrees with the header embedded in model.safetensors "
                                              "on 'model_args.embed_dim'"):
        bestformer.from_pretrained(folder)
    with pytest.raises(FileFormatError, match="is not a pretrained model folder"):
        bestformer.from_pretrained(tmp_path)
    # a re-save that dies between the weights and the config leaves a folder that loads (the new weights, with their
    # embedded header), never new weights beside the old config
    hub.save_pretrained(model, folder, metrics={"top1": 1.0})
    monkeypatch.setattr(hub, "atomic_write_json", lambda *_: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space left"):
        hub.save_pretrained(model, folder, metrics={"top1": 2.0})
    assert hub.from_pretrained(folder)[1]["meta"]["metrics"] == {"top1": 2.0}


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> types.SimpleNamespace:
    """A stand-in for huggingface_hub: downloads come from, and uploads go to, local folders."""
    calls = types.SimpleNamespace(created=[], uploaded={}, remote=tmp_path / "remote")

    def snapshot_download(repo_id: str, allow_patterns: list[str] | None = None) -> str:
        calls.downloaded = (repo_id, allow_patterns)
        return str(calls.remote / repo_id)

    class HfApi:
        def __init__(self, token: str | None = None) -> None:
            calls.token = token

        def create_repo(self, repo_id: str, private: bool = False, exist_ok: bool = False) -> None:
            calls.created.append((repo_id, private, exist_ok))

        def upload_folder(self, repo_id: str, folder_path: str, commit_message: str) -> str:
            shutil.copytree(folder_path, calls.remote / repo_id)
            calls.uploaded[repo_id] = commit_message
            return f"https://huggingface.co/{repo_id}"

    module = types.ModuleType("huggingface_hub")
    module.snapshot_download, module.HfApi = snapshot_download, HfApi
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    return calls


def test_push_to_hub_and_from_pretrained_hf_hub_with_a_mocked_client(fake_hub: types.SimpleNamespace) -> None:
    model, _ = bestformer.load_pretrained("bestformer_tiny.digits")
    url = bestformer.push_to_hub(model, "org/tiny-digits", token="t", metrics={"top1": 94.7})
    assert url == "https://huggingface.co/org/tiny-digits" and fake_hub.created == [("org/tiny-digits", False, True)]
    assert fake_hub.uploaded["org/tiny-digits"].startswith("bestformer ") and fake_hub.token == "t"
    again, header = bestformer.from_pretrained("hf-hub:org/tiny-digits")
    assert fake_hub.downloaded == ("org/tiny-digits", ["model.safetensors", "config.json", "README.md"])
    assert header["meta"]["metrics"] == {"top1": 94.7}
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    for key, q in bits.binary_weights(model).items():  # the latent statistics survive a second packing
        a, b = model.get_parameter(key).flatten(1), again.get_parameter(key).flatten(1)
        assert torch.allclose(a.mean(1), b.mean(1), atol=1e-6) and torch.allclose(a.std(1), b.std(1), rtol=1e-5)
        assert torch.equal(q.codes(model.get_parameter(key))[0], q.codes(again.get_parameter(key))[0])
    with pytest.raises(ConfigError, match="expected hf-hub:ORG/NAME"):
        bestformer.from_pretrained("hf-hub:no-slash")


def test_without_huggingface_hub_the_error_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'bestformer\[hub\]'"):
        bestformer.from_pretrained("hf-hub:org/name")


def test_pretrained_with_another_num_classes_keeps_the_body_and_gives_a_new_head() -> None:
    ref, _ = bestformer.load_pretrained("bestformer_tiny.digits")
    torch.manual_seed(0)
    five = bestformer.create_model("bestformer_tiny", pretrained="digits", num_classes=5)
    assert five.num_classes == 5 and five.head.weight.shape[0] == 5 and not five.training
    body = {k: v for k, v in ref.state_dict().items() if not k.startswith("head")}
    assert all(torch.equal(five.state_dict()[k], v) for k, v in body.items())
    assert five.model_args["num_classes"] == 5  # saved afterwards, it rebuilds the new head
    # a mistyped option is the caller's, named as the registry names it, not blamed on the file
    with pytest.raises(ConfigError, match="model 'bestformer_tiny' has no option 'num_clases'"):
        bestformer.create_model("bestformer_tiny", pretrained="digits", num_clases=5)
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 0"):
        bestformer.create_model("bestformer_tiny", pretrained="digits", num_classes=-2)
    # pretrained=True gives the class create_model builds (the converted CSD model is a tag of its own)
    assert type(bestformer.create_model("csd_tiny", pretrained=True)) is type(bestformer.create_model("csd_tiny"))
    assert all(sum(e["default"] for e in ENTRIES if e["model"] == m) == 1 for m in {e["model"] for e in ENTRIES})


def test_the_manifest_sizes_are_the_shipped_weights() -> None:
    """``paper_bytes`` (16-bit full precision, the papers' convention), ``params`` and ``binary_params`` of every
    entry, recounted from its weights; ``python benchmarks/zoo.py sizes`` rewrites them after a convention change."""
    from bestformer.analysis.size import model_size

    for entry in ENTRIES:
        model, _ = bestformer.load_pretrained(entry["name"])
        size = model_size(model, deploy=False)
        assert (entry["paper_bytes"], entry["params"], entry["binary_params"]) == \
            (size.paper_bytes, sum(p.numel() for p in model.parameters()), size.binary_params), entry["name"]
    # full precision, as Table 2 counts its Spikformer (29.68 M parameters, 59.36 MB): 2 bytes per parameter
    ann = bestformer.load_pretrained("ann_tiny.mnist")[0]
    assert next(e for e in ENTRIES if e["name"] == "ann_tiny.mnist")["paper_bytes"] == \
        2 * sum(p.numel() for p in ann.parameters()) == 224900
