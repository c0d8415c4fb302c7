"""The model contract (bestformer.models.base.BaseModel), checked once for every registered model."""

from __future__ import annotations

import pytest
import torch

import bestformer
from bestformer import ConfigError, InputError
from bestformer.models import BaseModel, CSDTransformer, QSDTransformer, SpikingTransformer

# a small build of each class (the data options are overridden alike below)
SMALL = {
    SpikingTransformer: dict(embed_dim=32, depth=1, num_heads=2, stem_widths=None, pool_stages=None),
    QSDTransformer: dict(embed_dims=(8, 16, 16, 16), conv_depths=(1, 1, 1), depths=(1, 1), num_heads=2),
    CSDTransformer: dict(embed_dim=32, depth=1, num_heads=2),
}
DATA = dict(img_size=16, in_channels=2, num_classes=10, time_steps=2)


def _build(name: str) -> BaseModel:
    with torch.device("meta"):
        cls = type(bestformer.create_model(name))
    torch.manual_seed(0)
    return bestformer.create_model(name, **SMALL[cls], **DATA)


def test_every_registered_model_is_covered() -> None:
    names = bestformer.list_models()
    assert len(names) >= 37
    with torch.device("meta"):
        classes = {type(bestformer.create_model(n)) for n in names}
    assert classes == set(SMALL)


@pytest.mark.parametrize("name", bestformer.list_models())
def test_model_contract(name: str) -> None:
    model = _build(name)
    assert isinstance(model, BaseModel)
    assert model.model_name == name and SMALL[type(model)].items() <= model.model_args.items()
    assert (model.num_classes, model.in_channels, model.img_size, model.time_steps) == (10, 2, 16, 2)
    assert "num_classes=10" in repr(model)
    x = torch.randn(3, 2, 16, 16)

    # training mode: every parameter gets a finite gradient
    out = model(x)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(o.shape == (3, 10) and torch.isfinite(o).all() for o in outs)
    sum(o.pow(2).sum() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without gradient: {missing}"

    # eval mode: forward is forward_head(forward_features); pre_logits is the mean over streams
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        streams = 2 if getattr(model, "reversible", False) else 1
        assert feats.shape == (3, streams, model.num_features)
        assert torch.equal(model.forward_head(feats), model(x))
        assert torch.equal(model.forward_head(feats, pre_logits=True), feats.mean(dim=1))
        assert model(torch.rand(2, 3, 2, 16, 16)).shape == (3, 10)  # event frames [T, B, C, H, W]
        for bad, what in ((torch.randn(3, 1, 16, 16), "channels"), (torch.randn(3, 2, 12, 12), "img_size"),
                          (torch.randn(3, 3, 2, 16, 16), "time_steps"), (torch.randn(2, 16, 16), "shape"),
                          (torch.ones(3, 2, 16, 16, dtype=torch.long), "floating"),
                          (x.double(), "input is torch.float64 but the model's weights are torch.float32")):
            with pytest.raises(InputError, match=what):
                model(bad)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast reconciles the two dtypes, except float64
            assert model(x.bfloat16()).shape == (3, 10)
            with pytest.raises(InputError, match="input is torch.float64"):
                model(x.double())
        model.reset_classifier(4)
        assert model(x).shape == (3, 4)
        heads = model.get_classifier()  # timm's accessor: the head(s) reset_classifier made
        heads = heads if isinstance(heads, tuple) else (heads,)
        assert heads[0] is model.head and all(h(feats.mean(dim=1)).shape == (3, 4) for h in heads)
        assert len(heads) == (2 if getattr(model, "head_dist", None) is not None else 1)
        model.reset_classifier(0)
        assert model(x).shape == (3, model.num_features)


@pytest.mark.parametrize("name", ["bestformer_tiny", "qsd_tiny", "csd_tiny", "a2os2a_tiny"])
def test_options_are_checked(name: str) -> None:
    with pytest.raises(ConfigError, match="has no option 'embed_dimm'"):
        bestformer.create_model(name, embed_dimm=3)
    with pytest.raises(ConfigError, match="num_heads must be an integer >= 1, got 0"):
        bestformer.create_model(name, num_heads=0)
    with pytest.raises(ConfigError, match="img_size must be an integer >= 1, got True"):
        bestformer.create_model(name, img_size=True)


@pytest.mark.parametrize("name", bestformer.list_models())
def test_input_config_matches_the_default_build(name: str) -> None:
    cfg = bestformer.get_input_config(name)
    with torch.device("meta"):
        model = bestformer.create_model(name)
    assert (model.img_size, model.in_channels, model.num_classes, model.time_steps) == (
        cfg.img_size, cfg.in_channels, cfg.num_classes, cfg.time_steps)


@pytest.mark.parametrize("name", ["bestformer_tiny", "qsd_tiny", "csd_tiny"])
def test_a_new_head_is_saved_with_the_model_and_no_head_gives_features(name: str, tmp_path) -> None:
    """timm's fine-tuning flow: ``reset_classifier`` then save; the checkpoint rebuilds the new head. ``num_classes=0``
    builds a model without a head, whose forward returns ``[B, D]`` features in both modes (the distillation head
    included: two identities are not two logits)."""
    model = _build(name)
    if isinstance(model, SpikingTransformer):
        torch.manual_seed(0)
        model = bestformer.create_model(name, **SMALL[SpikingTransformer], **DATA, distill_head=True)
    model.reset_classifier(5)
    assert model.model_args["num_classes"] == 5
    path = bestformer.save_checkpoint(model.eval(), tmp_path / "m.safetensors")
    loaded, _ = bestformer.load_checkpoint(path)
    x = torch.randn(3, 2, 16, 16)
    with torch.no_grad():
        assert loaded.num_classes == 5 and torch.equal(loaded(x), model(x))
    loaded.reset_classifier(0)
    for train in (True, False):
        out = loaded.train(train)(x)
        assert isinstance(out, torch.Tensor) and out.shape == (3, loaded.num_features)
    headless = bestformer.create_model(name, **{**DATA, "num_classes": 0}, **SMALL[type(model)])
    assert headless.num_classes == 0 and headless.eval()(x).shape == (3, headless.num_features)
    for bad in (-1, 2.0, True):
        with pytest.raises(ConfigError, match=f"num_classes must be an integer >= 0.*got {bad!r}"):
            loaded.reset_classifier(bad)
        with pytest.raises(ConfigError, match="num_classes must be an integer >= 0"):
            bestformer.create_model(name, num_classes=bad)
    assert loaded.num_classes == 0  # the refusals changed nothing


@pytest.mark.parametrize("name", ["bestformer_tiny", "qsd_tiny", "csd_tiny"])
def test_mlp_ratio_is_checked(name: str) -> None:
    for bad in (-1, 0, 0.001, float("nan"), float("inf"), True, "4"):
        with pytest.raises(ConfigError, match="mlp_ratio must be a finite number"):
            bestformer.create_model(name, mlp_ratio=bad)


@pytest.mark.parametrize("name", ["bestformer_tiny", "a2os2a_tiny", "qsd_tiny", "csd_tiny"])
def test_scales_are_checked(name: str) -> None:
    # a NaN attention scale built a model whose attention never fired (a neuron reads NaN as "no spike")
    for bad in (float("nan"), float("inf"), 0.0, -0.5, True, "0.1"):
        with pytest.raises(ConfigError, match="attn_scale must be a finite number > 0"):
            bestformer.create_model(name, attn_scale=bad)
    for bad in (float("nan"), float("-inf"), None):
        with pytest.raises(ConfigError, match="layer_scale_init must be a finite number"):
            bestformer.create_model("qsd_tiny", layer_scale_init=bad)
    assert bestformer.create_model("qsd_tiny", layer_scale_init=0.0).model_args["layer_scale_init"] == 0.0


def test_a_converted_model_refuses_a_new_head_and_keeps_its_own() -> None:
    from bestformer.models.csd import convert

    snn = convert(_build("csd_tiny").eval())
    head = snn.head
    with pytest.raises(ConfigError, match="a converted model's head is its ANN's"):
        snn.reset_classifier(5)
    assert snn.num_classes == 10 and snn.head is head


def test_a_checkpoint_saved_after_a_new_head_by_an_older_version_loads_with_num_classes(tmp_path) -> None:
    """``reset_classifier`` used to leave ``model_args`` at the old count: such a file (weights of 5 classes, a
    header of 10) loads with ``num_classes=5``, as it did then, instead of getting yet another head."""
    model = _build("bestformer_tiny")
    model.reset_classifier(5)
    model.model_args["num_classes"] = 10  # what the older version recorded
    path = bestformer.save_checkpoint(model.eval(), tmp_path / "old.safetensors")
    loaded, _ = bestformer.load_checkpoint(path, num_classes=5)
    x = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_the_mlp_check_is_of_the_blocks_that_exist() -> None:
    small = dict(embed_dims=(4, 16, 16, 16), conv_depths=(0, 1, 1), depths=(1, 1), num_heads=2, mlp_ratio=0.3)
    assert bestformer.create_model("qsd_tiny", **small).num_features == 16  # no block at width 2
    with pytest.raises(ConfigError, match="mlp_ratio"):
        bestformer.create_model("qsd_tiny", **{**small, "conv_depths": (1, 1, 1)})
