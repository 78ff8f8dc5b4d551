"""Packing the token stream into fixed-length training rows with no attention across documents.

Window i covers stream tokens [i*T, i*T + T + 1): inputs are its first T tokens, targets its last T, so
consecutive windows overlap by one token and every token after the first is a target exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from snuggle.data.tokenize import TokenStream
from snuggle.errors import SnuggleError
from snuggle.model.loss import IGNORE_INDEX  # the label the loss skips: defined once, beside the loss

__all__ = ["IGNORE_INDEX", "PackedRows", "collate"]


class PackedRows:
    """Random access to packed rows of `seq_len` tokens; `rows[i]` is a dict of (T,) int64 tensors.

    Keys: `input_ids`, `labels` (IGNORE_INDEX where the target starts another document, and at padding),
    `position_ids` (restart at 0 at each document start inside the row) and `doc_ids` (equal exactly for
    tokens of the same document within the row; padding has its own id). The model builds its
    block-diagonal causal mask from `doc_ids`.
    """

    def __init__(self, stream: TokenStream, seq_len: int) -> None:
        if seq_len < 1:
            raise SnuggleError(f"seq_len must be >= 1, got {seq_len}")
        n = len(stream)
        if n < 2:
            raise SnuggleError(f"corpus has {n} token(s); at least 2 are needed to make one training row")
        self.stream = stream
        self.seq_len = seq_len
        # A trailing partial window is kept when it holds at least one (input, target) pair.
        self._len = (n - 2) // seq_len + 1

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = int(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"row {index} out of range for {self._len} rows")
        T, stream = self.seq_len, self.stream
        start = i * T
        window = np.asarray(stream.tokens[start : start + T + 1], dtype=np.int64)  # (L,) L <= T+1
        L = window.shape[0]
        n_in = min(L, T)  # real input tokens; the rest of the row is padding
        pos = start + np.arange(L)  # (L,) stream offsets
        doc = np.searchsorted(stream.doc_starts, pos, side="right") - 1  # (L,) document of each token

        input_ids = np.full(T, stream.eos_id, dtype=np.int64)  # (T,)
        input_ids[:n_in] = window[:n_in]

        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)  # (T,)
        labels[: L - 1] = np.where(doc[1:] == doc[:-1], window[1:], IGNORE_INDEX)

        # A document continued from the previous row starts at position 0 here, hence the clip at `start`.
        doc_start = np.maximum(stream.doc_starts[doc[:n_in]], start)  # (n_in,)
        position_ids = np.empty(T, dtype=np.int64)  # (T,)
        position_ids[:n_in] = pos[:n_in] - doc_start
        position_ids[n_in:] = np.arange(T - n_in)

        doc_ids = np.empty(T, dtype=np.int64)  # (T,)
        doc_ids[:n_in] = doc[:n_in] - doc[0]
        doc_ids[n_in:] = doc_ids[n_in - 1] + 1  # padding: one id of its own, never a real document's

        return row_tensors(input_ids, labels, position_ids, doc_ids)

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Collated (B, T) batch of the given row indices."""
        return collate([self[i] for i in indices])


def row_tensors(
    input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray, doc_ids: np.ndarray
) -> dict[str, torch.Tensor]:
    """The row format every packer produces and the trainer consumes: four (T,) int64 tensors."""
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "doc_ids": torch.from_numpy(doc_ids),
    }


def collate(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of rows into a dict of (B, T) tensors."""
    if not rows:
        raise ValueError("collate() needs at least one row")
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
