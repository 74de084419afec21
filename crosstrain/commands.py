"""One function per `crosstrain` command: each reads its parsed arguments, does the work through
the modules that own it, prints, and returns the exit status. The parser and the mapping of user
mistakes to exit 2 are in cli.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from crosstrain.errors import UserError

STARTED = time.perf_counter()  # when the program started, for the goodput ledger


def _load_config(args):
    """--preset with --set and --data, values validated."""
    from crosstrain.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.append(f"data.path={args.data}")
    return load_config(args.preset, overrides)


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


def _make_run_dir(name: str, *, create: bool = True) -> Path:
    """The directory a command writes a run into: a local one (made now unless `create` is False:
    the command makes it once its input is checked), or the working copy of one in a bucket
    (crosstrain/storage.py; its files go back to the bucket as the command goes on)."""
    from crosstrain.storage import open_run

    run_dir = open_run(name, create=True)
    if not create:
        return run_dir
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
    train(cfg, run_dir, started=STARTED)
    from crosstrain.parallel import distributed

    distributed.finish()
    return 0


def cmd_generate(args) -> int:
    from crosstrain import log as logsetup
    from crosstrain.generate import Sampling, generate

    logsetup.setup()
    given = [name for name, v in (("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p))
             if v is not None]
    if args.greedy and given:
        raise UserError(f"--greedy: takes the most likely token, so {', '.join(given)} would do nothing; give one or the other")
    sampling = Sampling(
        greedy=args.greedy, temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed
    )
    if not args.run_dir.startswith(("gs://", "s3://")) and not Path(args.run_dir).is_dir():
        raise UserError(f"--run-dir: {args.run_dir} does not exist")
    out = generate(_run_dir(args.run_dir), args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling)
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


def _run_dir(path: str, field: str = "--run-dir") -> Path:
    """An existing run directory to read: local, or a working copy of one in a bucket."""
    from crosstrain.storage import local_run

    run_dir = local_run(path, field)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{field}: {path} is not a crosstrain run directory (no config.yaml)")
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
    from crosstrain.storage import push

    logsetup.setup()
    cfg = load_config(args.preset, args.overrides) if args.preset else config_from_dict({}, args.overrides)
    hf_dir = Path(args.hf)
    if not hf_dir.is_dir():
        raise UserError(f"--hf: {hf_dir} is not a directory")
    cfg = apply_hf_model(cfg, hf_dir)
    if not (hf_dir / "tokenizer.json").is_file():
        raise UserError(f"--hf: {hf_dir} has no tokenizer.json (the run keeps the model's own tokenizer)")
    run_dir = _make_run_dir(args.run_dir)  # only once the model is known to be importable
    refuse_existing_checkpoints(run_dir, "import")
    params = load_hf_params(hf_dir, cfg.model)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(hf_dir / "tokenizer.json", run_dir / "tokenizer.json")
    cfg = cfg.override(data={"tokenizer": str((run_dir / "tokenizer.json").absolute())})
    write_new_run(run_dir, cfg, params, {"imported_from": str(hf_dir)})
    push(run_dir)
    result = {"run_dir": args.run_dir, "model": cfg.to_dict()["model"], "parameters": param_count(cfg.model)}
    print(json.dumps(result) if args.json else
          f"imported {result['parameters'] / 1e6:.2f}M parameters into {args.run_dir}; continue with: "
          f"crosstrain train --preset {Path(args.run_dir) / 'config.yaml'} --run-dir {args.run_dir}")
    return 0


def cmd_prune(args) -> int:
    from crosstrain import log as logsetup
    from crosstrain.prune import prune

    logsetup.setup()
    _compilation_cache()
    from crosstrain.storage import push

    source = _run_dir(args.source, "--from")
    out = _make_run_dir(args.run_dir, create=False)
    result = prune(source, out, ffn=args.ffn, steps=args.steps, lr=args.lr, overrides=tuple(args.overrides),
                   data=args.data)
    push(out)
    print(json.dumps(result, indent=1) if args.json else
          f"pruned the MLPs of {source} from {result['ffn'][0]} to {result['ffn'][1]} hidden units "
          f"({result['parameters'][0] / 1e6:.2f}M -> {result['parameters'][1] / 1e6:.2f}M parameters); held-out loss "
          f"{result['heldout_loss_full']:.4f} -> {result['heldout_loss_pruned']:.4f} before retraining; continue with: "
          f"crosstrain train --preset {Path(args.run_dir) / 'config.yaml'} --run-dir {args.run_dir}")
    return 0


def cmd_recipe(args) -> int:
    from crosstrain import log as logsetup
    from crosstrain.recipe import describe, run_recipe

    run_dir = _make_run_dir(args.run_dir)
    logsetup.setup(run_dir)
    _compilation_cache()
    result = run_recipe(args.recipe, run_dir)
    print(json.dumps(result, indent=1) if args.json else f"{describe(result)}\nwrote {run_dir / 'recipe.json'}")
    return 0


def cmd_eval(args) -> int:
    from crosstrain import log as logsetup
    from crosstrain.evaluate import evaluate_run

    logsetup.setup()
    if args.text_file and args.data:
        raise UserError("eval: give --text-file or --data, not both")
    if args.max_tokens < 0:
        raise UserError(f"--max-tokens: must be >= 0, got {args.max_tokens}")
    result = evaluate_run(_run_dir(args.run_dir), text_file=Path(args.text_file) if args.text_file else None, data=args.data,
                          max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"loss {result.loss:.4f} ± {result.loss_se:.4f} (standard error over {result.windows:,} windows)  "
              f"perplexity {result.perplexity:.2f}  bits/byte {result.bits_per_byte:.4f}  "
              f"({result.tokens:,} tokens, {result.bytes:,} bytes)")
    return 0


def cmd_plan(args) -> int:
    from crosstrain.config import parse_count
    from crosstrain.planner import report
    from crosstrain.planner.plan import Options, compare, parse_compare, parse_parallelism, plan

    if args.cases:
        from crosstrain.planner.cases import evaluate_cases

        result = evaluate_cases(Path(args.cases))
        if args.out:
            report.cases_chart(result, Path(args.out))
            result["chart"] = args.out
        print(json.dumps(result, indent=1) if args.json else report.cases_table(result))
        if args.out and not args.json:
            print(f"chart: {args.out}")
        return 0
    if not args.preset and not args.recipe:
        raise UserError("plan: --preset is required (or --cases FILE.csv, or --recipe)")
    cfg = _load_config(args) if args.preset else None
    opts = Options(
        chip=args.chip or "", chips=args.chips or 0,
        tokens=parse_count(args.tokens, "--tokens") if args.tokens else None,
        parallelism=parse_parallelism(args.parallelism) if args.parallelism else None,
        remat=args.remat, price=args.price, power=args.power, power_cap=args.power_cap, pue=args.pue,
        objective=args.objective, slices=args.slices, max_days=args.max_days,
        software=args.software if args.software in ("crosstrain", "published") else "crosstrain",
    )
    if args.recipe:
        from crosstrain.recipe import plan_recipe

        targets = parse_compare(args.compare) if args.compare else [(args.chip or "", args.chips or 0)]
        if not all(c and n for c, n in targets):
            raise UserError("plan --recipe: give --chip and --chips, or --compare CHIP:N,...")
        results = [plan_recipe(args.recipe, c, n) for c, n in targets]
        out = Path(args.out) if args.out else None
        if out is not None:
            report.recipe_compare_chart(results, out)
        if args.json:
            print(json.dumps(results if len(results) > 1 else results[0], indent=1))
        else:
            print("\n".join(report.recipe_table(r) for r in results))
        if out is not None:
            print(f"chart: {out}", file=sys.stderr if args.json else sys.stdout)
        return 0
    if args.compare:
        targets = parse_compare(args.compare)
        both = args.software in (None, "both")
        rows = compare(cfg, targets, opts, software=("crosstrain", "published") if both else (args.software,))
        out = Path(args.out or "plan-compare.png")
        report.compare_chart(rows, out, f"{cfg.description or args.preset}: {rows[0].get('tokens', 0) / 1e12:.2g}T tokens")
        if args.json:
            print(json.dumps({"plans": rows, "chart": str(out)}, indent=1))
        else:
            print(report.compare_table(rows))
            print(f"chart: {out}")
        return 0
    if args.chips is not None and args.chips < 1:
        raise UserError(f"--chips: must be >= 1, got {args.chips}")
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
    return launch(command, processes=args.processes, devices_per_process=args.devices_per_process, port=args.port,
                  process_caches=args.process_caches)


