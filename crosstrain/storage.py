"""Object storage (gs://, s3://) for run directories and training data.

Every path crosstrain reads or writes may be a URL `gs://BUCKET/PATH` or `s3://BUCKET/PATH`
(the `cloud` extra: fsspec's gcsfs and s3fs for files, tensorstore's own GCS and S3 drivers for
checkpoint arrays, through Orbax). Credentials and endpoints come only from the ecosystem's
standard settings, never from crosstrain's config or its files:

- S3: the AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
  AWS_DEFAULT_REGION, AWS_PROFILE, AWS_ENDPOINT_URL for an S3-compatible server) and
  ~/.aws/{credentials,config}; botocore and tensorstore both read them.
- GCS: Google's application-default credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's, or the
  VM's service account). STORAGE_EMULATOR_HOST, the variable Google's client libraries honour for
  a local emulator, is passed on to tensorstore (TENSORSTORE_GCS_HTTP_URL) and gcsfs, which then
  connect anonymously as Google's own client does against an emulator.

Object stores have no rename and no append: what crosstrain writes there is written whole, each
object in one PUT (atomic: a reader sees the old object or the new one), and a checkpoint step
counts only once its seal, the last object written, is there (train/checkpoint.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from crosstrain.errors import UserError

log = logging.getLogger("crosstrain")

SCHEMES = ("gs://", "s3://")
AnyPath = Union[Path, Any]  # pathlib.Path, or etils.epath.Path for a URL


def is_remote(path: Any) -> bool:
    return str(path).startswith(SCHEMES)


def looks_like_url(path: Any) -> bool:
    """Any scheme://, supported or not (refused before anything is written)."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(path)) is not None


def check_url(path: str, field: str) -> None:
    """A URL crosstrain cannot use is refused here, before anything is written."""
    if looks_like_url(path) and not is_remote(path):
        raise UserError(f"{field}: {path}: only gs:// and s3:// URLs are supported")
    if is_remote(path):
        bucket = str(path).split("://", 1)[1].split("/", 1)[0]
        if not bucket:
            raise UserError(f"{field}: {path} names no bucket")
        _require_cloud_extra(field, path)


def _require_cloud_extra(field: str, path: str) -> None:
    import importlib.util

    module = "gcsfs" if str(path).startswith("gs://") else "s3fs"
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{field}: {path} needs the cloud extra (pip install 'crosstrain[cloud]'): {module} is missing")


_CONFIGURED = False


def configure() -> None:
    """Point the storage libraries at the standard settings (once per process)."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    _CONFIGURED = True
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        url = emulator if emulator.startswith("http") else f"http://{emulator}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        # An emulator takes no credentials: Google's client connects anonymously to one, and so do
        # these (tensorstore needs some bearer token; the emulator ignores it).
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        # gcsfs probes a bucket's type over gRPC, which an emulator does not serve (a 60 s timeout
        # per bucket); before gcsfs is imported.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        import fsspec

        fsspec.config.conf.setdefault("gcs", {}).setdefault("token", "anon")
        fsspec.config.conf.setdefault("gs", {}).setdefault("token", "anon")
    _orbax_s3()


def _orbax_s3() -> None:
    """Orbax 0.12 builds tensorstore specs for gs:// and local paths only (google/orbax#359,
    #2739): an s3:// checkpoint path is mangled to "s3:/..." and refused. Teach its two spec
    builders tensorstore's own S3 driver, which reads the AWS_* settings itself."""
    from orbax.checkpoint._src.serialization import tensorstore_utils as tu

    if getattr(tu, "_crosstrain_s3", False):
        return
    gcs_kvstore = tu.gcs_utils.get_kvstore_for_gcs
    normalize, use_gcs = tu._normalize_path, tu._use_gcs_driver

    def kvstore(path: str) -> dict:
        if path.startswith("s3://"):
            bucket, _, key = path[len("s3://"):].partition("/")
            spec = {"driver": "s3", "bucket": bucket, "path": key}
            # botocore honours AWS_ENDPOINT_URL (an S3-compatible server); tensorstore 0.1.86's
            # spec takes it as "endpoint" (path-style requests to that server).
            if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
                spec["endpoint"] = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ["AWS_ENDPOINT_URL"]
            # With the region known, tensorstore skips its unsigned request that looks it up.
            if os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
                spec["aws_region"] = os.environ.get("AWS_REGION") or os.environ["AWS_DEFAULT_REGION"]
            return spec
        return gcs_kvstore(path)

    tu.gcs_utils.get_kvstore_for_gcs = kvstore
    tu._normalize_path = lambda p: (os.path.normpath(p).replace("s3:/", "s3://", 1) if str(p).startswith("s3:/")
                                    else normalize(p))
    tu._use_gcs_driver = lambda d: d.startswith("s3://") or use_gcs(d)
    tu._crosstrain_s3 = True


def as_path(path: Any) -> AnyPath:
    """A path object for a local path or a URL (etils.epath over fsspec, which Orbax uses too)."""
    if is_remote(path):
        configure()
        from etils import epath

        return epath.Path(str(path))
    return Path(path)


def stat(path: AnyPath) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a file, local or remote."""
    st = path.stat()
    if hasattr(st, "st_size"):
        return st.st_size, st.st_mtime_ns
    return int(st.length), int(float(st.mtime or 0) * 1e9)


def describe_error(url: str, e: BaseException) -> str:
    """One line for what went wrong talking to a bucket: missing, denied, or bad credentials."""
    text = f"{type(e).__name__}: {e}"
    for pattern, why in ((r"NoSuchBucket|bucket does not exist|404.*bucket|Not Found", "the bucket does not exist"),
                         (r"InvalidAccessKeyId|SignatureDoesNotMatch|signature we calculated does not match|Access Key Id"
                          r"|Unauthorized|401|invalid_grant|Could not automatically|NoCredentialsError"
                          r"|Unable to locate credentials|security token", "the credentials were refused"),
                         (r"AccessDenied|Forbidden|403|PermissionError", "access was denied")):
        if re.search(pattern, text, re.IGNORECASE):
            return f"{url}: {why} ({type(e).__name__})"
    return f"{url}: {text.splitlines()[0][:200]}"


def check_reachable(url: str, field: str, *, must_exist: bool = False) -> None:
    """Exit 2 with one line if the bucket of `url` is missing, denied, or the credentials are bad
    (and, with `must_exist`, if nothing is at `url`)."""
    check_url(url, field)
    if not is_remote(url):
        return
    configure()
    import fsspec

    scheme = url.split("://", 1)[0]
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    fs = fsspec.filesystem(scheme)
    try:
        fs.invalidate_cache()
        fs.ls(f"{bucket}", detail=False)  # lists: needs the bucket, read access, good credentials
    except FileNotFoundError:
        raise UserError(f"{field}: {url}: the bucket does not exist") from None
    except Exception as e:  # the storage clients raise many types; each becomes one line
        raise UserError(f"{field}: {describe_error(url, e)}") from None
    try:
        exists = fs.exists(url) if must_exist else True
    except Exception as e:
        raise UserError(f"{field}: {describe_error(url, e)}") from None
    if not exists:
        raise UserError(f"{field}: {url} does not exist")


# --------------------------------------------------------------------------------------------
# A run directory in a bucket: a local working copy, synced.

REMOTE_MARKER = ".crosstrain-remote"


def mirror_dir(url: str) -> Path:
    """Where a bucket's run directory is worked on locally: under $CROSSTRAIN_CACHE/runs."""
    from crosstrain.paths import cache_dir

    name = url.rstrip("/").rsplit("/", 1)[-1] or "run"
    return cache_dir() / "runs" / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def remote_of(run_dir: Path) -> Optional[str]:
    """The bucket URL a local working copy stands for (None for a plain local run directory). A
    directory inside a working copy (a recipe's stage) stands for the same path inside the URL."""
    here = Path(run_dir).absolute()
    for parent in (here, *here.parents):
        marker = parent / REMOTE_MARKER
        if marker.is_file():
            rel = here.relative_to(parent).as_posix()
            url = marker.read_text().strip()
            return url if rel == "." else f"{url}/{rel}"
    return None


def checkpoint_dir(run_dir: Path) -> AnyPath:
    """A run's checkpoints: in the bucket for a run kept in one, else beside its files."""
    url = remote_of(run_dir)
    return as_path(url.rstrip("/") + "/checkpoints") if url else Path(run_dir) / "checkpoints"


def open_run(path: str, field: str = "--run-dir", *, create: bool) -> Path:
    """The local directory to work in for the run directory `path` (a path or a URL). For a URL:
    a working copy that holds the run's files from the bucket (not its checkpoints, which are
    read from and written to the bucket directly), so every command works on it as on a local run
    directory, and `push` sends what changed back. Refuses an unsupported URL, a missing bucket,
    denied access or bad credentials with one line, before anything is written."""
    check_url(path, field)
    if not is_remote(path):
        return Path(path)
    check_reachable(path, field)
    url = path.rstrip("/")
    local = mirror_dir(url)
    remote = as_path(url)
    try:
        exists = remote.exists()
    except Exception as e:
        raise UserError(f"{field}: {describe_error(url, e)}") from None
    if not exists and not create:
        raise UserError(f"{field}: {url} does not exist")
    # The working copy is exactly the bucket's files: nothing left from an earlier run of the
    # same URL on this machine.
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True, exist_ok=True)
    (local / REMOTE_MARKER).write_text(url + "\n")
    pull(local)
    return local


def local_run(path: str, field: str) -> Path:
    """An existing run directory to read (init.from_run, distill.teacher, prune --from): a local
    path as it is, a URL as its working copy."""
    return open_run(path, field, create=False) if is_remote(path) else Path(path)


def _remote_files(url: str) -> dict[str, int]:
    import fsspec

    fs = fsspec.filesystem(url.split("://", 1)[0])
    fs.invalidate_cache()
    root = url.split("://", 1)[1].rstrip("/")
    out = {}
    try:
        for name, info in fs.find(root, detail=True).items():
            rel = name[len(root):].lstrip("/")
            if rel and not rel.startswith("checkpoints/"):
                out[rel] = int(info.get("size") or 0)
    except FileNotFoundError:
        pass
    return out


def pull(local: Path) -> None:
    """Bring the bucket's copies of a run's files into its working copy (checkpoints stay)."""
    url = remote_of(local)
    if url is None:
        return
    import fsspec

    fs = fsspec.filesystem(url.split("://", 1)[0])
    for rel, size in _remote_files(url).items():
        target = local / rel
        if target.is_file() and target.stat().st_size == size and rel not in _ALWAYS_PULL:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get(f"{url}/{rel}", str(target))


# Files another process or an earlier attempt may have rewritten with the same size.
_ALWAYS_PULL = {"metrics.jsonl", "goodput.json", "summary.json", "config.yaml", "recipe.json"}


def push(local: Path, only: Optional[Iterable[str]] = None) -> None:
    """Send a working copy's files to the bucket, each object whole (a PUT is atomic); files the
    bucket already holds with the same size and content are skipped. `only`: these names."""
    url = remote_of(local)
    if url is None:
        return
    import fsspec

    fs = fsspec.filesystem(url.split("://", 1)[0])
    there = _remote_files(url)
    names = [p for p in sorted(local.rglob("*")) if p.is_file()]
    for p in names:
        rel = p.relative_to(local).as_posix()
        if rel == REMOTE_MARKER or rel.startswith("checkpoints/") or p.name.endswith(".tmp"):
            continue
        if only is not None and rel.split("/")[0] not in set(only):
            continue
        if rel in there and there[rel] == p.stat().st_size and rel not in _ALWAYS_PULL and rel != "train.log":
            continue
        try:
            fs.put_file(str(p), f"{url}/{rel}")
        except Exception as e:
            raise UserError(f"--run-dir: {describe_error(url, e)}") from None


def forget_listings(url: str) -> None:
    """Drop this process's cached listings of `url`'s filesystem. fsspec keeps one client per
    setting, each caching the directories it has listed (Orbax's step list among them), so once
    another process has deleted or written objects there, the next listing must ask the bucket."""
    import fsspec

    for fs in list(getattr(fsspec.get_filesystem_class(url.split("://", 1)[0]), "_cache", {}).values()):
        fs.invalidate_cache()


def discard_mirror(local: Path) -> None:
    """Remove a working copy whose run failed before it wrote anything to the bucket."""
    if remote_of(local) is not None:
        shutil.rmtree(local, ignore_errors=True)
