"""Weighted mixtures of sources that stay random-access, so a data position is still an index.

The global sequence stream is cut into blocks of `block` sequences. In each block every source
gets its share of the block (largest-remainder apportionment of its weight, so proportions are
exact per block) and the block's source labels are shuffled with a seed derived from (seed,
phase, block). Sequence `i` of the stream is then the `n`-th sequence of source `k`, where `n`
counts the earlier positions labelled `k`: a closed form, not a replay.

Weights may change over the run in phases (AFM's continued stage up-weights code and math): phase
`p` starts at a global sequence index, and the per-source counts carry over from earlier phases,
so no source sequence is repeated or skipped at a phase change.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def apportion(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer shares of `total` proportional to `weights` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - counts.sum()
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:remainder]] += 1
    return counts


@dataclass(frozen=True)
class Phase:
    start: int  # first global sequence index of the phase
    weights: tuple[float, ...]


class Mixture:
    def __init__(self, phases: Sequence[Phase], *, seed: int, block: int = 1024):
        if not phases or phases[0].start != 0:
            raise ValueError("the first mixture phase must start at sequence 0")
        self.phases = list(phases)
        self.seed = seed
        self.block = block
        self.sources = len(phases[0].weights)
        self._shares = [apportion(p.weights, block) for p in self.phases]
        # Per-source counts consumed before each phase.
        self._base = [np.zeros(self.sources, np.int64)]
        for p in range(1, len(self.phases)):
            length = self.phases[p].start - self.phases[p - 1].start
            self._base.append(self._base[-1] + self._counts(p - 1, length))

    @functools.lru_cache(maxsize=64)
    def _labels(self, phase: int, block: int) -> np.ndarray:
        labels = np.repeat(np.arange(self.sources), self._shares[phase])
        rng = np.random.default_rng([self.seed, phase, block])
        return labels[rng.permutation(self.block)]

    def _counts(self, phase: int, length: int) -> np.ndarray:
        """Sequences taken from each source in the first `length` positions of `phase`."""
        full, rest = divmod(length, self.block)
        counts = full * self._shares[phase].astype(np.int64)
        if rest:
            counts = counts + np.bincount(self._labels(phase, full)[:rest], minlength=self.sources)
        return counts

    def locate(self, index: int) -> tuple[int, int]:
        """(source, that source's sequence number) of global sequence `index`."""
        p = max(i for i, ph in enumerate(self.phases) if ph.start <= index)
        offset = index - self.phases[p].start
        block, pos = divmod(offset, self.block)
        labels = self._labels(p, block)
        k = int(labels[pos])
        n = self._base[p][k] + block * int(self._shares[p][k]) + int(np.count_nonzero(labels[:pos] == k))
        return k, int(n)
