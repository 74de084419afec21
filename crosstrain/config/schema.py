"""The config's shape: one frozen dataclass per section, every key documented where it is declared,
and the one way a Config is built from plain data (`config_from_dict`) or changed (`Config.override`),
both validated."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

from crosstrain.config.checks import validate
from crosstrain.config.coerce import build, plain
from crosstrain.errors import ConfigError

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
    # Global batches of held-out windows each evaluation takes; 0: every held-out token, which is
    # what `crosstrain eval` takes, so the two report the same loss (crosstrain/evaluate.py).
    eval_batches: int = 0
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

    FROM_STRING: ClassVar[str] = "path"  # a source written as a bare string is its path

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
        data = plain(dataclasses.asdict(self))
        data.pop("explicit", None)
        return data

    def replace(self, **sections: Any) -> "Config":
        """Sections swapped for already-built ones (no checks: for resolved, validated parts)."""
        return dataclasses.replace(self, **sections)

    def override(self, *settings: str, **sections: Any) -> "Config":
        """A new, validated Config: this one with `sections` changed, then `settings` on top.

        A section given as a mapping changes those keys only (`model={"remat": "full"}`); given as
        an instance it replaces the whole section (`data=DataConfig()`: back to the defaults);
        `description="..."` sets the description. `settings` are "section.key=value" strings, as
        `--set` takes them. Values are coerced and checked as a preset's are (ConfigError naming
        the field). `explicit` stays this config's: what the user's preset and --set named."""
        raw = self.to_dict()
        for name, value in sections.items():
            if name == "description":
                raw["description"] = str(value)
            elif name not in SECTIONS:
                raise TypeError(f"Config.override: no section {name!r}")  # a bug, not a user mistake
            elif dataclasses.is_dataclass(value):
                raw[name] = plain(dataclasses.asdict(value))
            elif isinstance(value, Mapping):
                raw[name] = {**raw[name], **value}
            else:
                raise TypeError(f"Config.override: {name} must be a mapping or a {name} section")
        return dataclasses.replace(config_from_dict(raw, settings), explicit=self.explicit)

    def fingerprint(self, sections: tuple[str, ...] = ("model", "optim", "train", "data")) -> str:
        """A SHA-256 of the sections that decide what a run computes."""
        data = {k: v for k, v in self.to_dict().items() if k in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


SECTIONS: dict[str, type] = {
    f.name: f.type for f in dataclasses.fields(Config) if f.name not in ("description", "explicit")
}
_SECTION_TYPES = typing.get_type_hints(Config)


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


def config_from_dict(raw: Mapping[str, Any], overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Build and validate a Config from a preset-shaped mapping plus 'section.key=value' strings.

    Values only: whether the files it names exist is for the commands that read them
    (`check_paths`). `explicit` is every key the mapping and the overrides name."""
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
        name: build(_SECTION_TYPES[name], merged.get(name, {}), name) for name in SECTIONS
    }
    explicit = frozenset(f"{sec}.{key}" for sec, values in merged.items() for key in values)
    cfg = Config(description=description, explicit=explicit, **sections)
    validate(cfg)
    return cfg
