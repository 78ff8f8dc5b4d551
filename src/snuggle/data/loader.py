"""Train/validation split and deterministic, resumable, distributed batch order.

The training order is a pure function of (train indices, seed, global batch size), so resuming only
needs the step number, and any world size with the same global batch sees the same rows per step.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from snuggle.data.packing import PackedRows
from snuggle.errors import SnuggleError

__all__ = ["BatchPlan", "grad_accum_for", "iterate_eval", "split_indices"]

_PERM_CACHE_SIZE = 4  # a step spans at most two epochs unless the epoch is smaller than a global batch


def split_indices(n_rows: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of `range(n_rows)` into sorted, disjoint (train, val) int64 index arrays.

    Validation gets ceil(val_fraction * n_rows) rows (0 when val_fraction is 0, or when there is only
    one row, which must then go to training).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise SnuggleError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n_rows < 1:
        raise SnuggleError("no training rows: the corpus is too small for one packed row")
    n_val = 0
    if val_fraction > 0 and n_rows >= 2:
        # The epsilon keeps float noise (0.7 * 10 == 7.000000000000001) from adding a row.
        n_val = max(1, math.ceil(val_fraction * n_rows - 1e-9))
    if n_val >= n_rows:
        raise SnuggleError(
            f"val_fraction={val_fraction} leaves no training rows out of {n_rows}: "
            "lower val_fraction or seq_len, or add data"
        )
    rng = np.random.default_rng([seed, n_rows])
    is_val = np.zeros(n_rows, dtype=bool)
    is_val[rng.choice(n_rows, size=n_val, replace=False)] = True
    all_rows = np.arange(n_rows, dtype=np.int64)
    return all_rows[~is_val], all_rows[is_val]


def grad_accum_for(global_rows: int, batch_size: int, world_size: int, named: str) -> int:
    """The micro-batches a step needs for `global_rows` rows a step over `world_size` processes.

    A job restarted on fewer or more processes keeps its global batch (and so its curve) this way;
    `named` is how the user gave the global batch, for the one line when the world cannot divide it.
    """
    per_micro = world_size * batch_size  # rows one micro-batch of every process takes
    if global_rows % per_micro:
        # the world sizes (up to 64 processes) this global batch and batch_size do fit
        fits = [str(w) for w in range(1, 65) if global_rows % (w * batch_size) == 0]
        where = f"or run on {', '.join(fits)} processes" if fits else "none of 1-64 processes fits it"
        raise SnuggleError(
            f"{named} ({global_rows} rows a step) is not a multiple of {world_size} processes x "
            f"train.batch_size={batch_size}: change batch_size, {where}"
        )
    return global_rows // per_micro


class BatchPlan:
    """Which training rows each rank uses at each optimizer step.

    The global row order is epoch 0, epoch 1, ... where each epoch is a seeded permutation of
    `train_indices`. Step s consumes global rows [s*G, (s+1)*G), G = world_size * batch_size * grad_accum;
    rank r takes the r-th contiguous share of those G rows, cut into `grad_accum` micro-batches.
    """

    def __init__(
        self,
        train_indices: Sequence[int] | np.ndarray,
        *,
        batch_size: int,
        grad_accum: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int,
    ) -> None:
        self.train_indices = np.array(train_indices, dtype=np.int64)  # (M,) copied: the plan must not drift
        if self.train_indices.ndim != 1 or self.train_indices.size == 0:
            raise SnuggleError("no training rows to build batches from")
        sizes = {"batch_size": batch_size, "grad_accum": grad_accum, "world_size": world_size}
        for name, value in sizes.items():
            if value < 1:
                raise SnuggleError(f"{name} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise SnuggleError(f"rank must be in [0, {world_size}), got {rank}")
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.global_batch = world_size * batch_size * grad_accum
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def rows_per_epoch(self) -> int:
        return int(self.train_indices.size)

    def steps_for_epochs(self, epochs: float) -> int:
        """Optimizer steps needed to consume `epochs` passes over the training rows (rounded up)."""
        return max(1, math.ceil(epochs * self.rows_per_epoch / self.global_batch - 1e-9))

    def epoch_of(self, step: int) -> int:
        """The epoch that the first row of `step` belongs to."""
        return step * self.global_batch // self.rows_per_epoch

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            # (seed, epoch) seeds one independent stream per epoch; seed + epoch would make run seed=1
            # epoch 0 replay run seed=0 epoch 1.
            rng = np.random.default_rng([self.seed, epoch])
            perm = self.train_indices[rng.permutation(self.rows_per_epoch)]  # (M,)
            self._perms[epoch] = perm
            if len(self._perms) > _PERM_CACHE_SIZE:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(epoch)
        return perm

    def global_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows at positions [start, stop) of the global (all ranks, all epochs) order."""
        m = self.rows_per_epoch
        parts = []
        p = start
        while p < stop:
            epoch, offset = divmod(p, m)
            take = min(m - offset, stop - p)
            parts.append(self._perm(epoch)[offset : offset + take])
            p += take
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """This rank's `grad_accum` arrays of `batch_size` row indices for optimizer step `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        share = self.batch_size * self.grad_accum
        first = step * self.global_batch + self.rank * share
        rows = self.global_rows(first, first + share)  # (A*B,)
        return list(rows.reshape(self.grad_accum, self.batch_size))


def iterate_eval(
    rows: PackedRows,
    indices: Sequence[int] | np.ndarray,
    batch_size: int,
    max_rows: int | None = None,
    *,
    world_size: int = 1,
    rank: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated (B, T) batches of `indices` in order, the last one possibly smaller.

    With world_size > 1, rank r gets the r-th contiguous share of the (possibly truncated) indices.
    """
    if batch_size < 1:
        raise SnuggleError(f"batch_size must be >= 1, got {batch_size}")
    idx = np.asarray(indices, dtype=np.int64)
    if max_rows is not None:
        idx = idx[:max_rows]
    idx = np.array_split(idx, world_size)[rank]
    for i in range(0, idx.size, batch_size):
        yield rows.batch(idx[i : i + batch_size])
