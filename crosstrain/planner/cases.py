"""Validation against published training runs (rows in the schema of shared/planner/cases.csv).

Each row gives a model, a chip count, a layout and one measured figure; the planner predicts that
figure from the same inputs. Blank inputs were not published: where the source's own configuration
files give them, `published_cases_assumptions.csv` fills them in (with the file cited); any still
blank are chosen by the planner's search (the fastest layout that fits), which is what a tuned
published configuration most likely was. Every filled-in value is reported with the prediction.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from crosstrain.config import ModelConfig
from crosstrain.errors import UserError
from crosstrain.flops import flops_per_token, matmul_params, param_count
from crosstrain.hardware import ATTENTION_KERNELS, get_chip
from crosstrain.planner.model import FAMILIES, Estimate, Layout, estimate
from crosstrain.planner.search import LAYOUT_FLAGS as SEARCH_LAYOUT_FLAGS, search

REQUIRED = ("id", "chip", "chips", "layers", "hidden", "heads", "ffn", "vocab", "seq_len", "metric", "value")
METRICS = ("mfu", "tflops_per_chip_model", "tflops_per_chip_hw", "tokens_per_s_per_chip", "seqs_per_s", "step_time_s")
REMAT_NAMES = {"none": "none", "selective": "selective", "minimal": "minimal", "dots_saveable": "minimal", "dots": "dots",
               "save_dot_except_mlpwi": "dots_except_mlpwi", "op": "op", "mlp": "mlp",
               "offload": "offload", "full": "full"}
# Source-stated settings without a column of their own, given per run in
# published_cases_assumptions.csv with the source's words as the basis.
LAYOUT_FLAGS = (*SEARCH_LAYOUT_FLAGS, "zero1", "flash", "sequence_parallel")
# What each of them accepts (the words of the error) and its parser (None: not accepted).
_BOOL = ("true or false", lambda v: {"true": True, "false": False}.get(v))


def _fraction(v: str) -> Optional[float]:
    """A share in (0, 1], None for anything else."""
    try:
        x = float(v)
    except ValueError:
        return None
    return x if 0 < x <= 1 else None


_ELEMENT_BYTES = ("1, 2 or 4 (bytes per element)", lambda v: int(v) if v in ("1", "2", "4") else None)
FLAG_VALUES = {
    "keep_gathered": _BOOL, "tp_comm_overlap": _BOOL, "dp_overlap": _BOOL, "host_offload": _BOOL, "zero1": _BOOL, "flash": _BOOL,
    "gather_bytes": _ELEMENT_BYTES, "reduce_bytes": _ELEMENT_BYTES,
    "vocab_tiles": ("a positive integer", lambda v: int(v) if v.isdigit() and int(v) >= 1 else None),
    "logit_bytes": ("2, 4 or 6 (bytes per logit)", lambda v: int(v) if v in ("2", "4", "6") else None),
    "state_bytes": ("2 or 4 (bytes per weight and per Adam moment)", lambda v: int(v) if v in ("2", "4") else None),
    "sequence_parallel": _BOOL,
    "remat_blocks": ("a fraction of the blocks in (0, 1]", _fraction),
}
assert set(FLAG_VALUES) == set(LAYOUT_FLAGS), "every source-stated flag says what it accepts"


class Refused(UserError):
    """A published run the planner cannot lay out: reported as a refused row, never the end of
    the command (a malformed row is still a user error)."""


@dataclass
class CaseResult:
    id: str
    metric: str
    predicted: float
    actual: float
    rel_error: float
    chip: str
    chips: int
    layout: str
    remat: str
    global_batch: int
    step_time_s: float
    assumed: list[str] = field(default_factory=list)
    source: str = ""
    group: str = ""
    family: str = ""
    loso_predicted: Optional[float] = None
    loso_rel_error: Optional[float] = None
    params_b: Optional[float] = None  # the model's parameters (billions), as the planner counts them
    memory_per_device_gib: Optional[float] = None  # the planner's, for the layout priced
    capacity_gib: Optional[float] = None
    memory_fits: Optional[bool] = None
    refused: bool = False  # no layout could be priced; `reason` says why (a 100% miss)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Prepared:
    """A published row turned into the planner's inputs, its layout searched once; `predict`
    re-evaluates it cheaply under other fitted constants."""

    row: dict[str, str]
    m: ModelConfig
    chip: Any
    chips: int
    batch: int
    glu: bool
    compute_dtype: str
    power_cap: Optional[float]
    layout: Layout
    assumed: list[str]
    flash: Optional[bool] = None  # None: the family's attention kernel
    framework: Optional[str] = None  # "jax" | "pytorch"; None: the family's usual (JAX on TPU)
    sliding_window: Optional[tuple[int, int]] = None  # (window tokens, layers that use it)
    attention_kernel: Optional[str] = None  # "cudnn" | "flash2"; None: the chip's best benchmarked

    @property
    def group(self) -> str:
        return (self.row.get("group") or self.row["id"]).strip()

    @property
    def family(self) -> str:
        return self.chip.family

    def estimate(self, fitted: Optional[dict[str, dict[str, float]]] = None) -> Estimate:
        """With `fitted` (family -> its fitted constants), those replace the shipped ones."""
        fam = FAMILIES[self.chip.family]
        if fitted is not None and self.chip.family in fitted:
            fam = dataclasses.replace(fam, **fitted[self.chip.family])
        return estimate(self.m, self.chip, self.layout, global_batch=self.batch, glu=self.glu, family=fam,
                        compute_dtype=self.compute_dtype, power_cap_w=self.power_cap, flash=self.flash,
                        framework=self.framework, sliding_window=self.sliding_window,
                        attention_kernel=self.attention_kernel)

    def predict(self, fitted: Optional[dict[str, dict[str, float]]] = None) -> float:
        return metric_value(self.row["metric"], self.estimate(fitted), self.m, self.chip, self.chips, self.batch,
                            self.row, self.glu)

    @property
    def actual(self) -> float:
        return float(self.row["value"])


def _assumptions() -> dict[str, dict[str, tuple[str, str]]]:
    table: dict[str, dict[str, tuple[str, str]]] = {}
    path = resources.files("crosstrain") / "planner" / "data" / "published_cases_assumptions.csv"
    with path.open() as f:
        for row in csv.DictReader(f):
            table.setdefault(row["id"], {})[row["field"]] = (row["value"], row["basis"])
    return table


def shipped_cases_path() -> Path:
    return Path(str(resources.files("crosstrain") / "planner" / "data" / "published_cases.csv"))


def _int(row: dict, key: str) -> Optional[int]:
    v = (row.get(key) or "").strip()
    return int(float(v)) if v else None


def _positive_number(row: dict, key: str, words: str) -> Optional[float]:
    """A row's positive numeric setting, None where blank; anything else is a one-line error."""
    v = (row.get(key) or "").strip()
    if not v:
        return None
    try:
        x = float(v)
    except ValueError:
        x = -1.0
    if not x > 0:
        raise UserError(f"--cases: row {row['id']}: {key} must be {words}, got '{v}'")
    return x


def _bool(row: dict, key: str, default: bool) -> bool:
    v = (row.get(key) or "").strip().lower()
    return default if not v else v in ("true", "1", "yes")


def read_cases(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise UserError(f"--cases: {path} not found")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"--cases: cannot read {path}: {e}") from None
    if not rows:
        raise UserError(f"--cases: {path} has no rows")
    missing = [c for c in REQUIRED if c not in rows[0]]
    if missing:
        raise UserError(f"--cases: {path} lacks column(s) {', '.join(missing)}")
    for i, row in enumerate(rows, start=2):
        if row["metric"] not in METRICS:
            raise UserError(f"--cases: {path}:{i}: unknown metric '{row['metric']}' (known: {', '.join(METRICS)})")
        for column in REQUIRED[2:]:
            if column == "metric":
                continue
            try:
                float(row[column])
            except (TypeError, ValueError):
                raise UserError(f"--cases: {path}:{i} ({row['id']}): {column} must be a number, got "
                                f"{row[column]!r}") from None
    return rows


def predict_case(row: dict[str, str]) -> CaseResult:
    return result_of(prepare_case(row))


def result_of(p: Prepared) -> CaseResult:
    est = p.estimate()
    predicted = metric_value(p.row["metric"], est, p.m, p.chip, p.chips, p.batch, p.row, p.glu)
    actual = p.actual
    return CaseResult(
        id=p.row["id"], metric=p.row["metric"], predicted=predicted, actual=actual,
        rel_error=(predicted - actual) / actual, chip=p.chip.name, chips=p.chips, layout=est.layout.describe(),
        remat=est.layout.remat + (f" on {est.layout.remat_blocks:g} of the blocks" if est.layout.remat_blocks < 1 else ""),
        global_batch=p.batch, step_time_s=est.step_time_s, assumed=p.assumed,
        source=p.row.get("source", ""), group=p.group, family=p.family,
        memory_per_device_gib=est.memory_per_device_gib, capacity_gib=est.capacity_gib, memory_fits=est.fits,
        params_b=param_count(p.m, glu=p.glu) / 1e9,
    )


def refused_result(row: dict[str, str], reason: str) -> CaseResult:
    """A published run the planner could not lay out: reported, and counted as a 100% miss."""
    chip = row.get("chip", "")
    try:
        family = get_chip(chip).family
    except UserError:
        family = ""
    actual = float(row["value"])
    return CaseResult(id=row["id"], metric=row["metric"], predicted=float("nan"), actual=actual, rel_error=-1.0,
                      chip=chip, chips=int(float(row.get("chips") or 0)), layout="", remat="", global_batch=0,
                      step_time_s=float("nan"), source=row.get("source", ""),
                      group=(row.get("group") or row["id"]).strip(), family=family, loso_predicted=float("nan"),
                      loso_rel_error=-1.0, memory_fits=False, refused=True, reason=reason)


def prepare_case(row: dict[str, str]) -> Prepared:
    assumed: list[str] = []
    table = _assumptions().get(row["id"], {})
    row = dict(row)
    for key, (value, basis) in table.items():
        if not (row.get(key) or "").strip():
            row[key] = value
            assumed.append(f"{key}={value} ({basis})")
    chip = get_chip(row["chip"])
    gb = _positive_number(row, "hbm_gb", "a positive number of GB")
    if gb is not None:
        # A variant of the catalogued part with other memory (H100 96GB HBM3 beside the 80GB SXM),
        # where the source says so (published_cases_assumptions.csv gives the basis).
        chip = dataclasses.replace(chip, hbm_gib=gb * 1e9 / 2**30)
        assumed.append(f"{gb:g} GB of memory per chip (the source's variant of {chip.name})")
    tbps = _positive_number(row, "hbm_tbps", "a positive number of TB/s")
    if tbps is not None:
        # The variant's memory bandwidth where the source states it (Meta's Grand Teton H100s:
        # 96 GB of HBM2e at 2.4 TB/s, against the SXM part's 3.35): the memory-bound work's rate.
        chip = dataclasses.replace(chip, hbm_gbps=tbps * 1000)
        assumed.append(f"{tbps:g} TB/s of memory bandwidth per chip (the source's variant of {chip.name})")
    network_words = "a positive number of Gb/s per node of a GPU or Trainium cluster"
    gbit = _positive_number(row, "network_gbit_per_node", network_words)
    if gbit is not None:
        # The cluster's scale-out network where the source states it (per node, as sources give
        # it), in place of the catalogue's (one 400 Gb/s NIC per H100, 200 Gb/s per A100).
        if chip.family not in ("gpu", "trainium"):
            raise UserError(f"--cases: row {row['id']}: network_gbit_per_node must be {network_words}, "
                            f"got '{row['network_gbit_per_node'].strip()}'")
        chip = dataclasses.replace(chip, scaleout_gbps=gbit / 8 / chip.link_domain)
        assumed.append(f"{gbit:g} Gb/s of scale-out network per {chip.link_domain}-chip node (the source's cluster)")
    framework = (row.get("framework") or "").strip().lower() or None
    if framework not in (None, "jax", "pytorch"):
        raise UserError(f"--cases: row {row['id']}: framework must be jax or pytorch, got '{framework}'")
    attention_kernel = (row.get("attention_kernel") or "").strip().lower() or None
    if attention_kernel not in (None, *ATTENTION_KERNELS):
        raise UserError(f"--cases: row {row['id']}: attention_kernel must be one of {', '.join(ATTENTION_KERNELS)}, "
                        f"got '{attention_kernel}'")
    sliding_window = None
    if (row.get("sliding_window") or "").strip():
        # Local attention layers (Gemma 3: a 1024-token window on 5 of every 6 layers).
        try:
            window, local = _int(row, "sliding_window"), _int(row, "sliding_layers")
        except ValueError:
            window = local = None
        if not (window and window > 0 and local and 0 < local <= int(row["layers"])):
            raise UserError(f"--cases: row {row['id']}: sliding_window must be a positive number of tokens with "
                            f"sliding_layers between 1 and layers, got '{row.get('sliding_window')}' and "
                            f"'{row.get('sliding_layers', '')}'")
        sliding_window = (window, local)
    chips = int(row["chips"])
    unit_per_chip = chip.devices_per_chip
    devices = chips * unit_per_chip
    heads = int(row["heads"])
    kv = _int(row, "kv_heads") or heads
    hidden = int(row["hidden"])
    m = ModelConfig(
        layers=int(row["layers"]), hidden=hidden, heads=heads, kv_heads=kv,
        head_dim=_int(row, "head_dim") or hidden // heads, ffn=int(row["ffn"]), vocab=int(row["vocab"]),
        seq_len=int(row["seq_len"]), tie_embeddings=_bool(row, "tied", False), qk_norm=False,
    )
    glu = _bool(row, "glu", True)
    # Degrees count devices; with parallel_unit=chip on a multi-core chip they count chips.
    scale = 1 if (row.get("parallel_unit") or "chip") == "core" else unit_per_chip
    fixed: dict[str, Any] = {}
    for key in ("tp", "pp", "dp", "fsdp", "cp"):
        v = _int(row, key)
        if v is not None:
            fixed[key] = v * (scale if key == "tp" else 1)
    if scale > 1 and "tp" not in fixed:
        fixed["tp"] = scale  # a multi-core chip's cores share a layer
    remat = (row.get("remat") or "").strip()
    if remat:
        fixed["remat"] = REMAT_NAMES.get(remat, "full")
    if "zero1" in (row.get("notes") or "").lower().replace("-", ""):
        fixed["zero1"] = True
    for key in LAYOUT_FLAGS:
        value = (row.get(key) or "").strip().lower()
        if not value:
            continue
        allowed, parse = FLAG_VALUES[key]
        parsed = parse(value)
        if parsed is None:
            raise UserError(f"--cases: row {row['id']}: {key} must be {allowed}, got '{value}'")
        fixed[key] = parsed
    if _int(row, "virtual_stages"):
        fixed["virtual_stages"] = _int(row, "virtual_stages")
    elif "interleaved" in (row.get("notes") or "").lower():
        fixed["virtual_stages"] = 2
    batch = _int(row, "global_batch_seqs")
    if batch is None:
        raise UserError(f"--cases: row {row['id']} has no global_batch_seqs and no assumption for it")
    # Microbatch: 1 sequence with a pipeline (the sources' setting), else the whole local batch
    # (no gradient accumulation the source did not mention).
    if _int(row, "microbatch"):
        fixed["microbatch"] = _int(row, "microbatch")
    elif fixed.get("pp", 1) > 1:
        fixed["microbatch"] = 1
    elif all(k in fixed for k in ("dp", "fsdp")):
        fixed["microbatch"] = max(1, batch // (fixed["dp"] * fixed["fsdp"]))
    cap = re.search(r"(\d+)\s*W cap", row.get("notes") or "")
    power_cap = float(cap.group(1)) if cap else None
    if power_cap:
        assumed.append(f"power cap {power_cap:.0f} W (notes column)")
    precision = (row.get("precision") or "bf16").strip().lower()
    # FP8 and int8 (AQT) weight GEMMs at the chip's peak for that type, where it has one.
    compute_dtype = precision if precision in ("fp8", "int8") and chip.peak_flops(precision) else "bfloat16"
    flash = fixed.pop("flash", None)
    est, _ = search(m, chip, devices, batch, fixed=fixed, glu=glu, require_fit=False, power_cap_w=power_cap,
                    compute_dtype=compute_dtype, flash=flash, framework=framework,
                    sliding_window=sliding_window, attention_kernel=attention_kernel)
    if est is not None and not est.fits:
        assumed.append(f"memory: the planner estimates {est.memory_per_device_gib:.0f} GiB per device, over "
                       f"the catalog's {est.capacity_gib:.0f} GiB for {chip.name}")
    if est is None:
        raise Refused(f"--cases: row {row['id']}: no layout with {row.get('tp') or 'any'} tp fits the model on "
                      f"{chips} {chip.name}")
    for key in ("tp", "pp", "dp", "fsdp", "cp"):
        if key not in fixed:
            assumed.append(f"{key}={getattr(est.layout, key)} (searched)")
    if not remat:
        assumed.append(f"remat={est.layout.remat} (searched)")
    return Prepared(row=row, m=m, chip=chip, chips=chips, batch=batch, glu=glu, compute_dtype=compute_dtype,
                    power_cap=power_cap, layout=est.layout, assumed=assumed, flash=flash, framework=framework,
                    sliding_window=sliding_window, attention_kernel=attention_kernel)


def metric_value(metric: str, est: Estimate, m: ModelConfig, chip, chips: int, batch: int, row: dict, glu: bool) -> float:
    tokens = batch * m.seq_len
    conv = (row.get("attn_flops") or "full").strip() or "full"
    model_flops = flops_per_token(m, attention=conv, glu=glu) * tokens
    t = est.step_time_s
    if metric == "step_time_s":
        return t
    if metric == "seqs_per_s":
        return batch / t
    if metric == "tokens_per_s_per_chip":
        return tokens / t / chips
    if metric == "tflops_per_chip_model":
        return model_flops / t / chips / 1e12
    if metric == "mfu":
        return model_flops / t / (chips * chip.peak_flops("bfloat16"))
    # tflops_per_chip_hw: the source's count with its recomputation
    remat = (row.get("remat") or est.layout.remat).strip()
    extra = 0.0
    layer_fwd = 2.0 * (matmul_params(m, glu=glu) - m.hidden * m.vocab) + 4.0 * m.layers * m.heads * m.head_dim * m.seq_len / (2 if conv == "causal" else 1)
    if remat == "full":
        extra = layer_fwd * tokens * est.layout.remat_blocks
    return (model_flops + extra) / t / chips / 1e12


def _summary(errors: list[float], prefix: str = "") -> dict[str, float]:
    e = sorted(abs(x) for x in errors)
    return {f"{prefix}median_abs_rel_error": statistics.median(e),
            f"{prefix}p80_abs_rel_error": e[min(len(e) - 1, int(math.ceil(0.8 * len(e))) - 1)],
            f"{prefix}max_abs_rel_error": e[-1]}


def speed_ratio(metric: str, rel_error: float) -> float:
    """Predicted over published speed for a prediction whose metric was off by `rel_error`
    (> 1: the planner says the run goes faster than it went): a step time's error is inverted, a
    throughput's taken as it is."""
    return 1.0 / (1.0 + rel_error) if metric == "step_time_s" else 1.0 + rel_error


def speed_error(r: CaseResult) -> float:
    """How much faster the planner says the run goes than it went (+0.2: 20% faster)."""
    return speed_ratio(r.metric, r.rel_error) - 1.0


def _scale_bucket(chips: int) -> str:
    return "<= 64 chips" if chips <= 64 else "65-1024 chips" if chips <= 1024 else "> 1024 chips"


def evaluate_cases(path: Path) -> dict[str, Any]:
    """Each published row predicted twice: with the shipped constants (in-sample: the fitted ones
    were fitted on every group) and leave-one-group-out (the fitted constants refitted on the other
    groups only; crosstrain/planner/calibrate.py)."""
    from crosstrain.planner.calibrate import fit_and_leave_one_group_out

    rows = read_cases(path)
    prepared, refused = [], []
    for r in rows:
        try:
            prepared.append(prepare_case(r))
        except Refused as e:  # one row that cannot be laid out is a result, not the end
            refused.append(refused_result(r, str(e).split(": ", 2)[-1]))
    results = [result_of(p) for p in prepared]
    fitted, loso = fit_and_leave_one_group_out(prepared)
    for r, p in zip(results, prepared):
        r.loso_predicted = loso[p.row["id"]]
        r.loso_rel_error = (r.loso_predicted - r.actual) / r.actual
    order = {r["id"]: i for i, r in enumerate(rows)}
    results = sorted(results + refused, key=lambda r: order[r.id])
    errors = [r.rel_error for r in results]
    loso_errors = [r.loso_rel_error for r in results]
    worst = max(range(len(results)), key=lambda i: abs(errors[i]))
    loso_worst = max(range(len(results)), key=lambda i: abs(loso_errors[i]))

    def breakdown(key) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in results:
            if not r.refused:
                out.setdefault(key(r), []).append(r)
        return {k: {"count": len(v), "median_rel_error": statistics.median(x.rel_error for x in v),
                    "median_speed_error": statistics.median(speed_error(x) for x in v),
                    "median_abs_rel_error": statistics.median(abs(x.rel_error) for x in v),
                    "loso_median_abs_rel_error": statistics.median(abs(x.loso_rel_error) for x in v)}
                for k, v in sorted(out.items())}

    groups = sorted({r.group for r in results})
    return {
        "cases": [r.to_dict() for r in results],
        "summary": {
            "count": len(results),
            "groups": len(groups),
            "refused": len(refused),
            "memory_fit_fraction": sum(bool(r.memory_fits) for r in results) / len(results),
            **_summary(errors),
            "mean_abs_rel_error": statistics.fmean(abs(e) for e in errors),
            "worst": results[worst].id,
            **_summary(loso_errors, "loso_"),
            "loso_worst": results[loso_worst].id,
            "fitted_scales": {fam: c["fitted_scale"] for fam, c in fitted.items()},
            "fitted_elementwise_passes": {fam: c["elementwise_passes"] for fam, c in fitted.items()},
        },
        "by_family": breakdown(lambda r: r.family),
        "by_chip": breakdown(lambda r: r.chip),
        "by_group": breakdown(lambda r: r.group),
        "by_scale": breakdown(lambda r: _scale_bucket(r.chips)),
    }


def shipped_evaluation() -> dict[str, Any]:
    """`evaluate_cases` of the shipped runs, cached on disk under a hash of the runs and of the
    planner's code (a few seconds to compute; every plan reads it for its nearest published runs)."""
    import hashlib
    import json

    from crosstrain.files import atomic_write
    from crosstrain.paths import cache_dir

    here = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted([*here.glob("*.py"), *(here / "data").glob("*.csv"), here.parent / "hardware.py",
                     here.parent / "flops.py"]):
        h.update(f.read_bytes())
    path = cache_dir() / f"published_cases_{h.hexdigest()[:16]}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    result = evaluate_cases(shipped_cases_path())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(result))
    except OSError:
        pass
    return result


def nearest_published(family: str, chip: str, params_b: float, chips: int, k: int = 3) -> list[dict[str, Any]]:
    """The `k` published runs most like a plan (same family; nearest in parameters and chip count,
    the same chip first), with the errors the planner makes on them out of sample: how far to
    trust the plan."""
    rows = [c for c in shipped_evaluation()["cases"] if c["family"] == family and not c.get("refused")]

    def distance(c: dict[str, Any]) -> float:
        return (abs(math.log(max(params_b, 1e-3) / max(c["params_b"] or 1e-3, 1e-3)))
                + abs(math.log(max(chips, 1) / max(c["chips"], 1))) + (0.0 if c["chip"] == chip else 0.7))

    out = []
    for c in sorted(rows, key=distance)[:k]:
        out.append({"id": c["id"], "chip": c["chip"], "chips": c["chips"], "params_b": round(c["params_b"], 2),
                    "loso_rel_error": c["loso_rel_error"],
                    "loso_speed_error": speed_ratio(c["metric"], c["loso_rel_error"]) - 1.0})
    return out
