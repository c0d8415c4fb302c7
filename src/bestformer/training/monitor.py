"""Health of a training run: per-layer firing rates of the spiking neurons, and dead / saturated layers.

Firing rates are sampled cheaply: forward hooks sit on every spiking neuron only while the monitor samples (one
training step in ``monitor_every``), so a trained model keeps none (it pickles, and a second Trainer on it adds no
second set). A neuron module is recognised by the library's neuron contract (its ``forward`` takes
``return_state``: LIF, ternary, multi-level, ...); ReLU layers of ANN counterparts are not spiking and are not
monitored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..layers.memory import recomputing
from ..neurons import is_spiking_neuron


class FiringRateMonitor:
    """Counts, per neuron layer, the fraction of outputs that are spikes (non-zero) while :meth:`sampling`.

    ``rates()`` gives ``{layer: rate}`` over everything counted since the last :meth:`reset`; a layer that
    never fired is *dead*, one that fired at every position and step is *saturated*.
    """

    def __init__(self, model: nn.Module) -> None:
        self._fired: dict[str, Tensor] = {}
        self._total: dict[str, int] = {}
        self._neurons = [(name, m) for name, m in model.named_modules() if is_spiking_neuron(m)]
        self._names = [name for name, _ in self._neurons]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, Tensor | tuple], None]:
        def hook(_: nn.Module, __: tuple, out: Tensor | tuple) -> None:
            if recomputing():  # a checkpointed block re-run in backward: its spikes were counted in forward
                return
            s = out[0] if isinstance(out, tuple) else out
            s = s.detach()
            fired = torch.count_nonzero(s)
            self._fired[name] = self._fired[name] + fired if name in self._fired else fired
            self._total[name] = self._total.get(name, 0) + s.numel()
        return hook

    @property
    def num_layers(self) -> int:
        return len(self._names)

    @contextmanager
    def sampling(self, on: bool = True) -> Iterator[None]:
        """Count during the enclosed forward pass when ``on`` (the hooks are on the neurons only meanwhile)."""
        handles = [m.register_forward_hook(self._hook(name)) for name, m in self._neurons] if on else []
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{layer: (spikes, positions)}`` counted so far (one device sync), for every spiking layer (``(0, 0)``
        where nothing was counted): the same keys on every rank, whichever micro-batches a rank sampled."""
        return {k: (int(self._fired.get(k, 0)), self._total.get(k, 0)) for k in self._names}

    def load(self, counts: dict[str, tuple[int, int] | list[int]]) -> None:
        """Continue from :meth:`counts` saved earlier (a run resumed in the middle of an epoch)."""
        self.reset()
        for k, (fired, total) in counts.items():
            self._fired[k] = torch.tensor(int(fired))
            self._total[k] = int(total)

    def rates(self) -> dict[str, float]:
        return {k: fired / total for k, (fired, total) in self.counts().items() if total}

    def reset(self) -> None:
        self._fired.clear()
        self._total.clear()


def layer_health(counts: dict[str, tuple[int, int]]) -> tuple[list[str], list[str]]:
    """``(dead, saturated)`` layer names: no spike at all, or a spike at every position and step."""
    dead = [k for k, (fired, total) in counts.items() if total and fired == 0]
    saturated = [k for k, (fired, total) in counts.items() if total and fired == total]
    return dead, saturated
