"""Checks of a config: values and cross-field rules (`validate`, run on every config built), the
files it names (`check_paths`, run only by the commands that read them), and which differences a
checkpoint can be resumed across (`resume_differences`).

`cfg` is a `crosstrain.config.Config`; this module reads its fields and imports none of its types.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from crosstrain.errors import ConfigError

Config = Any  # crosstrain.config.Config (not imported: the schema module imports this one)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(name, f"must be positive, got {value}")


def validate(cfg: Config) -> None:
    """Every value and cross-field rule (ConfigError naming the field). Files are not looked at:
    `check_paths` does that, for the commands that read them."""
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
    for i, s in enumerate(d.sources):
        if not s.path:
            raise ConfigError(f"data.sources[{i}].path", "is empty")
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
    dist = cfg.distill
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


def check_paths(cfg: Config, sections: Sequence[str] = ("data", "init", "distill")) -> None:
    """The files and directories that `sections` of the config name exist (ConfigError naming the
    field). Called by the commands that read them: train (all three), tokenize, bench and the
    data a prune or an evaluation reads (`data`)."""
    from crosstrain.storage import check_reachable, is_remote

    def exists(path: str, field: str) -> bool:
        if is_remote(path):
            check_reachable(path, field, must_exist=True)  # exit 2 with the bucket's answer
            return True
        check_reachable(path, field)  # refuses a URL of another scheme
        return Path(path).exists()

    if "data" in sections:
        d = cfg.data
        if d.path and not exists(d.path, "data.path"):
            raise ConfigError("data.path", f"{d.path} does not exist")
        if d.tokenizer and not exists(d.tokenizer, "data.tokenizer"):
            raise ConfigError("data.tokenizer", f"{d.tokenizer} does not exist")
        for i, s in enumerate(d.sources):
            if not exists(s.path, f"data.sources[{i}].path"):
                raise ConfigError(f"data.sources[{i}].path", f"{s.path} does not exist")
    if "init" in sections:
        if cfg.init.from_run and not (exists(cfg.init.from_run, "init.from_run") and
                                      (is_remote(cfg.init.from_run) or Path(cfg.init.from_run).is_dir())):
            raise ConfigError("init.from_run", f"{cfg.init.from_run} is not a directory")
        if cfg.init.from_hf and not Path(cfg.init.from_hf).is_dir():
            raise ConfigError("init.from_hf", f"{cfg.init.from_hf} is not a directory")
    if "distill" in sections and cfg.distill.teacher and not (
            exists(cfg.distill.teacher, "distill.teacher") and
            (is_remote(cfg.distill.teacher) or Path(cfg.distill.teacher).is_dir())):
        raise ConfigError("distill.teacher", f"{cfg.distill.teacher} is not a directory")


# Keys that may change when a run is resumed: how it is laid out, logged and saved. Everything
# else decides what is computed and must match the checkpoint; how long it runs may change only
# where the learning-rate schedule stays the same (schedule_change).
RESUMABLE_KEYS = {
    "description",
    "train.steps",
    "optim.decay_steps",
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


def schedule_change(old: Config, new: Config) -> str | None:
    """Why resuming `old` as `new` would change its learning-rate schedule (None if it would not).

    The schedule runs over optim.decay_steps, or train.steps when that is 0: a resume that asks for
    more (or fewer) steps would otherwise stretch the schedule under steps already taken, and the
    run's config.yaml would no longer reproduce it."""
    before = old.optim.decay_steps or old.train.steps
    after = new.optim.decay_steps or new.train.steps
    if before == after:
        return None
    return (f"train.steps: the run was scheduled over {before} steps and {after} would change its learning-rate "
            f"schedule; to go on past step {before} on the schedule it ran, add optim.decay_steps={before} "
            "(config.yaml records it), or use a new --run-dir")


def resume_differences(old: Config, new: Config) -> list[str]:
    """Keys whose values differ in a way that a checkpoint cannot be resumed across (a changed
    learning-rate schedule is schedule_change's)."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    diffs = []
    for key in sorted(set(a) | set(b)):
        section = key.split(".")[0]
        if key in RESUMABLE_KEYS or section in ("mesh", "checkpoint", "init", "faults"):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs

