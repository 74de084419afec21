"""`python -m crosstrain.planner.refit`: fit the planner's per-family constants again on the
shipped published runs (planner/data/published_cases.csv), from the unfitted model, and print them
(the values `planner/model.py` ships). The fitting itself is planner/calibrate.py's."""

from __future__ import annotations

import dataclasses

from crosstrain.planner.calibrate import UNFITTED, fit_constants
from crosstrain.planner.cases import prepare_case, read_cases, shipped_cases_path
from crosstrain.planner.model import FAMILIES


def main() -> int:
    # Fit from the unfitted model (scale 1.0, one elementwise pass), as the shipped values were.
    FAMILIES.update({k: dataclasses.replace(v, **UNFITTED) for k, v in FAMILIES.items()})
    prepared = [prepare_case(r) for r in read_cases(shipped_cases_path())]
    for fam, constants in fit_constants(prepared).items():
        print(f"{fam}: " + ", ".join(f"{k}={v}" for k, v in constants.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
