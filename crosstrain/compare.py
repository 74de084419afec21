"""`crosstrain compare RUN_DIR...`: several runs in one picture, and their final numbers side by side.

Each run's metrics.jsonl is read as the run left it (a resumed run's file holds each step once:
the trainer drops records past the checkpoint it resumed from), so runs of different lengths and
resumed runs plot as one curve each. Training and held-out loss are drawn against tokens seen,
which compares runs of different batch sizes fairly; throughput against step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crosstrain.errors import UserError
from crosstrain.files import pyplot, save_figure
from crosstrain.train.metrics import read_metrics


def load_runs(run_dirs: list[str]) -> list[dict[str, Any]]:
    if len(run_dirs) < 1:
        raise UserError("compare: give at least one run directory")
    from crosstrain.storage import local_run

    runs = []
    for name in run_dirs:
        path = local_run(name, "compare")
        metrics = path / "metrics.jsonl"
        if not metrics.is_file():
            raise UserError(f"compare: {metrics} not found (is {name} a crosstrain run directory?)")
        records = sorted(read_metrics(metrics), key=lambda r: r["step"])
        if not records:
            raise UserError(f"compare: {metrics} has no records yet")
        summary = {}
        if (path / "summary.json").is_file():
            try:
                summary = json.loads((path / "summary.json").read_text())
            except ValueError:
                summary = {}
        runs.append({"name": name.rstrip("/").rsplit("/", 1)[-1] or name, "dir": name, "records": records,
                     "summary": summary})
    names = [r["name"] for r in runs]
    for r in runs:  # two runs named alike (a/run, b/run): use more of the path
        if names.count(r["name"]) > 1:
            r["name"] = r["dir"]
    return runs


def finals(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for run in runs:
        recs, s = run["records"], run["summary"]
        evals = [r for r in recs if r.get("eval_loss") is not None]
        last = recs[-1]
        out.append({
            "run": run["name"],
            "dir": run["dir"],
            "steps": last["step"],
            "tokens_seen": last.get("tokens_seen"),
            "final_loss": last.get("loss"),
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "eval_loss_se": evals[-1].get("eval_loss_se") if evals else None,
            "tokens_per_s": s.get("tokens_per_s", last.get("tokens_per_s")),
            "mfu": s.get("mfu", last.get("mfu")),
            "goodput": s.get("goodput"),
            "complete": bool(s),
        })
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(12, 4.4), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        recs = run["records"]
        train = [(r["tokens_seen"], r["loss"]) for r in recs if r.get("loss") is not None and r.get("tokens_seen")]
        evals = [(r["tokens_seen"], r["eval_loss"], 2 * (r.get("eval_loss_se") or 0.0)) for r in recs
                 if r.get("eval_loss") is not None]
        if train:
            ax_loss.plot(*zip(*train), color=c, lw=1.2, label=f"{run['name']} training")
        if evals:
            x, y, err = zip(*evals)
            ax_loss.errorbar(x, y, yerr=err, fmt="o--", color=c, lw=1.0, ms=4, capsize=3,
                             label=f"{run['name']} held-out (± 2 s.e.)")
        tps = [(r["step"], r["tokens_per_s"]) for r in recs if r.get("tokens_per_s")]
        if tps:
            ax_tps.plot(*zip(*tps), color=c, lw=1.2, label=run["name"])
    ax_loss.set_xlabel("tokens seen")
    ax_loss.set_ylabel("next-token cross-entropy (nats)")
    ax_loss.set_title("loss")
    ax_tps.set_xlabel("step")
    ax_tps.set_ylabel("tokens / s")
    ax_tps.set_title("throughput")
    for ax in (ax_loss, ax_tps):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'run':>20} {'steps':>7} {'tokens':>10} {'loss':>8} {'held-out ± s.e.':>17} {'tokens/s':>10} {'MFU':>7} "
            f"{'goodput':>8}")
    out = [head, "-" * len(head)]

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    for r in rows:
        out.append(f"{r['run'][-20:]:>20} {r['steps']:>7} {f(r['tokens_seen'], ',.0f'):>10} {f(r['final_loss'], '.4f'):>8} "
                   f"{(f(r['eval_loss'], '.4f') + ' ± ' + f(r.get('eval_loss_se'), '.4f')):>17} "
                   f"{f(r['tokens_per_s'], ',.0f'):>10} "
                   f"{(f(100 * r['mfu'], '.1f') + '%') if isinstance(r['mfu'], (int, float)) else '-':>7} "
                   f"{(f(100 * r['goodput'], '.0f') + '%') if isinstance(r['goodput'], (int, float)) else '-':>8}")
    return "\n".join(out)
