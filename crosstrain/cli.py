"""The `crosstrain` command line.

User mistakes (bad flags, presets, overrides, paths, meshes) print one line on stderr and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from crosstrain.errors import UserError
from crosstrain.platform import skip_absent_tpu

_STARTED = time.perf_counter()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise UserError(f"{self.prog}: {message}")


def _add_config_args(p: argparse.ArgumentParser, *, preset_required: bool = True) -> None:
    p.add_argument("--preset", required=preset_required, help="a shipped preset name or a path to your own YAML")
    p.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable; several may follow one --set)",
    )
    p.add_argument("--data", help="training data: a text directory or file, .jsonl, .parquet, or a datasets save_to_disk "
                   "directory (default: the built-in corpus)")


def _load_config(args):
    from crosstrain.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.append(f"data.path={args.data}")
    return load_config(args.preset, overrides)


def _add_process_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("many processes (default: CROSSTRAIN_* variables, or a detected TPU/SLURM/MPI cluster)")
    g.add_argument("--coordinator", help="host:port of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    g.add_argument("--cpu-devices", type=int, help="CPU devices this process exposes (testing multi-device on a CPU)")


def _init_processes(args) -> None:
    from crosstrain.parallel import distributed

    spec = distributed.spec_from(args.coordinator, args.num_processes, args.process_id, args.cpu_devices)
    distributed.initialize(spec)


def _compilation_cache() -> None:
    """Reuse compiled programs across runs and restarts (a resumed run skips most compile time)."""
    import jax

    from crosstrain.paths import cache_dir

    if os.environ.get("CROSSTRAIN_NO_COMPILE_CACHE"):
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _make_run_dir(name: str) -> Path:
    run_dir = Path(name)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--run-dir: cannot create {run_dir}: {e.strerror}") from None
    return run_dir


def cmd_train(args) -> int:
    from crosstrain import log as logsetup

    from crosstrain.config import check_paths

    cfg = _load_config(args)  # validate before joining other processes or touching devices
    check_paths(cfg)  # the data, tokenizer, init and teacher it reads
    _init_processes(args)
    _compilation_cache()
    import jax

    from crosstrain.train.loop import train

    run_dir = _make_run_dir(args.run_dir)
    logsetup.setup(run_dir, process_index=jax.process_index())
    train(cfg, run_dir, started=_STARTED)
    return 0


def cmd_generate(args) -> int:
    from crosstrain import log as logsetup
    from crosstrain.generate import Sampling, generate

    logsetup.setup()
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--run-dir: {run_dir} does not exist")
    sampling = Sampling(
        greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    out = generate(run_dir, args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling)
    if args.json:
        print(
            json.dumps(
                {
                    "prompt": args.prompt,
                    "text": out.text,
                    "tokens": out.tokens,
                    "new_tokens": len(out.tokens),
                    "tokens_per_s": out.tokens_per_s,
                    "prefill_s": out.prefill_s,
                    "stopped_at_eot": out.stopped_at_eot,
                }
            )
        )
    else:
        print(args.prompt + out.text)
        print(
            f"[{len(out.tokens)} tokens, {out.tokens_per_s:,.1f} tokens/s decode, prefill {out.prefill_s * 1e3:.0f} ms"
            f"{', stopped at end-of-document' if out.stopped_at_eot else ''}]",
            file=sys.stderr,
        )
    return 0


def _run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--run-dir: {run_dir} is not a crosstrain run directory (no config.yaml)")
    return run_dir


def cmd_export(args) -> int:
    import jax

    from crosstrain import log as logsetup
    from crosstrain.data.tokenizer import eot_id, load_tokenizer
    from crosstrain.hf import architecture, write_hf_dir
    from crosstrain.runtime import load_run

    logsetup.setup()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UserError(f"--out: {out} is not empty (use --force to overwrite)")
    run_dir = _run_dir(args.run_dir)
    cfg, params, step = load_run(run_dir)
    tokenizer = run_dir / "tokenizer.json"
    write_hf_dir(jax.device_get(params), cfg.model, tokenizer, out, eot=eot_id(load_tokenizer(tokenizer)), dtype=args.dtype)
    result = {"out": str(out), "step": step, "architecture": architecture(cfg.model), "dtype": args.dtype or cfg.model.param_dtype}
    print(json.dumps(result) if args.json else f"exported step {result['step']} as {result['architecture']} ({result['dtype']}) to {out}")
    return 0


def cmd_import(args) -> int:
    """A new run directory whose step-0 checkpoint holds the Hugging Face model's weights."""
    import shutil

    from crosstrain import log as logsetup
    from crosstrain.config import config_from_dict, load_config
    from crosstrain.flops import param_count
    from crosstrain.hf import apply_hf_model, load_hf_params
    from crosstrain.runtime import refuse_existing_checkpoints, write_new_run

    logsetup.setup()
    cfg = load_config(args.preset, args.overrides) if args.preset else config_from_dict({}, args.overrides)
    hf_dir, run_dir = Path(args.hf), Path(args.run_dir)
    if not hf_dir.is_dir():
        raise UserError(f"--hf: {hf_dir} is not a directory")
    refuse_existing_checkpoints(run_dir, "import")
    cfg = apply_hf_model(cfg, hf_dir)
    params = load_hf_params(hf_dir, cfg.model)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(hf_dir / "tokenizer.json", run_dir / "tokenizer.json")
    cfg = cfg.override(data={"tokenizer": str((run_dir / "tokenizer.json").absolute())})
    write_new_run(run_dir, cfg, params, {"imported_from": str(hf_dir)})
    result = {"run_dir": str(run_dir), "model": cfg.to_dict()["model"], "parameters": param_count(cfg.model)}
    print(json.dumps(result) if args.json else
          f"imported {result['parameters'] / 1e6:.2f}M parameters into {args.run_dir}; continue with: "
          f"crosstrain train --preset {Path(args.run_dir) / 'config.yaml'} --run-dir {args.run_dir}")
    return 0


def cmd_prune(args) -> int:
    from crosstrain import log as logsetup
    from crosstrain.prune import prune

    logsetup.setup()
    _compilation_cache()
    source = Path(args.source)
    if not (source / "config.yaml").is_file():
        raise UserError(f"--from: {source} is not a crosstrain run directory")
    result = prune(source, Path(args.run_dir), ffn=args.ffn, steps=args.steps, lr=args.lr,
                   overrides=tuple(args.overrides), data=args.data)
    print(json.dumps(result, indent=1) if args.json else
          f"pruned the MLPs of {source} from {result['ffn'][0]} to {result['ffn'][1]} hidden units "
          f"({result['parameters'][0] / 1e6:.2f}M -> {result['parameters'][1] / 1e6:.2f}M parameters); held-out loss "
          f"{result['heldout_loss_full']:.4f} -> {result['heldout_loss_pruned']:.4f} before retraining; continue with: "
          f"crosstrain train --preset {Path(args.run_dir) / 'config.yaml'} --run-dir {args.run_dir}")
    return 0


def cmd_recipe(args) -> int:
    from crosstrain import log as logsetup
    from crosstrain.recipe import run_recipe

    run_dir = _make_run_dir(args.run_dir)
    logsetup.setup(run_dir)
    _compilation_cache()
    result = run_recipe(args.recipe, run_dir)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for st in result["stages"]:
            print(f"{st['name']:>12} {st['kind']:>6} {st['steps']:>7} steps  seq {st['seq_len']:>6}  "
                  f"{st['params'] / 1e6:8.2f}M params  held-out {st['eval_loss']:.4f}")
        if result["baseline"]:
            b = result["baseline"]
            print(f"{'baseline':>12} {'train':>6} {b['steps']:>7} steps  {'':>10}  {b['params'] / 1e6:8.2f}M params  "
                  f"held-out {b['eval_loss']:.4f}")
        print(f"wrote {run_dir / 'recipe.json'}")
    return 0


def cmd_eval(args) -> int:
    from crosstrain import log as logsetup
    from crosstrain.evaluate import evaluate_run

    logsetup.setup()
    if args.text_file and args.data:
        raise UserError("eval: give --text-file or --data, not both")
    result = evaluate_run(_run_dir(args.run_dir), text_file=Path(args.text_file) if args.text_file else None, data=args.data)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  bits/byte {result.bits_per_byte:.4f}  "
              f"({result.tokens:,} tokens, {result.bytes:,} bytes)")
    return 0


def cmd_plan(args) -> int:
    from crosstrain.config import parse_count
    from crosstrain.planner import report
    from crosstrain.planner.plan import Options, compare, parse_compare, parse_parallelism, plan

    if args.cases:
        from crosstrain.planner.cases import evaluate_cases

        result = evaluate_cases(Path(args.cases))
        print(json.dumps(result, indent=1) if args.json else report.cases_table(result))
        return 0
    if not args.preset and not args.recipe:
        raise UserError("plan: --preset is required (or --cases FILE.csv, or --recipe)")
    cfg = _load_config(args) if args.preset else None
    opts = Options(
        chip=args.chip or "", chips=args.chips or 0,
        tokens=parse_count(args.tokens, "--tokens") if args.tokens else None,
        parallelism=parse_parallelism(args.parallelism) if args.parallelism else None,
        remat=args.remat, price=args.price, power=args.power, power_cap=args.power_cap, pue=args.pue,
        objective=args.objective, slices=args.slices,
    )
    if args.recipe:
        from crosstrain.recipe import plan_recipe

        targets = parse_compare(args.compare) if args.compare else [(args.chip or "", args.chips or 0)]
        if not all(c and n for c, n in targets):
            raise UserError("plan --recipe: give --chip and --chips, or --compare CHIP:N,...")
        results = [plan_recipe(args.recipe, c, n) for c, n in targets]
        if args.json:
            print(json.dumps(results if len(results) > 1 else results[0], indent=1))
        else:
            for r in results:
                print(f"{r['recipe']} on {r['chips']} x {r['chip']}:")
                for st in r["stages"]:
                    if st.get("error"):
                        print(f"  {st['name']:>10} {st['kind']:>5} {st['steps']:>9,} steps  seq {st['seq_len']:>6}  "
                              f"does not fit: {st['error'].split(': ', 1)[-1]}")
                        continue
                    print(f"  {st['name']:>10} {st['kind']:>5} {st['steps']:>9,} steps  seq {st['seq_len']:>6}  "
                          f"{st['step_time_s']:8.3f} s/step  {st['days']:7.2f} days  ${st['cost_usd'] / 1e3:,.1f}k"
                          + ("" if st["fits"] else "  DOES NOT FIT"))
                t = r["total"]
                print(f"  {'total':>10} {'':>5} {'':>15} {'':>11} {'':>13} {t['days']:7.2f} days  ${t['cost_usd'] / 1e3:,.1f}k  "
                      f"{t['energy_mwh']:,.0f} MWh" + ("" if r["all_fit"] else "  (stages that do not fit left out)"))
        return 0
    if args.compare:
        targets = parse_compare(args.compare)
        rows = compare(cfg, targets, opts)
        out = Path(args.out or "plan-compare.png")
        report.compare_chart(rows, out, f"{cfg.description or args.preset}: {rows[0].get('tokens', 0) / 1e12:.2g}T tokens")
        if args.json:
            print(json.dumps({"plans": rows, "chart": str(out)}, indent=1))
        else:
            print(report.compare_table(rows))
            print(f"chart: {out}")
        return 0
    if not args.chip or not args.chips:
        raise UserError("plan: give --chip and --chips (or --compare CHIP:N,...)")
    result = plan(cfg, opts)
    if args.aot:
        from crosstrain.hardware import get_chip
        from crosstrain.planner.aot import compile_step

        result["aot"] = compile_step(cfg, get_chip(args.chip), result["parallelism"], result["chips"], result["remat"],
                                     slices=args.slices)
    print(json.dumps(result, indent=1) if args.json else report.plan_table(result))
    return 0


def cmd_bench(args) -> int:
    from crosstrain import log as logsetup
    from crosstrain.bench import bench, describe
    from crosstrain.config import check_paths

    cfg = _load_config(args)
    check_paths(cfg, ("data",))  # the data and tokenizer it reads
    if args.steps < 1:
        raise UserError(f"--steps: must be >= 1, got {args.steps}")
    logsetup.setup()
    _compilation_cache()
    result = bench(cfg, steps=args.steps, profile=Path(args.profile) if args.profile else None)
    print(json.dumps(result, indent=1) if args.json else describe(result))
    return 0


def cmd_compare(args) -> int:
    from crosstrain.compare import finals, load_runs, plot, table

    runs = load_runs(args.run_dirs)
    rows = finals(runs)
    out = Path(args.out) if args.out else None
    if out is not None:
        if not out.parent.is_dir():
            raise UserError(f"--out: the folder {out.parent} does not exist")
        plot(runs, out)
    if args.json:
        print(json.dumps({"runs": rows, "chart": str(out) if out else None}, indent=1))
    else:
        print(table(rows))
        if out is not None:
            print(f"chart: {out}")
    return 0


def cmd_tokenize(args) -> int:
    from crosstrain import log as logsetup
    from crosstrain.config import check_paths
    from crosstrain.data.pipeline import build_pipeline

    cfg = _load_config(args)
    check_paths(cfg, ("data",))
    logsetup.setup()
    pipeline = build_pipeline(cfg, write_files=False)
    print(json.dumps(pipeline.report(), indent=2))
    return 0


def cmd_launch(args) -> int:
    from crosstrain.parallel.distributed import launch

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    return launch(command, processes=args.processes, devices_per_process=args.devices_per_process, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="crosstrain", description="Pre-train AFM-style language models on any JAX accelerator.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model (resumes if --run-dir holds a run)")
    _add_config_args(p)
    p.add_argument("--run-dir", required=True, help="where config, metrics, checkpoints and plots go")
    _add_process_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="predict time, memory, cost and energy of a run on N chips of any accelerator")
    _add_config_args(p, preset_required=False)
    p.add_argument("--chip", help="catalog name (tpu-v4, tpu-v5p, trn2, h100-sxm, ...)")
    p.add_argument("--chips", type=int)
    p.add_argument("--tokens", help="token budget, e.g. 6.3T (default: the preset's steps x batch x seq_len)")
    p.add_argument("--parallelism", help="pin a layout: tp=..,pp=..,dp=..,fsdp=..,cp=..,microbatch=.. (default: search)")
    p.add_argument("--remat", choices=["none", "selective", "dots", "attention", "full"],
                   help="pin the recomputation policy (default: search)")
    p.add_argument("--slices", type=int, default=1,
                   help="TPU slices the chips form (multi-slice: data parallelism across slices over DCN)")
    p.add_argument("--objective", choices=["time", "cost"], default="time",
                   help="time: fastest layout on --chips; cost: cheapest run using up to --chips")
    p.add_argument("--price", type=float, help="USD per chip-hour (default: the catalog's list price)")
    p.add_argument("--power", type=float, help="watts per chip (default: the catalog's figure)")
    p.add_argument("--power-cap", type=float, help="chips run under this power cap (W): lower sustained clocks")
    p.add_argument("--pue", type=float, default=1.0, help="data-centre power usage effectiveness for energy")
    p.add_argument("--compare", help="several options side by side: CHIP:N,CHIP:N,... (writes a PNG chart)")
    p.add_argument("--out", help="where --compare writes its chart (default plan-compare.png)")
    p.add_argument("--cases", help="validate against published runs in this CSV (shared/planner/cases.csv schema)")
    p.add_argument("--recipe", help="plan every stage of a recipe (crosstrain recipe) on --chip/--chips or --compare")
    p.add_argument("--aot", action="store_true", help="also compile crosstrain's step for a TPU topology with libtpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("bench", help="measure the train step on this hardware (tokens/s, MFU, overheads)")
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    p.add_argument("--profile", help="write a jax.profiler trace of the timed steps into this folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("prune", help="prune a run's MLP hidden units with learned Soft-Top-K masks into a new, smaller run")
    p.add_argument("--from", dest="source", required=True, help="the run to prune (its latest checkpoint)")
    p.add_argument("--ffn", type=int, required=True, help="MLP hidden units to keep per layer")
    p.add_argument("--steps", type=int, default=100, help="mask-learning steps on the source's training stream")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate of the mask scores")
    p.add_argument("--data", help="learn the masks on this data instead of the source run's")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                   help="settings of the new run (train.steps=..., optim.lr=...)")
    p.add_argument("--run-dir", required=True, help="the new run directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("recipe", help="run a staged recipe (train / prune stages) in order, resumably")
    p.add_argument("--recipe", required=True, help="a shipped recipe (afm-on-device, afm-on-device-demo) or a YAML file")
    p.add_argument("--run-dir", required=True, help="one run directory per stage goes under here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recipe)

    p = sub.add_parser("compare", help="several runs side by side: loss and throughput in one PNG, final numbers")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="write the comparison chart (PNG) here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a run's latest checkpoint")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--text-file", help="evaluate on this text (default: the run's held-out data)")
    p.add_argument("--data", help="evaluate on the held-out part of this data")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a run's latest checkpoint as a Hugging Face model directory")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="weight dtype (default: the run's param_dtype)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="start a run from a Hugging Face Qwen3 or Llama model directory")
    p.add_argument("--hf", required=True, help="a directory with config.json, safetensors weights and tokenizer.json")
    p.add_argument("--run-dir", required=True, help="the new run directory")
    p.add_argument("--preset", help="training settings (the model shape comes from --hf)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("tokenize", help="build (or reuse) the tokenizer and token stores of a config, print the data report")
    _add_config_args(p)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("launch", help="run a crosstrain command as N processes on this machine (127.0.0.1)")
    p.add_argument("--processes", type=int, required=True)
    p.add_argument("--devices-per-process", type=int, help="CPU devices per process")
    p.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the crosstrain command, e.g. -- train --preset tiny ...")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("generate", help="sample text from a run's latest checkpoint")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    skip_absent_tpu()
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"crosstrain: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        from crosstrain.train.faults import TrainingHalted

        if isinstance(e, TrainingHalted):
            print(f"crosstrain: halted: {e}", file=sys.stderr)
            return e.exit_code
        raise
    except KeyboardInterrupt:
        print("crosstrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
