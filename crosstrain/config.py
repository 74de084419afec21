"""Run configuration: frozen dataclasses, shipped YAML presets, typed `--set` overrides.

A config is built in one place (`load_config`) and validated once, before anything compiles:
a wrong type or an impossible value raises `ConfigError` naming the field. The resolved config is
plain data (`to_dict`) and is written whole to the run directory so a run can be reproduced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from crosstrain.errors import ConfigError, UserError
from crosstrain.files import atomic_write

Dtype = Literal["bfloat16", "float32"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the AFM-style decoder."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    ffn: int = 128
    vocab: int = 512
    seq_len: int = 64
    rope_base: float = 500_000.0
    tie_embeddings: bool = True
    qk_norm: bool = True
    norm_eps: float = 1e-6
    # Matmul inputs (accumulation is always fp32). "auto": bf16 on accelerators; on a CPU, the
    # faster of the two on this machine, from its measured GEMM rates (crosstrain/resolve.py):
    # AMX or Zen 5 bf16 units make bf16 the faster, AVX-512 without them fp32.
    compute_dtype: Literal["auto", "bfloat16", "float32"] = "bfloat16"
    param_dtype: Dtype = "float32"
    # Activations between matmuls. "auto": fp32 on a CPU, where XLA has no native bf16 arithmetic
    # and every bf16 activation costs conversions (docs/performance.md); the compute dtype on
    # accelerators, where bf16 activations halve activation memory.
    activation_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # Activation recomputation in the backward pass (model/transformer.py REMAT_POLICIES):
    # none keeps everything; selective keeps the weight matmuls' outputs (q/k/v, attention output
    # and its projection, MLP gate/up) in the activation dtype; dots keeps every weight matmul's
    # output as computed (JAX's dots_with_no_batch_dims_saveable) and the attention kernel's
    # residuals; attention keeps only the attention output (with Splash, the kernel's own output
    # and log-sum-exp) and recomputes the rest; full keeps only each layer's input. "auto": the
    # least recomputation whose planned memory fits the device (crosstrain/resolve.py).
    remat: Literal["auto", "none", "selective", "dots", "attention", "full"] = "auto"
    # lax.scan over stacked layers compiles once per layer shape; unrolled lets XLA fuse across.
    scan_layers: bool = True
    # Attention kernel (model/attention.py); "auto": Splash on TPU where the shape allows it,
    # cuDNN on NVIDIA GPUs, the fused reference on CPU, the reference elsewhere.
    attention: Literal["auto", "reference", "fused", "xla", "cudnn", "splash"] = "auto"
    # Transposed operands of the hand-written backward GEMMs (model/fused.py): "fold" leaves them
    # to the compiler, "copy" makes a row-major copy first (XLA CPU runs bf16 GEMMs only on
    # row-major operands); "auto": copy on a CPU, fold elsewhere.
    dot_transposes: Literal["auto", "fold", "copy"] = "auto"
    # How Pallas kernels (Splash) run: compiled for the TPU, or in Pallas interpret mode on any
    # backend (slow; for tests and debugging). "auto": compiled on TPU, interpreted elsewhere.
    kernel_mode: Literal["auto", "compiled", "interpret"] = "auto"


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (train/optimizer.py states the update rules)."""

    name: Literal["adamw", "adastar"] = "adamw"
    lr: float = 3e-3
    warmup_steps: int = 10
    # Cosine decays the schedule from 1 to this fraction of the peak.
    min_lr_ratio: float = 0.1
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # Steps over which warmup + decay run; 0 means train.steps.
    decay_steps: int = 0
    # Decoupled from the peak LR: each step multiplies weights by (1 - schedule(t) * weight_decay).
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    # Global-norm gradient clipping; 0 turns it off.
    clip: float = 1.0
    # adastar only: per-parameter RMS clip of the normalised update (AFM uses 1.0).
    update_clip: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 40
    batch: int = 8  # global batch, in sequences
    microbatches: int = 1  # gradient accumulation steps per optimizer step
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 0  # 0: only at the end of the run
    eval_every: int = 0  # 0: only at the end of the run
    eval_batches: int = 4
    # A jax.profiler trace of steps profile_start .. profile_start + profile_steps - 1 into
    # RUN_DIR/profile/ (XProf / TensorBoard's profile plugin, Perfetto); 0: no trace.
    profile_start: int = 0
    profile_steps: int = 3


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: each axis a size, or -1 to take what is left of the device count."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Data parallelism across TPU slices joined by the data-centre network (multi-slice): the
    # outermost axis, so only gradient reductions cross the slow link. A mesh rule sets it to the
    # number of slices the devices span when the config leaves it unsaid.
    slice: int = 1
    # A mesh rule name (parallel/mesh.py), "auto" to pick one from the device kind, or "none".
    rule: str = "auto"


Format = Literal["auto", "text", "jsonl", "parquet", "hf"]


@dataclass(frozen=True)
class SourceConfig:
    """One data source of a mixture (data/sources.py describes the formats)."""

    path: str = ""
    format: Format = "auto"
    field: str = "text"  # JSONL key or Parquet / Arrow column holding the document
    glob: str = "**/*.txt"  # files of a text directory
    weight: float = 1.0


@dataclass(frozen=True)
class MixturePhase:
    """From global step `step` on, sample the sources with these weights (one per source)."""

    step: int = 0
    weights: tuple[float, ...] = ()


@dataclass(frozen=True)
class DataConfig:
    # Empty: the built-in corpus (the Python standard library of the running interpreter).
    path: str = ""
    format: Format = "auto"
    field: str = "text"
    glob: str = "**/*.txt"
    # Several weighted sources instead of `path`.
    sources: tuple[SourceConfig, ...] = ()
    # Later phases of the mixture weights (the sources' own weights hold from step 0).
    mixture: tuple[MixturePhase, ...] = ()
    # A Hugging Face tokenizer.json to use; empty trains a byte-level BPE of model.vocab tokens.
    tokenizer: str = ""
    # Read at most this many bytes of the corpus (0: all of it). Keeps tests and demos quick.
    max_bytes: int = 0
    # Fraction of documents held out for evaluation.
    holdout: float = 0.01


@dataclass(frozen=True)
class CheckpointConfig:
    keep: int = 3  # keep the newest K committed checkpoints
    keep_every: int = 0  # and additionally every step that is a multiple of P (0: none)
    async_save: bool = True
    every_minutes: float = 0.0  # also save when this much wall time passed (0: off)


@dataclass(frozen=True)
class FaultsConfig:
    """What to do about numerical faults (train/faults.py)."""

    # A non-finite loss or gradient: skip that update (params and optimizer state unchanged) or
    # stop the run (exit 3).
    nonfinite: Literal["skip", "halt"] = "skip"
    # Loss-spike rollback (PaLM): a loss above mean + spike_sigma x std of the last spike_window
    # losses restores the last checkpoint and skips the batches since, through the spike's batch
    # and spike_skip more. 0 turns it off.
    spike_sigma: float = 0.0
    spike_window: int = 32
    spike_skip: int = 0
    # Testing: poison the batch with this 1-based index (its loss NaN, or x100 for a spike).
    inject_nan_batch: int = 0
    inject_spike_batch: int = 0


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from a teacher run (AFM's on-device recipe: crosstrain/train/distill.py)."""

    # A teacher run directory: its latest parameters run forward inside the same compiled step,
    # sharded by the same rules. Empty: no distillation.
    teacher: str = ""
    # top1: the target is a convex mix of the true next token and the teacher's top-1 prediction
    # (AFM); kl: the teacher's softened distribution at `temperature` (Hinton et al.).
    mode: Literal["top1", "kl"] = "top1"
    teacher_weight: float = 0.9  # weight of the teacher's target; 1 - it on the true token
    temperature: float = 1.0  # kl mode only


@dataclass(frozen=True)
class InitConfig:
    """Where a new run's parameters come from when its run directory has no checkpoint yet."""

    # Another run directory: start from its latest parameters with a fresh optimizer. This is how
    # AFM's stages chain (core -> continued -> context lengthening); shapes must match.
    from_run: str = ""
    # A Hugging Face Qwen3 or Llama directory: the model shape, weights and tokenizer come from it.
    from_hf: str = ""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init: InitConfig = field(default_factory=InitConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    description: str = ""
    # "section.key" names the preset or --set gave; a mesh rule only fills in the others.
    explicit: frozenset = field(default=frozenset(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = _plain(dataclasses.asdict(self))
        data.pop("explicit", None)
        return data

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)

    def fingerprint(self, sections: tuple[str, ...] = ("model", "optim", "train", "data")) -> str:
        """A SHA-256 of the sections that decide what a run computes."""
        data = {k: v for k, v in self.to_dict().items() if k in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


SECTIONS: dict[str, type] = {
    f.name: f.type for f in dataclasses.fields(Config) if f.name not in ("description", "explicit")
}
_SECTION_TYPES = typing.get_type_hints(Config)


# --------------------------------------------------------------------------------------------
# Type coercion: one function turns YAML values and --set strings into a field's declared type.


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(name, f"must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        item_tp = args[0]
        if isinstance(value, str):
            value = _yaml_value(value, name)
        if value is None:
            return ()
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str):
            value = {"path": value} if tp is SourceConfig else _yaml_value(value, name)
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a mapping, got {value!r}")
        return _build(tp, value, name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(name, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = math.nan
                if math.isfinite(f) and f.is_integer():
                    return int(f)
        raise ConfigError(name, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(name, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(name, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(name, f"expected a string, got {value!r}")
        return "" if value is None else str(value)
    raise TypeError(f"unsupported config type {tp!r} for {name}")  # a bug, not a user mistake


def _yaml_value(text: str, name: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(name, f"not valid YAML: {str(e).splitlines()[0]}") from None


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{prefix}.{key}", f"unknown key (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in values.items()}
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Presets and overrides.


def shipped_presets() -> list[str]:
    root = resources.files("crosstrain") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_preset(name_or_path: str) -> dict[str, Any]:
    """The raw mapping of a shipped preset name or a path to a user's YAML file."""
    root = resources.files("crosstrain") / "presets"
    shipped = root / f"{name_or_path}.yaml"
    if shipped.is_file():
        text, where = shipped.read_text(), f"preset {name_or_path}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(
                f"--preset: unknown preset '{name_or_path}' and no such file "
                f"(shipped: {', '.join(shipped_presets())})"
            )
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--preset: cannot read {path}: {e}") from None
        where = str(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a preset must be a mapping of sections (model, optim, ...)")
    return raw


def parse_override(text: str) -> tuple[str, str, str]:
    """'section.key=value' -> (section, key, value)."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like section.key=value")
    dotted, value = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(dotted, "an override key must be section.key (for example model.layers)")
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(dotted, f"unknown section '{section}' (known: {', '.join(SECTIONS)})")
    return section, key, value


def config_from_dict(raw: dict[str, Any], overrides: tuple[str, ...] | list[str] = (), *,
                     check_paths: bool = True) -> Config:
    """Build and validate a Config from a preset-shaped mapping plus 'section.key=value' strings.

    `check_paths=False` skips the checks that files named in the config exist (for reading a
    finished run's config: generate, eval and export need only the run directory)."""
    merged: dict[str, dict[str, Any]] = {}
    description = ""
    for section, values in raw.items():
        if section == "description":
            description = str(values or "")
            continue
        if section not in SECTIONS:
            raise ConfigError(section, f"unknown section (known: description, {', '.join(SECTIONS)})")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(section, "a section must be a mapping of key: value")
        merged[section] = dict(values)
    for text in overrides:
        section, key, value = parse_override(text)
        merged.setdefault(section, {})[key] = value
    sections = {
        name: _build(_SECTION_TYPES[name], merged.get(name, {}), name) for name in SECTIONS
    }
    explicit = frozenset(f"{sec}.{key}" for sec, values in merged.items() for key in values)
    cfg = Config(description=description, explicit=explicit, **sections)
    validate(cfg, check_paths=check_paths)
    return cfg


def load_config(preset: str, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    return config_from_dict(read_preset(preset), overrides)


def load_run_config(run_dir: str | Path) -> Config:
    """A run's config.yaml. The data, tokenizer and init paths it names need not exist any more
    (a run copied off a cluster): commands that read them check them where they do."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"--run-dir: {path} not found (is {run_dir} a crosstrain run directory?)")
    return config_from_dict(read_preset(str(path)), check_paths=False)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------------------------
# Validation: every cross-field rule, before anything compiles.


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(name, f"must be positive, got {value}")


def validate(cfg: Config, *, check_paths: bool = True) -> None:
    m, o, t, mesh, d, c = cfg.model, cfg.optim, cfg.train, cfg.mesh, cfg.data, cfg.checkpoint
    for key in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "seq_len"):
        _positive(f"model.{key}", getattr(m, key))
    if m.heads % m.kv_heads:
        raise ConfigError("model.heads", f"{m.heads} is not divisible by model.kv_heads ({m.kv_heads})")
    if m.head_dim % 2:
        raise ConfigError("model.head_dim", f"must be even for rotary embeddings, got {m.head_dim}")
    _positive("model.rope_base", m.rope_base)
    _positive("model.norm_eps", m.norm_eps)
    if m.seq_len < 2:
        raise ConfigError("model.seq_len", f"must be at least 2, got {m.seq_len}")

    _positive("optim.lr", o.lr)
    for key in ("warmup_steps", "decay_steps"):
        if getattr(o, key) < 0:
            raise ConfigError(f"optim.{key}", f"must be >= 0, got {getattr(o, key)}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    if o.weight_decay < 0:
        raise ConfigError("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    for key in ("b1", "b2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optim.{key}", f"must be in [0, 1), got {getattr(o, key)}")
    if o.eps < 0:
        raise ConfigError("optim.eps", f"must be >= 0, got {o.eps}")
    if o.clip < 0:
        raise ConfigError("optim.clip", f"must be >= 0 (0 turns clipping off), got {o.clip}")
    _positive("optim.update_clip", o.update_clip)

    for key in ("steps", "batch", "microbatches", "log_every"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("checkpoint_every", "eval_every", "eval_batches", "profile_start"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    _positive("train.profile_steps", t.profile_steps)
    if t.batch % t.microbatches:
        raise ConfigError("train.batch", f"{t.batch} is not divisible by train.microbatches ({t.microbatches})")

    fills = 0
    for key in ("slice", "data", "fsdp", "tensor"):
        v = getattr(mesh, key)
        if v == -1:
            fills += 1
        elif v < 1:
            raise ConfigError(f"mesh.{key}", f"must be a positive size or -1, got {v}")
    if fills > 1:
        raise ConfigError("mesh", "at most one of mesh.slice, mesh.data, mesh.fsdp, mesh.tensor may be -1")

    if d.max_bytes < 0:
        raise ConfigError("data.max_bytes", f"must be >= 0, got {d.max_bytes}")
    if not 0.0 <= d.holdout < 0.5:
        raise ConfigError("data.holdout", f"must be in [0, 0.5), got {d.holdout}")
    if d.path and d.sources:
        raise ConfigError("data.path", "give either data.path (--data) or data.sources, not both")
    if check_paths and d.path and not Path(d.path).exists():
        raise ConfigError("data.path", f"{d.path} does not exist")
    if check_paths and d.tokenizer and not Path(d.tokenizer).exists():
        raise ConfigError("data.tokenizer", f"{d.tokenizer} does not exist")
    for i, s in enumerate(d.sources):
        if not s.path:
            raise ConfigError(f"data.sources[{i}].path", "is empty")
        if check_paths and not Path(s.path).exists():
            raise ConfigError(f"data.sources[{i}].path", f"{s.path} does not exist")
        _positive(f"data.sources[{i}].weight", s.weight)
    n_sources = len(d.sources) or 1
    last = 0
    for i, phase in enumerate(d.mixture):
        name = f"data.mixture[{i}]"
        if phase.step <= last:
            raise ConfigError(f"{name}.step", f"phases must start at increasing steps after 0, got {phase.step}")
        last = phase.step
        if len(phase.weights) != n_sources:
            raise ConfigError(f"{name}.weights", f"needs one weight per source ({n_sources}), got {len(phase.weights)}")
        if any(w < 0 for w in phase.weights) or not sum(phase.weights) > 0:
            raise ConfigError(f"{name}.weights", "must be >= 0 with a positive sum")
    f = cfg.faults
    if f.spike_sigma < 0:
        raise ConfigError("faults.spike_sigma", f"must be >= 0 (0 turns rollback off), got {f.spike_sigma}")
    if f.spike_window < 2:
        raise ConfigError("faults.spike_window", f"must be at least 2, got {f.spike_window}")
    for key in ("spike_skip", "inject_nan_batch", "inject_spike_batch"):
        if getattr(f, key) < 0:
            raise ConfigError(f"faults.{key}", f"must be >= 0, got {getattr(f, key)}")
    if f.spike_sigma and not t.checkpoint_every:
        raise ConfigError("faults.spike_sigma", "loss-spike rollback needs checkpoints: set train.checkpoint_every")
    if check_paths and cfg.init.from_run and not Path(cfg.init.from_run).is_dir():
        raise ConfigError("init.from_run", f"{cfg.init.from_run} is not a directory")
    if check_paths and cfg.init.from_hf and not Path(cfg.init.from_hf).is_dir():
        raise ConfigError("init.from_hf", f"{cfg.init.from_hf} is not a directory")
    dist = cfg.distill
    if check_paths and dist.teacher and not Path(dist.teacher).is_dir():
        raise ConfigError("distill.teacher", f"{dist.teacher} is not a directory")
    if not 0.0 <= dist.teacher_weight <= 1.0:
        raise ConfigError("distill.teacher_weight", f"must be in [0, 1], got {dist.teacher_weight}")
    _positive("distill.temperature", dist.temperature)
    if cfg.init.from_hf and cfg.init.from_run:
        raise ConfigError("init.from_hf", "give init.from_hf or init.from_run, not both")

    _positive("checkpoint.keep", c.keep)
    if c.keep_every < 0:
        raise ConfigError("checkpoint.keep_every", f"must be >= 0, got {c.keep_every}")
    if c.every_minutes < 0:
        raise ConfigError("checkpoint.every_minutes", f"must be >= 0, got {c.every_minutes}")


# Keys that may change when a run is resumed: how it is laid out, logged and saved, and how long
# it runs. Everything else decides what is computed and must match the checkpoint.
RESUMABLE_KEYS = {
    "description",
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.eval_every",
    "train.eval_batches",
    "train.profile_start",
    "train.profile_steps",
    "model.remat",
    "model.scan_layers",
    "model.attention",
    "model.activation_dtype",
    "model.dot_transposes",
    "model.kernel_mode",
}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_differences(old: Config, new: Config) -> list[str]:
    """Keys whose values differ in a way that a checkpoint cannot be resumed across."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    diffs = []
    for key in sorted(set(a) | set(b)):
        section = key.split(".")[0]
        if key in RESUMABLE_KEYS or section in ("mesh", "checkpoint", "init", "faults"):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def parse_count(text: str, name: str) -> float:
    """'6.3T', '100B', '2.5e9' -> a number (for token budgets)."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}
    s = text.strip().upper().replace("_", "")
    factor = 1.0
    if s and s[-1] in scale:
        factor, s = scale[s[-1]], s[:-1]
    try:
        value = float(s) * factor
    except ValueError:
        raise ConfigError(name, f"expected a count such as 6.3T or 2e9, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise ConfigError(name, f"must be positive, got {text!r}")
    return value


def dtype_of(name: str):
    """The JAX dtype of a config dtype name; an unresolved "auto" is the portable bfloat16."""
    import jax.numpy as jnp

    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "auto": jnp.bfloat16}[name]


__all__ = [
    "Config",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "MeshConfig",
    "DataConfig",
    "SourceConfig",
    "MixturePhase",
    "CheckpointConfig",
    "InitConfig",
    "DistillConfig",
    "FaultsConfig",
    "load_config",
    "load_run_config",
    "config_from_dict",
    "save_config",
    "shipped_presets",
    "parse_count",
    "resume_differences",
]
