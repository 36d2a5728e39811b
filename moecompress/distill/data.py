"""Training data of ``distill``: every sequence of ``--data`` and the order they are seen in.

``--data`` takes what ``--calib`` takes (``calibration.read_documents``: .txt, .jsonl, .parquet,
a shipped set, a Hub dataset), cut into ``seq_len`` sequences. The order is a pure function of
``(seed, micro-batch index)``: epoch ``e`` is the permutation drawn from ``seed + e``, read
``batch_size`` sequences at a time. So a resumed run reads exactly the batches an uninterrupted
one would, and any number of processes reads the same *global* batch (each takes its slice,
:func:`shard`), which keeps the loss curve independent of the process count. (accelerate's
seedable sampler would also do; a closed-form order makes the resume position one integer.)
"""

from __future__ import annotations

import hashlib

import torch


def data_hash(tokens: torch.Tensor) -> str:
    """sha256 of the token ids (int64, row-major): which data a student was distilled on."""
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


class BatchOrder:
    """Global micro-batch ``i`` -> row indices into the training sequences."""

    def __init__(self, num_sequences: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = num_sequences, batch_size, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def __getitem__(self, i: int) -> torch.Tensor:
        # positions i*B .. i*B+B-1 of the endless stream of epochs (a batch may span two)
        pos = torch.arange(i * self.batch_size, (i + 1) * self.batch_size)
        out = torch.empty(self.batch_size, dtype=torch.long)
        for epoch in pos.div(self.n, rounding_mode="floor").unique().tolist():
            sel = pos.div(self.n, rounding_mode="floor") == epoch
            out[sel] = self._permutation(epoch)[pos[sel] % self.n]
        return out

    def epochs(self, micro_batches: int) -> float:
        return micro_batches * self.batch_size / self.n


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's equal slice of a global batch (the batch size is a multiple of ``world``)."""
    per = batch.shape[0] // world
    return batch[rank * per:(rank + 1) * per]


def calibration_sample(tokens: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` training sequences drawn with ``seed`` (what a stage's pruning calibrates on),
    drawn like ``calibration.load_calibration`` draws."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(tokens.shape[0], generator=g)[:min(n, tokens.shape[0])].sort().values
    return tokens[pick].clone()
