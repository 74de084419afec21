"""`python -m crosstrain.planner.refit`: fit the planner's per-family scales again on the shipped
published runs (planner/data/published_cases.csv), from the unfitted model, and print them (the
values `planner/model.py` ships). The fitting itself is planner/calibrate.py's."""

from __future__ import annotations

import dataclasses

from crosstrain.planner.calibrate import fit_scales
from crosstrain.planner.cases import prepare_case, read_cases, shipped_cases_path
from crosstrain.planner.model import FAMILIES


def main() -> int:
    # Fit from the unfitted model (every scale 1.0), as the shipped values were.
    unfitted = {k: dataclasses.replace(v, fitted_scale=1.0) for k, v in FAMILIES.items()}
    FAMILIES.update(unfitted)
    prepared = [prepare_case(r) for r in read_cases(shipped_cases_path())]
    for fam, scale in fit_scales(prepared).items():
        print(f"{fam}: fitted_scale={scale}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
