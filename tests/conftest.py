"""Test set-up: 8 forced CPU devices (before JAX is imported), an isolated cache, no hub access,
libtpu shared by the parallel workers."""

import os
import sys
from pathlib import Path

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# pytest-xdist's workers (make test runs two) compile for TPU topologies at the same time; libtpu's
# lockfile guards TPU chips, and these tests use none (deviceless compiles on the CPU platform).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def crosstrain_cache(tmp_path_factory):
    """One cache (tokenizers, token stores, CPU peak) shared by the session, never the user's."""
    path = tmp_path_factory.mktemp("crosstrain-cache")
    os.environ["CROSSTRAIN_CACHE"] = str(path)
    return path
