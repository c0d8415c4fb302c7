"""CSDformer (seed 004): the conversion-oriented ANN (``ann``), its converted spike-driven model (``snn``) and the
registration of the ``csd_*`` family, whose entries build either form."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...errors import ConfigError
from .._registry import InputConfig, build_model, register_family
from .ann import CSDMLP, CSDStemStage, CSDTransformer, NReLUAttention, frames_option, token_grid
from .snn import SpikingCSD, SpikingCSDMLP, SpikingNReLUAttention, SpikingStemStage, convert

__all__ = [
    "CSDMLP",
    "CSDStemStage",
    "CSDTransformer",
    "NReLUAttention",
    "SpikingCSD",
    "SpikingCSDMLP",
    "SpikingNReLUAttention",
    "SpikingStemStage",
    "convert",
    "token_grid",
]

_SIZES: dict[str, tuple[dict[str, Any], InputConfig]] = {
    "tiny": (dict(embed_dim=64, depth=1, num_heads=4), InputConfig(28, 1, 10, 1, "mnist")),
    "4_384": (dict(embed_dim=384, depth=4, num_heads=8), InputConfig(32, 3, 10, 1, "cifar10")),
    "8_512": (dict(embed_dim=512, depth=8, num_heads=8), InputConfig(224, 3, 1000, 1, "imagenet")),
}


def _build(cls: type[nn.Module], name: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> nn.Module:
    """The ANN; with ``spiking={"time_steps": T, "delay": d}`` its converted spike-driven model, which is how a
    converted checkpoint is rebuilt by ``load_checkpoint`` (its weights are then loaded). The data pipeline's
    ``time_steps`` (a model's input frames) is this family's ``input_frames``."""
    spiking = overrides.pop("spiking", None)
    defaults = {("input_frames" if k == "time_steps" else k): v for k, v in defaults.items()}
    if "time_steps" in overrides:
        overrides["input_frames"] = frames_option(overrides.get("input_frames", 1), overrides.pop("time_steps"))
    ann = build_model(cls, name, defaults, overrides)
    if spiking is None:
        return ann
    if not isinstance(spiking, dict) or set(spiking) - {"time_steps", "delay"}:
        raise ConfigError(f"spiking must be a dict with keys 'time_steps' and 'delay', got {spiking!r}")
    return convert(ann.eval(), **spiking)


register_family(CSDTransformer, "csd", _SIZES, title="CSDformer", build=_build, extra_options=("spiking", "time_steps"),
                note="; with spiking=dict(time_steps=T, delay=d), its converted spike-driven model")
