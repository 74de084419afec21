"""The planner's fitted constants, and how they are judged: leave-one-group-out.

Every constant of the planner is physical (datasheets, microbenchmarks, XLA's own analysis of
crosstrain's program) except one per chip family, `Family.fitted_scale`: the fraction of the
modelled compute rate that published training software reaches on that family. It is fitted to
the published runs (`data/published_cases.csv`) by minimising the mean absolute log error of the
predicted metric, on a grid of 0.01 from 0.30 to 2.00.

Judged out of sample: for each group of sources (one paper, or one framework's published table),
the scales are refitted on the other groups only and the group's runs predicted with them. A
family with no runs outside the group keeps the unfitted 1.0. The shipped values in
`planner/model.py` are the fit on every group; `python -m crosstrain.planner.refit` prints
them again (tests check the two agree).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

GRID = [round(0.30 + 0.01 * i, 2) for i in range(171)]


def _loss(prepared: Sequence, family: str, scale: float) -> float:
    total = 0.0
    for p in prepared:
        total += abs(math.log(p.predict({family: scale}) / p.actual))
    return total / max(1, len(prepared))


def fit_scales(prepared: Iterable) -> dict[str, float]:
    """family -> fitted scale, each family fitted on its own runs (the families' step times do not
    share a constant)."""
    by_family: dict[str, list] = {}
    for p in prepared:
        by_family.setdefault(p.family, []).append(p)
    return {fam: min(GRID, key=lambda s: (_loss(runs, fam, s), abs(s - 1.0))) for fam, runs in sorted(by_family.items())}


def leave_one_group_out(prepared: Sequence) -> dict[str, float]:
    """case id -> its metric predicted with scales fitted on every other group."""
    out: dict[str, float] = {}
    for group in sorted({p.group for p in prepared}):
        train = [p for p in prepared if p.group != group]
        scales = fit_scales(train)
        for p in prepared:
            if p.group == group:
                out[p.row["id"]] = p.predict({p.family: scales.get(p.family, 1.0)})
    return out
