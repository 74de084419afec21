"""Readable output for plans, comparisons and validation, and the comparison chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crosstrain.files import pyplot, save_figure
from crosstrain.flops import CONVENTION_NOTE
from crosstrain.planner.cases import speed_ratio


def _fmt(v: float, unit: str = "") -> str:
    if v is None:
        return "n/a"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{suffix}{unit}"
    return f"{v:.3g}{unit}"


def _tokens(n: float) -> str:
    """A token budget to five figures: 6.3000T planned is not 6.2998T."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:.5g}{suffix}"
    return f"{n:,.0f}"


def _duration(days: float) -> str:
    """Hours under two days, days above."""
    return f"{days * 24:,.1f} hours" if days < 2 else f"{days:,.1f} days"


def plan_table(r: dict[str, Any]) -> str:
    p = r["parallelism"]
    layout = ", ".join(f"{k}={v}" for k, v in p.items() if v > 1 or k == "microbatch")
    lines = [
        f"plan: {r['chips']} x {r['chip']}  ({layout}, remat {r['remat']}; {r['layouts_searched']} layouts searched)",
        f"  step time        {r['step_time_s']:.3f} s for {r['global_batch']} x {r['seq_len']} tokens",
        f"  throughput       {_fmt(r['tokens_per_s'])} tokens/s ({r['tokens_per_s_per_chip']:,.0f} per chip), "
        f"MFU {100 * r['mfu']:.1f}% ({r['model_tflops_per_chip']:.0f} of {r['peak_tflops_per_chip']:.0f} TFLOP/s per chip; "
        f"{CONVENTION_NOTE})",
        f"  memory per chip  {r['memory_per_chip_gib']:.1f} GiB of {r['memory_capacity_gib']:.1f} usable: "
        + ("fits" if r["fits"] else "DOES NOT FIT"),
        "                   " + ", ".join(f"{k} {v:.1f}" for k, v in r["memory_breakdown_gib"].items() if v >= 0.05),
        f"  time to train    {_duration(r['time_to_train_days'])} for {r['steps']:,} steps of "
        f"{r['global_batch'] * r['seq_len']:,} tokens ({_tokens(r['tokens'])} tokens)",
        f"  chip-hours       {_fmt(r['chip_hours'])}   cost ${_fmt(r['cost_usd'])}   energy {r['energy_mwh']:,.0f} MWh",
    ]
    t = r["time_breakdown"]
    lines.append(
        f"  step breakdown   compute {t['compute_s']:.3f} s, memory-bound {t['memory_bound_s']:.3f} s, "
        f"tp {t['tp_exposed_s']:.3f} s exposed, fsdp+dp {t['sharding_exposed_s']:.3f} s exposed, "
        f"bubble {100 * t['pipeline_bubble']:.0f}%"
    )
    lines += [f"  note: {n}" for n in r["notes"]]
    if r.get("nearest_published"):
        lines.append("  how far to trust it: the planner on the nearest published runs, out of sample (+: it says they "
                     "ran faster than they did)")
        lines += [f"    {n['id']} ({n['params_b']:g}B on {n['chips']:,} {n['chip']}): {100 * n['loso_speed_error']:+.0f}%"
                  for n in r["nearest_published"]]
    if "aot" in r:
        a = r["aot"]
        where = f"{a['topology']}, {a['attention']} attention, {a['program']}"
        if a["memory_per_chip_gib"] is None:
            lines.append(f"  XLA (AOT, {where}): does not fit: {a['xla_error']} ({a['capacity_gib']} GiB); "
                         f"planner {a['planner_memory_per_chip_gib']:.2f} GiB for the same program")
            return "\n".join(lines)
        lines.append(
            f"  XLA (AOT, {where}): {a['memory_per_chip_gib']:.2f} GiB per chip "
            + ("(fits)" if a["fits"] else "(DOES NOT FIT)")
            + f" vs planner {a['planner_memory_per_chip_gib']:.2f} GiB ({100 * a['planner_rel_error']:+.0f}%); compiled in "
            f"{a['compile_s']:.0f} s"
        )
        if a.get("xla_error"):
            lines.append(f"  XLA: {a['xla_error']}")
        lines += [f"  note: {n}" for n in a.get("compile_notes", [])]
        if a.get("xla_estimated_step_s"):
            lines.append(f"  XLA's step estimate {a['xla_estimated_step_s']:.3f} s vs planner {a['planner_step_time_s']:.3f} s "
                         f"(compute {a['planner_compute_s']:.3f} s); {a['attention_note']}")
        else:
            lines.append(f"  XLA's step estimate: {a['xla_estimate_basis']}; {a['attention_note']}")
        if a.get("xla_elementwise_passes"):
            lines.append(f"  XLA's elementwise traffic {a['xla_elementwise_gb_per_layer']:.2f} GB per layer and microbatch "
                         f"vs the planner's one fused pass {a['planner_one_pass_gb_per_layer']:.2f} GB: "
                         f"{a['xla_elementwise_passes']:.2f} passes")
    if "aot" in r:
        remats = r["aot"].get("rematerialized", [])
        lines.append(f"  SPMD partitioner: {len(remats)} involuntary full rematerialization(s)"
                     + (": " + "; ".join(remats[:3]) if remats else ""))
    return "\n".join(lines)


def compare_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'chip':>10} {'chips':>6} {'software':>10} {'layout':>22} {'step s':>8} {'MFU':>6} {'GiB/chip':>9} "
            f"{'time':>12} {'cost $':>9} {'MWh':>8}")
    out = [head, "-" * len(head)]
    for r in rows:
        sw = r.get("software", "crosstrain")
        if "error" in r:
            out.append(f"{r['chip']:>10} {r['chips']:>6} {sw:>10}  {r['error']}")
            continue
        p = r["parallelism"]
        layout = ",".join(f"{k}{v}" for k, v in p.items() if v > 1 and k != "microbatch") or "-"
        out.append(
            f"{r['chip']:>10} {r['chips']:>6} {sw:>10} {layout:>22} {r['step_time_s']:>8.2f} {100 * r['mfu']:>5.1f}% "
            f"{r['memory_per_chip_gib']:>9.1f} {_duration(r['time_to_train_days']):>12} {_fmt(r['cost_usd']):>9} "
            f"{r['energy_mwh']:>8,.0f}"
        )
    return "\n".join(out)


# One colour per chip, the same on every chart (the catalog's order).
_PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
            "#64B5CD", "#2F4B7C", "#A05195", "#665191"]


def chip_color(chip: str) -> str:
    from crosstrain.hardware import chip_names

    names = chip_names()
    return _PALETTE[names.index(chip) % len(_PALETTE)] if chip in names else "#8C8C8C"


def _number(v: float, _pos=None) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.3g}"


def duration_unit(values_days: list[float]) -> tuple[float, str]:
    """(factor from days, unit name) that suits these durations: hours under two days."""
    top = max([v for v in values_days if v] or [0.0])
    return (24.0, "hours") if top < 2 else (1.0, "days")


def _money(v: float, _pos=None) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"${v / scale:,.3g}{suffix}"
    return f"${v:,.0f}"


def compare_chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Time, cost and energy per option, one bar per software (crosstrain's own step solid, the
    best published software hatched); an option that does not fit keeps its place, marked."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    plt = pyplot()
    options = list(dict.fromkeys((r["chip"], r["chips"]) for r in rows))
    softwares = list(dict.fromkeys(r.get("software", "crosstrain") for r in rows))
    width = 0.8 / len(softwares)
    factor, unit = duration_unit([r["time_to_train_days"] for r in rows if "error" not in r])
    metrics = [("time_to_train_days", f"{unit} to train", lambda v: v * factor, _number),
               ("cost_usd", "cost (USD)", lambda v: v, _money),
               ("energy_mwh", "energy (MWh)", lambda v: v, _number)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.8), dpi=110)
    for ax, (key, name, scale, fmt) in zip(axes, metrics):
        top = max([scale(r[key]) for r in rows if "error" not in r] or [1.0])
        for j, sw in enumerate(softwares):
            for i, option in enumerate(options):
                r = next((r for r in rows if (r["chip"], r["chips"]) == option and r.get("software", "crosstrain") == sw),
                         None)
                if r is None:
                    continue
                x = i + (j - (len(softwares) - 1) / 2) * width
                v = 0.0 if "error" in r else scale(r[key])
                ax.bar(x, v, width * 0.95, color=chip_color(r["chip"]), hatch="//" if sw == "published" else None,
                       edgecolor="white" if sw == "published" else None)
                if "error" in r:
                    ax.annotate("does not\nfit", (x, 0.02 * top), ha="center", va="bottom", fontsize=7,
                                color="#C44E52", fontweight="bold")
                else:
                    ax.annotate(fmt(v), (x, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(options)), [f"{c}\nx{n:,}" for c, n in options], fontsize=8)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
        ax.yaxis.set_major_formatter(FuncFormatter(fmt))
        ax.set_ylim(0, top * 1.18)
    if len(softwares) > 1:
        axes[0].legend(handles=[Patch(facecolor="#BBBBBB", label="crosstrain's step"),
                                Patch(facecolor="#BBBBBB", hatch="//", edgecolor="white", label="best published software")],
                       fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=11, wrap=True)
    fig.tight_layout()
    save_figure(fig, path)


def recipe_compare_chart(results: list[dict[str, Any]], path: Path) -> None:
    """A recipe on each option: time and cost stacked by stage; stages that fit no layout named."""
    from matplotlib.ticker import FuncFormatter

    plt = pyplot()
    stages = [st["name"] for st in results[0]["stages"]]
    factor, unit = duration_unit([r["total"]["days"] for r in results])
    labels = [f"{r['chip']}\nx{r['chips']:,}" for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    shades = plt.get_cmap("tab10")
    for ax, key, name, fmt in ((axes[0], "days", f"{unit} to train", _number),
                               (axes[1], "cost_usd", "cost (USD)", _money)):
        bottom = [0.0] * len(results)
        for k, stage in enumerate(stages):
            values = [next((st.get(key) or 0.0 for st in r["stages"] if st["name"] == stage and not st.get("error")), 0.0)
                      for r in results]
            values = [v * (factor if key == "days" else 1.0) for v in values]
            ax.bar(labels, values, bottom=bottom, color=shades(k % 10), label=stage)
            bottom = [b + v for b, v in zip(bottom, values)]
        for i, r in enumerate(results):
            missing = [st["name"] for st in r["stages"] if st.get("error")]
            if missing:
                ax.annotate("does not fit:\n" + ", ".join(missing), (i, bottom[i]), ha="center", va="bottom",
                            fontsize=8, color="#C44E52")
        ax.yaxis.set_major_formatter(FuncFormatter(fmt))
        ax.set_ylim(0, max(bottom) * 1.25 if any(bottom) else 1.0)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results[0]['recipe']}: every stage on each option", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)


def recipe_table(r: dict[str, Any]) -> str:
    """`plan --recipe` for one chip and count: each stage's time and cost, then the total."""
    lines = [f"{r['recipe']} on {r['chips']} x {r['chip']}:"]
    for st in r["stages"]:
        head = f"  {st['name']:>10} {st['kind']:>5} {st['steps']:>9,} steps  seq {st['seq_len']:>6}  "
        if st.get("error"):
            lines.append(head + f"does not fit: {st['error'].split(': ', 1)[-1]}")
            continue
        lines.append(head + f"{st['step_time_s']:8.3f} s/step  {_duration(st['days']):>12}  ${st['cost_usd'] / 1e3:,.1f}k"
                     + ("" if st["fits"] else "  DOES NOT FIT"))
    t = r["total"]
    lines.append(f"  {'total':>10} {'':>5} {'':>15} {'':>11} {'':>13} {_duration(t['days']):>12}  ${t['cost_usd'] / 1e3:,.1f}k  "
                 f"{t['energy_mwh']:,.0f} MWh" + ("" if r["all_fit"] else "  (stages that do not fit left out)"))
    return "\n".join(lines)


def cases_chart(result: dict[str, Any], path: Path) -> None:
    """Predicted against measured speed for every published run, in sample and leave-one-group-out,
    one colour per chip family, on log axes with the +-10% band the planner aims for."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    plt = pyplot()
    colors = {"tpu": "#4C72B0", "gpu": "#55A868", "trainium": "#DD8452", "cpu": "#8C8C8C"}
    s = result["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), dpi=110, sharey=True)
    for ax, key, name in ((axes[0], "rel_error", "in sample"), (axes[1], "loso_rel_error", "leave-one-group-out")):
        for family, color in colors.items():
            rows = [c for c in result["cases"] if c["family"] == family and not c.get("refused")]
            if not rows:
                continue
            ratio = [speed_ratio(c["metric"], c[key]) for c in rows]
            ax.scatter([c["chips"] for c in rows], ratio, color=color, label=f"{family} ({len(rows)})", alpha=0.8)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhspan(0.9, 1.1, color="grey", alpha=0.15, label="±10%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Enough labelled ticks on the log axes: the ratios span about 0.5-2.
        ax.yaxis.set_major_locator(FixedLocator([0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 2.5, 3.0]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:,.0f}"))
        ax.set_xlabel("chips")
        med = s["median_abs_rel_error" if key == "rel_error" else "loso_median_abs_rel_error"]
        ax.set_title(f"{name}: median |error| {100 * med:.1f}%")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("predicted speed / published speed")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"planner vs {s['count']} published runs in {s['groups']} groups")
    fig.tight_layout()
    save_figure(fig, path)


def cases_table(result: dict[str, Any]) -> str:
    head = (f"{'case':>36} {'group':>20} {'metric':>22} {'predicted':>10} {'actual':>10} {'error':>7} "
            f"{'LOGO':>7}  layout")
    out = [head, "-" * len(head)]
    for c in result["cases"]:
        if c.get("refused"):
            out.append(f"{c['id']:>36} {c['group']:>20} {c['metric']:>22} {'refused':>10} {c['actual']:>10.4g} "
                       f"{'(100% miss)':>15}  {c['reason']}")
            continue
        fit = "" if c["memory_fits"] else f"  [memory: {c['memory_per_device_gib']:.0f} of {c['capacity_gib']:.0f} GiB]"
        out.append(
            f"{c['id']:>36} {c['group']:>20} {c['metric']:>22} {c['predicted']:>10.4g} {c['actual']:>10.4g} "
            f"{100 * c['rel_error']:>+6.1f}% {100 * c['loso_rel_error']:>+6.1f}%  {c['layout']} ({c['remat']}){fit}"
        )
    s = result["summary"]
    out.append(
        f"{s['count']} cases in {s['groups']} groups: median |error| {100 * s['median_abs_rel_error']:.1f}% in sample, "
        f"{100 * s['loso_median_abs_rel_error']:.1f}% leave-one-group-out (p80 {100 * s['p80_abs_rel_error']:.1f}% / "
        f"{100 * s['loso_p80_abs_rel_error']:.1f}%, worst {100 * s['max_abs_rel_error']:.1f}% ({s['worst']}) / "
        f"{100 * s['loso_max_abs_rel_error']:.1f}% ({s['loso_worst']}))"
    )
    out.append(f"refused (no layout; counted as 100% misses): {s['refused']}; runs that fit the planner's memory model "
               f"with their stated layout: {100 * s['memory_fit_fraction']:.0f}%")
    out.append("fitted scales: " + ", ".join(f"{k} {v:.2f}" for k, v in s["fitted_scales"].items())
               + "; elementwise passes: " + ", ".join(f"{k} {v:g}" for k, v in s["fitted_elementwise_passes"].items()))
    for key in ("by_family", "by_chip", "by_scale", "by_group"):
        out.append(f"{key.replace('_', ' ')}: " + "; ".join(
            f"{name} n={v['count']} speed {100 * v['median_speed_error']:+.0f}% |err| {100 * v['median_abs_rel_error']:.0f}% "
            f"LOGO {100 * v['loso_median_abs_rel_error']:.0f}%" for name, v in result[key].items()))
    return "\n".join(out)
