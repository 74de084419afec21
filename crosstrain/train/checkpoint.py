"""Checkpoints that never restore garbage.

Layout: RUN_DIR/checkpoints/<step>/{state, meta, manifest.json}. Orbax writes a step into a
temporary directory and renames it when complete ("committed"); crosstrain then *seals* it by
writing `manifest.json` (SHA-256 and size of every file) through a temporary file and a rename.
Only sealed steps count:

- a step Orbax committed but crosstrain never sealed (killed in between) is cleared into the trash
  when a run starts, before anything is saved again;
- at restore the manifest is checked against the files; a step that fails (truncated, changed or
  missing file) is reported on one line, renamed `corrupt-<step>-<time>` so it is never tried
  again, and the previous sealed step is used; if none is valid the run stops with exit 2;
- old steps are deleted (keep the newest `keep`, plus every multiple of `keep_every`) by first
  renaming them into `.trash/` and only then removing the files, so a kill mid-deletion cannot
  leave a half-deleted step that looks valid.

With several processes, process 0 alone seals, clears and moves steps; at restore, and before a
save over a step of the same number (after a rollback), the others wait at a barrier until it
has, then every process reads the list of steps afresh, so no process ever sees a stale step (one
that Orbax would refuse to save over). On object storage "afresh" includes dropping the client's
cached listings: a process that listed the steps before process 0 cleared an unsealed one would
otherwise still see it, and Orbax would refuse to save that step there while process 0 waited for
it in the save's collective.

On object storage (gs://, s3://; crosstrain/storage.py) there is no rename. Orbax then marks a
committed step with a `commit_success.txt` object instead of renaming its directory; crosstrain's
seal is still `manifest.json`, written last in one PUT (atomic), so a step without it never
counts. A step is discarded by deleting its seal first and its objects after, so a kill mid-delete
leaves an unsealed remnant that the next start clears, never a step that looks valid; a corrupt
step is moved aside (copied, then deleted) under `corrupt-<step>-<time>`.

State is saved by Orbax as arrays (tensorstore/OCDBT) and metadata as JSON: no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

from crosstrain.config import CheckpointConfig
from crosstrain.errors import UserError
from crosstrain.files import atomic_write
from crosstrain.storage import AnyPath, as_path, describe_error, forget_listings, is_remote, stat

log = logging.getLogger("crosstrain")

MANIFEST = "manifest.json"
TRASH = ".trash"


def _sha256(path: AnyPath) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: AnyPath) -> list[AnyPath]:
    if is_remote(step_dir):
        return sorted((p for p in _remote_listing(step_dir) if p.name != MANIFEST), key=str)
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))


def _remote_listing(step_dir: AnyPath) -> list[AnyPath]:
    """Every object under a step's prefix (one listing call, fresh: no cached directory)."""
    import fsspec

    url = str(step_dir)
    fs = fsspec.filesystem(url.split("://", 1)[0])
    fs.invalidate_cache()
    try:
        found = fs.find(url.split("://", 1)[1])
    except FileNotFoundError:
        return []
    scheme = url.split("://", 1)[0]
    return [as_path(f"{scheme}://{name}") for name in found]


def write_manifest(step_dir: AnyPath, step: int) -> None:
    files = {_relative(p, step_dir): {"sha256": _sha256(p), "bytes": stat(p)[0]} for p in _files(step_dir)}
    text = json.dumps({"step": step, "files": files, "sealed_at": time.time()}, indent=1)
    if is_remote(step_dir):
        (step_dir / MANIFEST).write_text(text)  # one PUT: the object appears whole or not at all
    else:
        atomic_write(step_dir / MANIFEST, text)


def _relative(p: AnyPath, root: AnyPath) -> str:
    return str(p)[len(str(root).rstrip("/")) + 1:]


def verify(step_dir: AnyPath) -> Optional[str]:
    """None if every file matches the manifest, else what is wrong (one line)."""
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        return "not sealed (no manifest: interrupted before it was complete)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "unreadable manifest"
    present = None if not is_remote(step_dir) else {_relative(p, step_dir) for p in _files(step_dir)}
    for rel, want in files.items():
        p = step_dir / rel
        if not (p.is_file() if present is None else rel in present):
            return f"missing file {rel}"
        size = stat(p)[0]
        if size != want["bytes"]:
            return f"{rel} has {size} bytes, expected {want['bytes']}"
        if _sha256(p) != want["sha256"]:
            return f"{rel} does not match its SHA-256"
    return None


class Checkpointer:
    def __init__(self, directory: AnyPath, cfg: CheckpointConfig, *, primary: bool = True,
                 before_seal: Optional[Callable[[int], None]] = None):
        self.remote = is_remote(directory)
        self.directory = as_path(directory) if self.remote else Path(directory).absolute()
        self.cfg = cfg
        self.primary = primary  # process 0 seals, prunes and moves; every process reads
        # Called with the step on process 0 once Orbax has committed it, just before it is sealed
        # (a run in a bucket sends its records there first: crosstrain/storage.py).
        self.before_seal = before_seal
        extra = {}
        if self.remote:
            from orbax.checkpoint._src.path import atomicity

            # No rename on object storage: Orbax marks a committed step with an object instead.
            extra["temporary_path_class"] = atomicity.CommitFileTemporaryPath
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is ours (through the trash)
            enable_async_checkpointing=cfg.async_save,
            create=True,
            cleanup_tmp_directories=primary,
            **extra,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:
            if not self.remote:
                raise
            raise UserError(f"--run-dir: {describe_error(str(self.directory), e)}") from None
        self._pending: Optional[int] = None
        self.stall_s = 0.0  # time the caller spent blocked in save/seal
        if primary:
            self._empty_trash()

    # ---- listing ---------------------------------------------------------------------------

    def _agree(self, value: int) -> int:
        """Process 0's `value` on every process, once process 0 has got here: a barrier, so every
        process calls it at the same point."""
        if jax.process_count() == 1:
            return value
        from jax.experimental import multihost_utils
        import numpy as np

        return int(multihost_utils.broadcast_one_to_all(np.int32(value)))

    def _forget_listings(self) -> None:
        if self.remote:
            forget_listings(str(self.directory))

    def step_dir(self, step: int) -> AnyPath:
        return self.directory / str(step)

    def committed_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def sealed_steps(self) -> list[int]:
        return [s for s in self.committed_steps() if (self.step_dir(s) / MANIFEST).is_file()]

    def clear_unfinished(self) -> int:
        """Process 0, at start: trash every step that was never sealed and set aside corrupt ones
        newer than the newest valid step, so the step list all processes read next is clean.
        Returns how many corrupt steps were set aside."""
        if not self.primary:
            return 0
        corrupt = 0
        for step in reversed(self.committed_steps()):
            problem = verify(self.step_dir(step))
            if problem is None:
                break
            if "not sealed" in problem:
                log.warning("checkpoint %d was never sealed (an interrupted save); cleared", step)
                self._trash(step)
            else:
                log.warning("checkpoint %d is corrupt (%s); falling back to the previous one", step, problem)
                self._set_aside(step, "corrupt")
                corrupt += 1
        self._empty_trash()
        return corrupt

    def latest_valid_step(self, *, before: Optional[int] = None) -> Optional[int]:
        """The newest sealed step whose files match their manifest (older than `before` if
        given). Steps that fail are reported and set aside; unsealed ones are ignored."""
        for step in reversed(self.committed_steps()):
            if before is not None and step >= before:
                continue
            problem = verify(self.step_dir(step))
            if problem is None:
                return step
            if "not sealed" in problem:
                log.warning("checkpoint %d ignored: %s", step, problem)
                continue
            log.warning("checkpoint %d is corrupt (%s); falling back to the previous one", step, problem)
            if self.primary:
                self._set_aside(step, "corrupt")
        return None

    def _set_aside(self, step: int, why: str) -> None:
        src = self.step_dir(step)
        target = self.directory / f"{why}-{step}-{int(time.time() * 1000)}"
        if self.remote:
            # No rename: unseal first (a kill from here on leaves an unsealed step, cleared at the
            # next start), then copy the objects aside and delete them.
            import fsspec

            fs = fsspec.filesystem(str(src).split("://", 1)[0])
            (src / MANIFEST).unlink(missing_ok=True)
            fs.copy(str(src), str(target), recursive=True)
            fs.rm(str(src), recursive=True)
        elif src.exists():
            os.replace(src, target)
        self._manager.reload()  # Orbax caches its step list

    # ---- saving ----------------------------------------------------------------------------

    def save(self, step: int, state: Any, meta: dict, *, wait: bool = False) -> None:
        t0 = time.perf_counter()
        self._finish_pending()
        # A stale step of the same number (after a rollback): process 0 deletes it, then every
        # process drops it from its step list.
        stale = self.primary and self.step_dir(step).exists()
        if stale:
            self._trash(step)
        if self._agree(int(stale)):
            self._forget_listings()
            self._manager.reload()
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._pending = step
        if wait:
            self._finish_pending()
        self.stall_s += time.perf_counter() - t0

    def seal_pending(self, *, block: bool = False) -> Optional[int]:
        """Seal the pending save once Orbax has committed it (without waiting unless `block`).
        Returns the step sealed, if any."""
        if self._pending is None or (not block and self._manager.is_saving_in_progress()):
            return None
        t0 = time.perf_counter()
        step = self._finish_pending()
        self.stall_s += time.perf_counter() - t0
        return step

    def _finish_pending(self) -> Optional[int]:
        if self._pending is None:
            return None
        self._manager.wait_until_finished()
        step, self._pending = self._pending, None
        if self.primary:
            if self.before_seal is not None:
                self.before_seal(step)
            write_manifest(self.step_dir(step), step)
            self._prune()
        return step

    def _keep(self, steps: list[int]) -> set[int]:
        keep = set(steps[-self.cfg.keep :])
        if self.cfg.keep_every:
            keep |= {s for s in steps if s % self.cfg.keep_every == 0}
        return keep

    def _prune(self) -> None:
        steps = self.sealed_steps()
        keep = self._keep(steps)
        for step in steps:
            if step not in keep:
                self._trash(step)
        self._empty_trash()

    def _trash(self, step: int) -> None:
        if self.remote:
            # Unseal, then delete: a kill in between leaves an unsealed step, never a valid-looking one.
            import fsspec

            src = self.step_dir(step)
            (src / MANIFEST).unlink(missing_ok=True)
            fsspec.filesystem(str(src).split("://", 1)[0]).rm(str(src), recursive=True)
            self._manager.reload()
            return
        trash = self.directory / TRASH
        trash.mkdir(exist_ok=True)
        os.replace(self.step_dir(step), trash / f"{step}-{time.time_ns()}")
        self._manager.reload()  # Orbax caches its step list

    def _empty_trash(self) -> None:
        if self.remote:
            return  # nothing is moved into a trash there (_trash)
        trash = self.directory / TRASH
        if trash.exists():
            for entry in trash.iterdir():
                shutil.rmtree(entry, ignore_errors=True)

    def discard_after(self, step: int) -> None:
        """Trash every committed step after `step` (a rollback makes them a dead branch)."""
        self._finish_pending()
        if self.primary:
            for s in self.committed_steps():
                if s > step:
                    self._trash(s)
            self._empty_trash()

    # ---- restoring -------------------------------------------------------------------------

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["meta"])

    def restore_latest(self, abstract_state: Any, *, before: Optional[int] = None) -> Optional[tuple[int, Any, dict]]:
        """(step, state, meta) of the newest valid checkpoint, None if there never was a complete
        one (a save killed before it was sealed leaves only an unsealed step: the run starts over).
        Exit 2 if sealed checkpoints exist but none is valid."""
        # The others read only after process 0 has cleared, learn what it set aside, and list the
        # steps afresh (their listings from before the clearing would still show what it removed).
        set_aside = self._agree(self.clear_unfinished())
        self._forget_listings()
        self._manager.reload()
        any_sealed = bool(self.sealed_steps()) or set_aside > 0
        step = self.latest_valid_step(before=before)
        if step is None:
            if any_sealed and before is None:
                raise UserError(f"--run-dir: no valid checkpoint in {self.directory} (all failed verification)")
            return None
        state, meta = self.restore(step, abstract_state)
        return step, state, meta

    def wait(self) -> None:
        self.seal_pending(block=True)

    def close(self) -> None:
        self.seal_pending(block=True)
        self._manager.close()


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs (with shardings, for restoring onto a mesh) shaped like `tree`."""
    if shardings is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
