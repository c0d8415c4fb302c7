"""Time budgets (ours, for time-to-accuracy training): durations, the time-step schedule, and the plan that fits
a run's optimizer steps into a wall-clock budget.

A budgeted run (``--time-budget 60m``) measures how long a training step takes at each ``T`` of its time-step
schedule and how long one validation pass takes, on the real data, on this machine, after the data are loaded
(and after a teacher is trained: the teacher's time is spent from the same budget). It then fixes the number of
optimizer steps so that the steps, one validation per epoch and the final evaluation fill what is left, less a
small reserve. The step count is stored in the run's config (``max_steps``), so the learning-rate and time-step
schedules are functions of the step alone: a resumed run continues the same plan. A deadline guards the budget
when the machine turns out slower than measured: training then stops early and says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError

_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|sec|m|min|h)?\s*")
_UNIT_SECONDS = {None: 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
#: the longest budget accepted (30 days): anything longer is a typo, not a plan
MAX_BUDGET_S = 30 * 24 * 3600.0


def parse_duration(text: str | float | int) -> float:
    """Seconds of a duration: ``"60m"``, ``"1.5h"``, ``"900s"`` or a number of seconds."""
    match = _DURATION.fullmatch(str(text))
    if match is None:
        raise ConfigError(f"time budget must be a duration such as 60m, 1.5h or 900s, got {text!r}")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_BUDGET_S):
        raise ConfigError(f"time budget must be more than 0 s and at most 30 days, got {text!r}")
    return seconds


@dataclass(frozen=True)
class TimeStepSchedule:
    """Phases ``(T, fraction of the optimizer steps)``, in order; the last phase's ``T`` is the evaluation's."""

    phases: tuple[tuple[int, float], ...]

    @property
    def final(self) -> int:
        return self.phases[-1][0]

    @property
    def time_steps(self) -> list[int]:
        return list(dict.fromkeys(t for t, _ in self.phases))

    def boundaries(self, total_steps: int) -> list[int]:
        """The first step of each phase after the first (rounded to whole steps)."""
        out, acc = [], 0.0
        for _, frac in self.phases[:-1]:
            acc += frac
            out.append(round(acc * total_steps))
        return out

    def at(self, step: int, total_steps: int) -> int:
        """``T`` of optimizer step ``step`` (0-based) in a run of ``total_steps`` steps."""
        for (t, _), start_next in zip(self.phases, self.boundaries(total_steps)):
            if step < start_next:
                return t
        return self.final

    def mean_step_seconds(self, step_seconds: Mapping[int, float]) -> float:
        """Seconds per step averaged over the phases."""
        return sum(frac * step_seconds[t] for t, frac in self.phases)


def parse_time_step_schedule(spec: str | None, final: int | None = None) -> TimeStepSchedule:
    """``"1:0.6,4:0.4"`` (``T:fraction`` pairs whose fractions sum to 1) or a single ``"4"``. ``final`` (the
    model's ``T``) must be the last phase's ``T``: evaluation runs at it."""
    if spec is None or not str(spec).strip():
        if final is None:
            raise ConfigError("an empty time-step schedule needs the model's time steps")
        return TimeStepSchedule(((final, 1.0),))
    phases = []
    for part in str(spec).split(","):
        t_txt, sep, frac_txt = part.strip().partition(":")
        try:
            t = int(t_txt)
            frac = float(frac_txt) if sep else 1.0
        except ValueError:
            raise ConfigError(f"time-step schedule {spec!r}: expected T:fraction pairs such as 1:0.6,4:0.4") from None
        if t < 1 or not (math.isfinite(frac) and 0 < frac <= 1):
            raise ConfigError(f"time-step schedule {spec!r}: T must be >= 1 and each fraction in (0, 1], got "
                              f"{part.strip()!r}")
        phases.append((t, frac))
    total = sum(f for _, f in phases)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"time-step schedule {spec!r}: the fractions sum to {total:g}, expected 1")
    sched = TimeStepSchedule(tuple(phases))
    if final is not None and sched.final != final:
        raise ConfigError(f"time-step schedule {spec!r} ends at T={sched.final} but the model runs T={final}; "
                          f"its last phase must be T={final} (evaluation uses the model's T)")
    if final is not None and max(sched.time_steps) > final:
        raise ConfigError(f"time-step schedule {spec!r} exceeds the model's T={final}")
    return sched


@dataclass(frozen=True)
class BudgetPlan:
    """How a budget is spent: measured costs, then the planned steps (``total_steps``) and epochs."""

    budget_s: float
    elapsed_s: float
    step_s: dict[int, float]
    eval_s: float
    final_s: float
    reserve_s: float
    steps_per_epoch: int
    total_steps: int
    evaluations: int

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["step_s"] = {str(k): v for k, v in self.step_s.items()}
        out["epochs"] = self.epochs
        return out

    def describe(self) -> str:
        steps = ", ".join(f"T={t}: {s:.3f} s" for t, s in sorted(self.step_s.items()))
        return (f"budget {self.budget_s / 60:.1f} min: {self.elapsed_s:.0f} s spent before training, a step takes "
                f"{steps}, a validation {self.eval_s:.1f} s -> {self.total_steps} steps ({self.epochs:.2f} epochs "
                f"of {self.steps_per_epoch}), {self.evaluations} validations, {self.final_s:.0f} s for the final "
                f"evaluation, {self.reserve_s:.0f} s reserve")


def plan_budget(budget_s: float, elapsed_s: float, step_seconds: Mapping[int, float], schedule: TimeStepSchedule,
                steps_per_epoch: int, eval_s: float, final_s: float, reserve: float = 0.02) -> BudgetPlan:
    """The most steps that fit: ``elapsed + steps * mean_step + epochs * eval + final + reserve <= budget``, with
    one validation at the end of every (possibly partial) epoch. ``reserve`` is a fraction of the budget."""
    if steps_per_epoch < 1:
        raise ConfigError("the training split gives no step per epoch")
    for t in schedule.time_steps:
        if not (t in step_seconds and math.isfinite(step_seconds[t]) and step_seconds[t] > 0):
            raise ConfigError(f"no valid step time measured for T={t}")
    per_step = schedule.mean_step_seconds(step_seconds)
    reserve_s = reserve * budget_s
    avail = budget_s - elapsed_s - final_s - reserve_s
    steps = max(0, math.floor(avail / (per_step + eval_s / steps_per_epoch)))
    while steps > 0 and steps * per_step + math.ceil(steps / steps_per_epoch) * eval_s > avail:
        steps -= 1  # the epoch count is rounded up: make the last partial epoch's validation fit too
    if steps < 1:
        need = elapsed_s + per_step + eval_s + final_s + reserve_s
        raise ConfigError(f"time budget {budget_s:.0f} s is too small: {elapsed_s:.0f} s went to loading data "
                          f"(and the teacher), one step and one validation need {per_step + eval_s:.1f} s more; "
                          f"give at least {math.ceil(need)} s")
    return BudgetPlan(budget_s, elapsed_s, dict(step_seconds), eval_s, final_s, reserve_s, steps_per_epoch, steps,
                      math.ceil(steps / steps_per_epoch))


def planned_seconds(step_s: Mapping[int, float], schedule: TimeStepSchedule, start: int, stop: int,
                    total_steps: int) -> float:
    """Planned seconds of steps ``[start, stop)`` in a run of ``total_steps`` steps (each phase at its ``T``)."""
    edges = [0, *schedule.boundaries(total_steps), max(total_steps, stop)]
    seconds = 0.0
    for (t, _), lo, hi in zip(schedule.phases, edges[:-1], edges[1:]):
        seconds += max(0, min(hi, stop) - max(lo, start)) * step_s[t]
    return seconds


def refit_steps(step_s: Mapping[int, float], schedule: TimeStepSchedule, done: int, total_steps: int,
                slowdown: float, overhead_s: float, left_s: float, steps_per_epoch: int, epochs_done: int) -> int:
    """Re-plan after an epoch from what it really cost: the largest step count whose remaining steps (at the planned
    step times times ``slowdown``, the measured / planned ratio of the epoch just run) and remaining end-of-epoch
    passes (``overhead_s`` each: validation, checkpoint, logs) fit in ``left_s``. At least ``done`` (stop now)."""

    def cost(total: int) -> float:
        evals = max(0, math.ceil(total / steps_per_epoch) - epochs_done)
        return slowdown * planned_seconds(step_s, schedule, done, total, total) + evals * overhead_s

    lo, hi = done, done + max(1, math.ceil(left_s / (slowdown * min(step_s.values()))))
    while lo < hi:  # the largest total with cost(total) <= left_s (cost grows with total)
        mid = (lo + hi + 1) // 2
        if cost(mid) <= left_s:
            lo = mid
        else:
            hi = mid - 1
    return lo
