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


# The longest tests (`make test`'s --durations on the 2-core CI machine: 50-250 s each) start
# first, then the other slow ones, so that two workers do not end with one of them still running
# a long test alone (longest-first scheduling). Only the order changes; a name that no longer
# matches just loses its place.
# `make test` runs pytest-xdist with --dist worksteal: each worker takes half the queue in order,
# and one that runs dry takes over the tail of the other's, so the longest run early and the short
# ones balance the end.
LONGEST_FIRST = (
    "tests/test_tpu_step.py::test_aot_compiles_afm_on_device_for_8_v5p_with_splash_and_fits",
    "tests/test_tpu_step.py::test_tensor_parallel_tpu_step_partitions_without_replicating",
    "tests/test_object_storage.py::test_two_processes_sharing_no_local_directory_resume_from_the_bucket_bit_exactly",
    "tests/test_planner.py::test_aot_tpu_memory_agrees_with_the_planner",
    "tests/test_multiprocess_faults.py::test_killing_one_of_two_workers_at_random_moments_resumes_bit_exactly",
    "tests/test_object_storage.py::test_a_run_in_a_bucket_trains_resumes_and_hands_off",
    "tests/test_recipe.py::test_afm_demo_recipe_runs_every_stage_and_resumes_mid_stage",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        for i, prefix in enumerate(LONGEST_FIRST):
            if item.nodeid.startswith(prefix):
                return i
        return len(LONGEST_FIRST) + (0 if item.get_closest_marker("slow") else 1)

    items.sort(key=rank)  # stable: file order within each rank
