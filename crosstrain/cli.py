"""The `crosstrain` command line: the argument parser and `main`.

User mistakes (bad flags, presets, overrides, paths, meshes) print one line on stderr and exit 2;
anything else is a bug and keeps its traceback. What each command does is in commands.py; the
program's entry point (huge pages, then `main`) is crosstrain/entry.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from crosstrain import commands as c
from crosstrain.errors import UserError
from crosstrain.platform import skip_absent_accelerators


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where it has one its help does not already state."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, exit 2; main() names the program once
        command = self.prog.partition(" ")[2]
        raise UserError(f"{command}: {message}" if command else message)


# Options whose value may start with "-" (a negative number, which the command then refuses with a
# clear reason): argparse would take "-5T" for an option and report a missing argument instead.
_VALUE_OPTIONS = ("--tokens", "--chips", "--steps", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
                  "--ffn", "--price", "--power", "--pue", "--slices", "--processes", "--max-tokens", "--max-days")


def _join_values(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            out += args[i:]
            break
        if a in _VALUE_OPTIONS and i + 1 < len(args) and args[i + 1][:1] == "-" and args[i + 1][1:2].isdigit():
            out.append(f"{a}={args[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("crosstrain")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


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


def _add_process_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("many processes (default: CROSSTRAIN_* variables, or a detected TPU/SLURM/MPI cluster)")
    g.add_argument("--coordinator", help="host:port of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    g.add_argument("--cpu-devices", type=int, help="CPU devices this process exposes (testing multi-device on a CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="crosstrain", description="Pre-train AFM-style language models on any JAX accelerator.")
    parser.add_argument("--version", action="version", version=f"crosstrain {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model (resumes if --run-dir holds a run)")
    _add_config_args(p)
    p.add_argument("--run-dir", required=True, help="where config, metrics, checkpoints and plots go")
    _add_process_args(p)
    p.set_defaults(func=c.cmd_train)

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
                   help="time: fastest layout on --chips; cost: cheapest run using up to --chips (within --max-days)")
    p.add_argument("--max-days", type=float, help="a deadline for --objective cost: the cheapest plan that finishes in time")
    p.add_argument("--software", choices=["crosstrain", "published", "both"],
                   help="whose training step is priced: crosstrain's own (a plan's default), the best published "
                        "software for the chip (flash attention everywhere, pipeline and context parallelism), or both "
                        "(--compare's default)")
    p.add_argument("--price", type=float, help="USD per chip-hour (default: the catalog's list price)")
    p.add_argument("--power", type=float, help="watts per chip (default: the catalog's figure)")
    p.add_argument("--power-cap", type=float, help="chips run under this power cap (W): lower sustained clocks")
    p.add_argument("--pue", type=float, default=1.0, help="data-centre power usage effectiveness for energy")
    p.add_argument("--compare", help="several options side by side: CHIP:N,CHIP:N,... (writes a PNG chart)")
    p.add_argument("--out", help="where --compare writes its chart (default plan-compare.png); with --cases, "
                                 "a chart of predicted against published speed")
    p.add_argument("--cases", help="validate against the published runs in this CSV; the shipped set is "
                                   "crosstrain/planner/data/published_cases.csv (docs/planner.md gives the columns)")
    p.add_argument("--recipe", help="plan every stage of a recipe (crosstrain recipe) on --chip/--chips or --compare")
    p.add_argument("--aot", action="store_true",
                   help="also compile crosstrain's step for the plan's TPU topology (libtpu, the tpu extra) or GPU "
                        "cluster (the CUDA plugin, the cuda extra) and compare XLA's memory with the planner's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=c.cmd_plan)

    p = sub.add_parser("bench", help="measure the train step on this hardware (tokens/s, MFU, overheads)")
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    p.add_argument("--profile", help="write a jax.profiler trace of the timed steps into this folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=c.cmd_bench)

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
    p.set_defaults(func=c.cmd_prune)

    p = sub.add_parser("recipe", help="run a staged recipe (train / prune stages) in order, resumably")
    p.add_argument("--recipe", required=True, help="a shipped recipe (afm-on-device, afm-on-device-demo) or a YAML file")
    p.add_argument("--run-dir", required=True, help="one run directory per stage goes under here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=c.cmd_recipe)

    p = sub.add_parser("compare", help="several runs side by side: loss and throughput in one PNG, final numbers")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="write the comparison chart (PNG) here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=c.cmd_compare)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a run's latest checkpoint")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--text-file", help="evaluate on this text (default: the run's held-out data)")
    p.add_argument("--data", help="evaluate on the held-out part of this data")
    p.add_argument("--max-tokens", type=int, default=0,
                   help="evaluate only the first N tokens (0: all of them, as the in-run evaluation does by default)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=c.cmd_eval)

    p = sub.add_parser("export", help="write a run's latest checkpoint as a Hugging Face model directory")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="weight dtype (default: the run's param_dtype)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=c.cmd_export)

    p = sub.add_parser("import", help="start a run from a Hugging Face Qwen3 or Llama model directory")
    p.add_argument("--hf", required=True, help="a directory with config.json, safetensors weights and tokenizer.json")
    p.add_argument("--run-dir", required=True, help="the new run directory")
    p.add_argument("--preset", help="training settings (the model shape comes from --hf)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=c.cmd_import)

    p = sub.add_parser("tokenize", help="build (or reuse) the tokenizer and token stores of a config, print the data report")
    _add_config_args(p)
    p.set_defaults(func=c.cmd_tokenize)

    p = sub.add_parser("launch", help="run a crosstrain command as N processes on this machine (127.0.0.1)")
    p.add_argument("--processes", type=int, required=True)
    p.add_argument("--devices-per-process", type=int, help="CPU devices per process")
    p.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    p.add_argument("--process-caches", metavar="DIR",
                   help="give each process its own $CROSSTRAIN_CACHE and working directory under DIR (p0, p1, ...): "
                        "processes that share no local directory, as on separate hosts")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the crosstrain command, e.g. -- train --preset tiny ...")
    p.set_defaults(func=c.cmd_launch)

    p = sub.add_parser("generate", help="sample text from a run's latest checkpoint")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true",
                   help="always take the most likely token (no sampling: --temperature, --top-k and --top-p do not apply)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, help="sample within this probability mass (default 1.0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=c.cmd_generate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; its exit status. A process of a multi-process job that fails leaves at
    once (crosstrain/parallel/distributed.py `abandon`), its error or traceback printed first."""
    from crosstrain.parallel import distributed

    try:
        code = _main(argv)
    except BaseException as e:
        if distributed.joined() and not isinstance(e, SystemExit):
            import traceback

            traceback.print_exc()
            distributed.abandon(1)
        raise
    if code and distributed.joined():
        distributed.abandon(code)
    return code


def _main(argv: Optional[Sequence[str]]) -> int:
    skip_absent_accelerators()
    try:
        args = build_parser().parse_args(_join_values(sys.argv[1:] if argv is None else argv))
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
