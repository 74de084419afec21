"""`crosstrain recipe`: staged pre-training as data, run in order, resumable.

A recipe (a shipped name under crosstrain/recipes/ or a YAML file) lists stages:

```yaml
description: ...
stages:
  - {name: teacher, kind: train, preset: tiny, set: [model.ffn=256], tokens: 1e6}
  - {name: pruned, kind: prune, from: teacher, ffn: 128, steps: 20}
  - {name: core, kind: train, from: pruned, distill: teacher, tokens: 1e6}
  - {name: continued, kind: train, from: core, set: [model.seq_len=128, optim.lr=3e-4], tokens: 5e5}
baseline: {preset: tiny, set: [model.ffn=128], tokens: 2e6}
```

- `train` stages take a preset and `set` overrides; `tokens` (or `steps`) is their budget, turned
  into `train.steps` at the stage's batch and sequence length. With `from`, the stage starts from
  that stage's latest parameters (`init.from_run`) and keeps its model shape (the stage's own
  `set` may still change the sequence length or RoPE base, as AFM's later stages do); a `from`
  that names a prune stage continues that pruned run. `distill: STAGE` distils from it.
- `prune` stages run `crosstrain prune` on `from` (`ffn`, `steps`).
- `baseline` (optional) is a from-scratch run to hold the recipe's result against.

Each stage gets its own run directory under DIR; a stage that finished (its summary.json or
prune.json exists) is skipped, so running the recipe again after an interruption resumes at the
stage, and the step, where it stopped. DIR/recipe.json records every stage.
"""

from __future__ import annotations

import json
import logging
import math
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from crosstrain.config import Config, config_from_dict, load_run_config, parse_count, read_preset
from crosstrain.errors import UserError
from crosstrain.files import write_json

log = logging.getLogger("crosstrain")

KINDS = ("train", "prune")
SHAPE_KEYS = {"layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "tie_embeddings", "qk_norm"}
STAGE_KEYS = {"name", "kind", "preset", "set", "tokens", "steps", "from", "distill", "ffn", "lr"}


def shipped_recipes() -> list[str]:
    root = resources.files("crosstrain") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_recipe(name_or_path: str) -> dict[str, Any]:
    shipped = resources.files("crosstrain") / "recipes" / f"{name_or_path}.yaml"
    path = Path(str(shipped)) if shipped.is_file() else Path(name_or_path)
    if not path.is_file():
        raise UserError(f"--recipe: unknown recipe '{name_or_path}' and no such file (shipped: {', '.join(shipped_recipes())})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"--recipe: {path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise UserError(f"--recipe: {path}: needs a non-empty list of stages")
    names: list[str] = []
    for i, st in enumerate(data["stages"]):
        where = f"--recipe: stages[{i}]"
        if not isinstance(st, dict):
            raise UserError(f"{where}: must be a mapping")
        unknown = set(st) - STAGE_KEYS
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(STAGE_KEYS))})")
        name, kind = st.get("name"), st.get("kind", "train")
        if not name or not isinstance(name, str) or "/" in name or name in names:
            raise UserError(f"{where}.name: needs a unique name without '/'")
        if kind not in KINDS:
            raise UserError(f"{where}.kind: must be one of {', '.join(KINDS)}, got {kind!r}")
        for ref in ("from", "distill"):
            if st.get(ref) is not None and st[ref] not in names:
                raise UserError(f"{where}.{ref}: '{st[ref]}' is not an earlier stage")
        if kind == "prune" and (not st.get("from") or not st.get("ffn")):
            raise UserError(f"{where}: a prune stage needs 'from' and 'ffn'")
        if kind == "train" and not st.get("preset") and not st.get("from"):
            raise UserError(f"{where}: a train stage needs a 'preset' or a 'from'")
        names.append(name)
    data.setdefault("name", Path(name_or_path).stem)
    return data


def _stage_config(stage: dict[str, Any], src: Optional[dict[str, Any]], extra: tuple[str, ...] = (), *,
                  first: tuple[str, ...] = (), planning: bool = False) -> Config:
    """A train stage's config: its preset with its `set` on top, or, with a source stage's config
    `src`, the source's model shape and settings with the stage's own on top (a stage preset may
    change the sequence length or RoPE base, never the shape); its token budget as train.steps.
    `first` overrides go under the stage's `set`, `extra` over it. `planning` leaves out data,
    init and distillation (nothing has run to point at)."""
    raw = read_preset(stage["preset"]) if stage.get("preset") else {}
    overrides = list(first) + [str(s) for s in (stage.get("set") or [])] + list(extra)
    if src is not None:
        preset_model = raw.get("model") or {}
        raw = {**src, **{k: v for k, v in raw.items() if k != "model"}}
        raw["model"] = {**src["model"], **{k: v for k, v in preset_model.items() if k not in SHAPE_KEYS}}
        raw["init"] = {}
        raw["distill"] = {}
    if planning:
        overrides = [o for o in overrides if not o.startswith(("init.", "distill.", "data."))]
        raw = {k: v for k, v in raw.items() if k not in ("init", "distill", "data")}
    cfg = config_from_dict(raw, overrides)
    if stage.get("steps") is not None:
        steps = int(stage["steps"])
    elif stage.get("tokens") is not None:
        tokens = parse_count(str(stage["tokens"]), f"stages.{stage['name']}.tokens")
        steps = max(1, math.ceil(tokens / (cfg.train.batch * cfg.model.seq_len)))
    else:
        return cfg
    return cfg.override(train={"steps": steps})


def _train_config(stage: dict[str, Any], directory: Path) -> Config:
    """The stage's config for running it: from the source stage's run directory (its config.yaml,
    tokenizer and latest parameters), distilling from the teacher stage's."""
    src, first, extra = None, [], []
    if stage.get("from"):
        src = load_run_config(directory / stage["from"]).to_dict()
        first.append(f"data.tokenizer={(directory / stage['from'] / 'tokenizer.json').absolute()}")
        extra.append(f"init.from_run={(directory / stage['from']).absolute()}")
    if stage.get("distill"):
        extra.append(f"distill.teacher={(directory / stage['distill']).absolute()}")
    return _stage_config(stage, src, tuple(extra), first=tuple(first))


def _record(name: str, kind: str, run_dir: Path) -> dict[str, Any]:
    from crosstrain.model import count_params

    cfg = load_run_config(run_dir)
    out = {"name": name, "kind": kind, "run_dir": str(run_dir), "seq_len": cfg.model.seq_len,
           "rope_base": cfg.model.rope_base, "params": count_params(cfg.model),
           "distilled_from": cfg.distill.teacher or None, "initialised_from": cfg.init.from_run or None}
    if kind == "train":
        s = json.loads((run_dir / "summary.json").read_text())
        out.update({"steps": s["steps"], "tokens": s["tokens_seen"], "final_loss": s["final_loss"], "eval_loss": s["eval_loss"],
                    "eval_loss_se": s.get("eval_loss_se")})
    else:
        p = json.loads((run_dir / "prune.json").read_text())
        out.update({"steps": p["steps"], "tokens": p["tokens"], "final_loss": p["masked_loss"][-1],
                    "eval_loss": p["heldout_loss_pruned"], "eval_loss_se": p.get("heldout_loss_pruned_se"), "ffn": p["ffn"]})
    return out


def run_recipe(name_or_path: str, directory: Path) -> dict[str, Any]:
    from crosstrain.prune import prune
    from crosstrain.train.loop import train

    recipe = read_recipe(name_or_path)
    directory.mkdir(parents=True, exist_ok=True)
    kinds = {st["name"]: st.get("kind", "train") for st in recipe["stages"]}
    records = []
    for i, stage in enumerate(recipe["stages"]):
        name, kind = stage["name"], kinds[stage["name"]]
        run_dir = directory / name
        if kind == "train":
            if not (run_dir / "summary.json").is_file():
                log.info("recipe %s: stage %d/%d '%s' (train)", recipe["name"], i + 1, len(recipe["stages"]), name)
                train(_train_config(stage, directory), run_dir)
            else:
                log.info("recipe %s: stage '%s' already done", recipe["name"], name)
        else:
            if not (run_dir / "prune.json").is_file():
                log.info("recipe %s: stage %d/%d '%s' (prune)", recipe["name"], i + 1, len(recipe["stages"]), name)
                if run_dir.exists():  # an interrupted prune: start it again
                    import shutil

                    shutil.rmtree(run_dir)
                prune(directory / stage["from"], run_dir, ffn=int(stage["ffn"]), steps=int(stage.get("steps", 100)),
                      lr=float(stage.get("lr", 0.05)), overrides=tuple(str(s) for s in (stage.get("set") or [])))
            else:
                log.info("recipe %s: stage '%s' already done", recipe["name"], name)
        records.append(_record(name, kind, run_dir))
        _write(directory, recipe, records, None)
    baseline = None
    if recipe.get("baseline"):
        base_dir = directory / "baseline"
        if not (base_dir / "summary.json").is_file():
            log.info("recipe %s: baseline from scratch", recipe["name"])
            train(_train_config({**recipe["baseline"], "name": "baseline"}, directory), base_dir)
        b = _record("baseline", "train", base_dir)
        baseline = {"run_dir": b["run_dir"], "steps": b["steps"], "eval_loss": b["eval_loss"],
                    "eval_loss_se": b["eval_loss_se"], "params": b["params"]}
    return _write(directory, recipe, records, baseline)


def describe(result: dict[str, Any]) -> str:
    """A finished recipe, one line per stage (and the baseline): steps, size, held-out loss with its
    standard error."""
    def loss(r: dict[str, Any]) -> str:
        se = r.get("eval_loss_se")
        return f"held-out {r['eval_loss']:.4f}" + (f" ± {se:.4f}" if se is not None else "")

    lines = [f"{st['name']:>12} {st['kind']:>6} {st['steps']:>7} steps  seq {st['seq_len']:>6}  "
             f"{st['params'] / 1e6:8.2f}M params  {loss(st)}" for st in result["stages"]]
    if result["baseline"]:
        b = result["baseline"]
        lines.append(f"{'baseline':>12} {'train':>6} {b['steps']:>7} steps  {'':>10}  {b['params'] / 1e6:8.2f}M params  "
                     f"{loss(b)}")
    return "\n".join(lines)


def _write(directory: Path, recipe: dict[str, Any], stages: list[dict[str, Any]], baseline) -> dict[str, Any]:
    out = {"recipe": recipe["name"], "description": recipe.get("description", ""), "stages": stages, "baseline": baseline}
    write_json(directory / "recipe.json", out)
    return out


def stage_configs(name_or_path: str):
    """Each stage's config as the recipe would build it, without running anything (for `plan
    --recipe`): (recipe, [(stage, kind, Config, teacher Config or None)]). A prune stage's config
    is the model it prunes, for as many steps as it learns masks."""
    recipe = read_recipe(name_or_path)
    built: dict[str, Config] = {}
    out = []
    for stage in recipe["stages"]:
        kind = stage.get("kind", "train")
        if kind == "prune":
            src = built[stage["from"]].override(train={"steps": int(stage.get("steps", 100))})
            built[stage["name"]] = src.override(model={"ffn": int(stage["ffn"])})
            out.append((stage, kind, src, None))
            continue
        src = built[stage["from"]].to_dict() if stage.get("from") else None
        cfg = _stage_config(stage, src, planning=True)
        built[stage["name"]] = cfg
        out.append((stage, kind, cfg, built[stage["distill"]] if stage.get("distill") else None))
    return recipe, out


def plan_recipe(name_or_path: str, chip: str, chips: int) -> dict[str, Any]:
    """Every stage planned on `chips` x `chip`: the fastest layout, time, cost, energy; a prune
    stage is priced as training steps of the model it prunes (its backward runs in full), and
    distillation adds the teacher's forward pass (a third of its training step's compute)."""
    from crosstrain.planner.plan import Options, plan

    recipe, stages = stage_configs(name_or_path)
    rows = []
    for stage, kind, cfg, teacher in stages:
        tokens = cfg.train.steps * cfg.train.batch * cfg.model.seq_len
        try:
            p = plan(cfg, Options(chip=chip, chips=chips, tokens=float(tokens)))
        except UserError as e:  # this stage fits no layout of these chips: say so, plan the rest
            rows.append({"name": stage["name"], "kind": kind, "steps": cfg.train.steps, "seq_len": cfg.model.seq_len,
                         "tokens": tokens, "fits": False, "error": str(e), "step_time_s": None, "days": None,
                         "cost_usd": None, "energy_mwh": None, "distilled_from": stage.get("distill")})
            continue
        extra = 0.0
        if teacher is not None:
            t = plan(teacher.replace(train=cfg.train), Options(chip=chip, chips=chips, tokens=float(tokens)))
            extra = t["time_breakdown"]["compute_s"] / 3.0
        step = p["step_time_s"] + extra
        seconds = step * cfg.train.steps
        scale = seconds / (p["time_to_train_days"] * 86400) if p["time_to_train_days"] else 1.0
        rows.append({"name": stage["name"], "kind": kind, "steps": cfg.train.steps, "seq_len": cfg.model.seq_len,
                     "tokens": tokens, "layout": p["parallelism"], "remat": p["remat"], "step_time_s": step,
                     "days": seconds / 86400, "cost_usd": p["cost_usd"] * scale, "energy_mwh": p["energy_mwh"] * scale,
                     "fits": p["fits"], "distilled_from": stage.get("distill")})
    return {"recipe": recipe["name"], "chip": chip, "chips": chips, "stages": rows,
            "all_fit": all(r["fits"] for r in rows),
            "total": {k: sum(r[k] for r in rows if r[k] is not None) for k in ("days", "cost_usd", "energy_mwh")}}
