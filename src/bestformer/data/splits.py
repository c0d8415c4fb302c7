"""Seeded, stratified splits and the sample order of every split.

Split policy (ours; the papers are silent except where noted): a held-out split published with a dataset is
its test split and is never used for selection; the validation split is always carved from the training data,
stratified by class, with a seeded generator, so the same seed gives the same split on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, FileFormatError, InputError


def _per_class(labels: np.ndarray) -> list[np.ndarray]:
    """Positions of each class in ``labels`` (ascending), for the classes that occur, in class order."""
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    return np.split(order, starts[1:]) if len(classes) else []


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..N-1`` into ``(rest, carved)`` with ``round(N * fraction)`` carved samples.

    Each class gives ``floor(n_c * fraction)`` samples, and the remaining quota goes to the classes with the
    largest remainders (ties broken by the seeded generator): the largest-remainder method, so the class
    proportions of both parts match the whole to within one sample. A class never gives its last sample.
    Which samples of a class are carved is a seeded permutation. Both arrays are sorted ascending.
    """
    labels = np.asarray(labels)
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"split fraction must be in [0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    groups = _per_class(labels)
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    quota = sizes * fraction
    take = np.minimum(np.floor(quota).astype(np.int64), np.maximum(sizes - 1, 0))
    short = int(np.floor(labels.size * fraction + 0.5)) - int(take.sum())
    if short > 0:
        room = np.flatnonzero(take < sizes - 1)
        tiebreak = rng.random(len(room))
        ranked = room[np.lexsort((tiebreak, -(quota[room] - take[room])))]
        take[ranked[:short]] += 1
    carved = [g[rng.permutation(len(g))[:k]] for g, k in zip(groups, take)]
    carved_idx = np.sort(np.concatenate(carved)) if carved else np.zeros(0, dtype=np.int64)
    mask = np.ones(labels.size, dtype=bool)
    mask[carved_idx] = False
    return np.flatnonzero(mask), carved_idx


def interleave_classes(indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Order ``indices`` round-robin over classes (class order, then ascending index within a class).

    Our choice: any prefix of a split is then class-balanced, so ``limit`` gives a usable subset even for
    datasets stored class by class (folders), and the order does not depend on how the files were listed.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        return indices
    groups = [indices[g] for g in _per_class(labels[indices])]
    rank = np.concatenate([np.arange(len(g)) for g in groups])
    cls = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)])
    return np.concatenate(groups)[np.lexsort((cls, rank))]


def first_per_class(indices: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` of ``indices`` (in their given order) of each class, kept in their given order."""
    indices = np.asarray(indices, dtype=np.int64)
    seen: dict[int, int] = {}
    keep = np.zeros(indices.size, dtype=bool)
    for i, lab in enumerate(labels[indices].tolist()):
        if seen.get(lab, 0) < n:
            seen[lab] = seen.get(lab, 0) + 1
            keep[i] = True
    return indices[keep]


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    """Labels as int64, each in ``[0, num_classes)``; a :class:`FileFormatError` names the first bad one."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise FileFormatError(f"{source}: labels must be a 1-D list of integers, got {labels.dtype} "
                              f"of shape {labels.shape}")
    labels = labels.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise FileFormatError(f"{source}: label {int(labels[bad[0]])} of sample {int(bad[0])} is out of range; "
                              f"expected 0..{num_classes - 1} ({num_classes} classes)")
    return labels


@dataclass(frozen=True)
class SplitPlan:
    """Sample indices (into one pool of labelled samples) of each split, in the order the datasets use."""

    train: np.ndarray
    val: np.ndarray | None
    test: np.ndarray | None

    def needed(self) -> np.ndarray:
        """Every index used by some split, sorted (what a loader must decode)."""
        parts = [p for p in (self.train, self.val, self.test) if p is not None]
        return np.unique(np.concatenate(parts))


def plan_splits(labels: np.ndarray, train_pool: np.ndarray, test_pool: np.ndarray | None, *,
                val_fraction: float, seed: int, limit: int | None = None, max_per_class: int | None = None,
                class_names: list[str] | None = None, val_pool: np.ndarray | None = None) -> SplitPlan:
    """Carve the validation split from ``train_pool`` and order and cap every split.

    ``max_per_class`` first keeps the first ``n`` samples of each class of each published split (pool order).
    Then the validation split is carved (:func:`stratified_split`, ``val_fraction`` of the training pool; none
    when 0), unless the data publishes one (``val_pool``), which is then used as it is. Every split is ordered
    by :func:`interleave_classes` and capped to its first ``limit`` samples. With ``class_names``, every class
    must keep at least one training sample.
    """
    labels = np.asarray(labels)
    pools = [np.asarray(p, dtype=np.int64) if p is not None else None for p in (train_pool, val_pool, test_pool)]
    if max_per_class is not None:
        pools = [first_per_class(p, labels, max_per_class) if p is not None else None for p in pools]
    train_pool, val_pool, test_pool = pools
    if train_pool.size == 0:
        raise InputError("the training split is empty")
    if class_names is not None:
        present = set(np.unique(labels[train_pool]).tolist())
        missing = [name for i, name in enumerate(class_names) if i not in present]
        if missing:
            raise InputError(f"class {missing[0]!r} has no training samples ({len(missing)} of "
                             f"{len(class_names)} classes are empty)")
    if val_pool is None:
        rest, carved = stratified_split(labels[train_pool], val_fraction, seed)
        if val_fraction > 0 and carved.size == 0:
            raise InputError(f"val_fraction={val_fraction} of {train_pool.size} training samples leaves an "
                             "empty validation split; raise val_fraction or use more data")
        train_pool, val_pool = train_pool[rest], (train_pool[carved] if val_fraction > 0 else None)
    cap = slice(None) if limit is None else slice(0, limit)
    train, val, test = (interleave_classes(p, labels)[cap] if p is not None else None
                        for p in (train_pool, val_pool, test_pool))
    for name, split in (("validation", val), ("test", test)):
        if split is not None and split.size == 0:
            raise InputError(f"the {name} split is empty")
    return SplitPlan(train, val, test)  # type: ignore[arg-type]
