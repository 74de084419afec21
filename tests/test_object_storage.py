"""Run directories and data in buckets, against real protocol servers started here on 127.0.0.1:
moto's S3-compatible server and a GCS emulator, reached only through the standard variables
(AWS_ENDPOINT_URL and AWS_*; STORAGE_EMULATOR_HOST), exactly as crosstrain would reach AWS or GCS.
Also: two processes joined by SLURM's environment alone."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_faults import wait_for

pytest.importorskip("s3fs")
pytest.importorskip("moto")

TINY = ["--preset", "tiny", "--set", "model.compute_dtype=float32", "train.steps=12", "train.checkpoint_every=4"]
NOISE = ("AWS_ERROR_FILE_INVALID_PATH", "AuthCredentialsProvider", "common-io", "google_auth_provider")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(argv, port, env=None):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)

    def up():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    assert wait_for(up, timeout=60), f"{argv[0]} did not start"
    return proc


def _stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's standalone S3 server with authentication on: an IAM user's keys work, others are refused."""
    port = _port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")  # user, keys, policy; then every request is checked
    proc = _serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, env)
    import boto3

    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                       aws_secret_access_key="x")
    iam.create_user(UserName="trainer")
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket="crosstrain-runs")
    yield {"env": env, "client": client}
    _stop(proc)


def _run(args, env, cache, timeout=600):
    full = dict(os.environ, CROSSTRAIN_CACHE=str(cache), **env)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        full.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "crosstrain", *args], env=full, capture_output=True, text=True,
                          timeout=timeout)
    proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if not any(n in line for n in NOISE))
    return proc


def _objects(client, prefix):
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="crosstrain-runs", Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def _records(client, run):
    body = client.get_object(Bucket="crosstrain-runs", Key=f"{run}/metrics.jsonl")["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


@pytest.mark.slow
def test_a_run_in_a_bucket_trains_resumes_and_hands_off(s3, tmp_path):
    """Run directory and data in the bucket; a corrupt checkpoint object is detected and the run
    falls back to the previous sealed step, as on local disk; eval, generate and export read the
    run from the bucket with no local copy left behind."""
    env, client = s3["env"], s3["client"]
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 40}) for i in range(400)]
    client.put_object(Bucket="crosstrain-runs", Key="data/code.jsonl", Body="\n".join(lines).encode())
    url = "s3://crosstrain-runs/runs/tiny"
    ran = _run(["train", *TINY, "--data", "s3://crosstrain-runs/data/code.jsonl", "--run-dir", url], env, tmp_path / "a")
    assert ran.returncode == 0, ran.stderr[-3000:]
    objects = _objects(client, "runs/tiny/")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "goodput.json", "loss.png", "train.log",
                 "tokenizer.json", "data_report.json", "checkpoints/12/manifest.json"):
        assert f"runs/tiny/{name}" in objects, name
    assert any(k.startswith("runs/tiny/tensorboard/") for k in objects)
    summary = json.loads(client.get_object(Bucket="crosstrain-runs", Key="runs/tiny/summary.json")["Body"].read())
    reference = [r["loss"] for r in _records(client, "runs/tiny")]
    assert len(reference) == 12 and summary["steps"] == 12

    # Truncate an array object of the newest checkpoint: the run refuses it and goes back to step 8.
    victim = max((k for k in objects if k.startswith("runs/tiny/checkpoints/12/state/") and "/d/" in k),
                 key=lambda k: objects[k])
    body = client.get_object(Bucket="crosstrain-runs", Key=victim)["Body"].read()
    client.put_object(Bucket="crosstrain-runs", Key=victim, Body=body[: len(body) // 2])
    client.delete_object(Bucket="crosstrain-runs", Key="runs/tiny/summary.json")
    again = _run(["train", *TINY, "--data", "s3://crosstrain-runs/data/code.jsonl", "--run-dir", url], env, tmp_path / "b")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint 12 is corrupt" in again.stderr and "resumed from checkpoint 8" in again.stderr
    assert [r["loss"] for r in _records(client, "runs/tiny")] == reference  # redone bit for bit
    after = json.loads(client.get_object(Bucket="crosstrain-runs", Key="runs/tiny/summary.json")["Body"].read())
    assert after["params_sha256"] == summary["params_sha256"]
    assert any("/corrupt-12-" in k for k in _objects(client, "runs/tiny/checkpoints/"))

    evaluated = _run(["eval", "--run-dir", url, "--json"], env, tmp_path / "c")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["loss"] == pytest.approx(after["eval_loss"], abs=1e-4)
    generated = _run(["generate", "--run-dir", url, "--prompt", "def ", "--max-new-tokens", "8", "--greedy", "--json"],
                     env, tmp_path / "d")
    assert generated.returncode == 0 and json.loads(generated.stdout)["new_tokens"] >= 1
    exported = _run(["export", "--run-dir", url, "--out", str(tmp_path / "hf")], env, tmp_path / "e")
    assert exported.returncode == 0 and (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_mistakes_with_buckets_are_one_line_exit_2_and_change_nothing(s3, tmp_path):
    env, client = s3["env"], s3["client"]
    url = "s3://crosstrain-runs/runs/guarded"
    assert _run(["train", *TINY, "--set", "train.steps=4", "--run-dir", url], env, tmp_path / "a").returncode == 0
    before = _objects(client, "runs/guarded/")
    cases = [
        (["train", *TINY, "--run-dir", "s3://no-such-bucket-here/run"], env, "the bucket does not exist"),
        (["train", *TINY, "--run-dir", url], {**env, "AWS_SECRET_ACCESS_KEY": "wrong"}, "credentials were refused"),
        (["train", *TINY, "--set", "train.steps=4", "model.hidden=32", "--run-dir", url], env, "different config"),
        (["train", *TINY, "--data", "s3://crosstrain-runs/no/such.jsonl", "--run-dir", str(tmp_path / "x")], env,
         "data.path: s3://crosstrain-runs/no/such.jsonl does not exist"),
        (["train", *TINY, "--run-dir", "az://container/run"], env, "only gs:// and s3:// URLs are supported"),
    ]
    for args, case_env, words in cases:
        proc = _run(args, case_env, tmp_path / "b")
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr[-2000:])
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert _objects(client, "runs/guarded/") == before  # nothing written, nothing lost
    assert not (tmp_path / "x").exists()
    assert not Path("az:").exists()


@pytest.mark.slow
def test_two_processes_sharing_no_local_directory_resume_from_the_bucket_bit_exactly(s3, tmp_path):
    """A 2-process `launch` whose processes each have their own cache and working directory; the
    run directory is in the bucket. One worker is SIGKILLed mid-run; the job run again resumes
    from the bucket with every loss and the final parameters of an uninterrupted run."""
    env, client = s3["env"], s3["client"]
    args = ["train", "--preset", "tiny", "--set", "model.compute_dtype=float32", "mesh.fsdp=2", "train.steps=16",
            "train.checkpoint_every=4", "train.batch=16"]

    def launch(url, caches):
        full = dict(os.environ, **env)
        full.pop("XLA_FLAGS", None)
        return subprocess.Popen([sys.executable, "-m", "crosstrain", "launch", "--processes", "2", "--devices-per-process",
                                 "1", "--process-caches", str(caches), "--", *args, "--run-dir", url], env=full,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    ref = launch("s3://crosstrain-runs/runs/mp-reference", tmp_path / "ref")
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-3000:]

    run = "runs/mp"
    proc = launch(f"s3://crosstrain-runs/{run}", tmp_path / "first")
    # Kill worker 1 once the bucket holds a sealed checkpoint and the run has gone past it.
    sealed = lambda: any(k.endswith("/manifest.json") for k in _objects(client, f"{run}/checkpoints/"))  # noqa: E731
    assert wait_for(lambda: sealed() or proc.poll() is not None, timeout=300)
    time.sleep(1.0)
    worker = next((p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_worker(p, 1, run)), None)
    assert worker is not None and proc.poll() is None, "the run ended before the kill"
    os.kill(int(worker.name), signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    # Whatever instant the kill hit, leave the case that needs both processes to agree: a step Orbax
    # committed that was never sealed (killed before its manifest), after the newest sealed one.
    # Process 0 clears it at the start; process 1 must not still see it when it saves that step.
    objects = _objects(client, f"{run}/checkpoints/")
    newest = max(int(k.split("/")[-2]) for k in objects if k.endswith("/manifest.json"))
    stray = f"{run}/checkpoints/{newest + 4}/"
    for key in [k for k in objects if k.startswith(stray)]:
        client.delete_object(Bucket="crosstrain-runs", Key=key)
    for key in [k for k in objects if k.startswith(f"{run}/checkpoints/{newest}/") and not k.endswith("/manifest.json")]:
        client.copy_object(Bucket="crosstrain-runs", Key=stray + key.split(f"/{newest}/", 1)[1],
                           CopySource={"Bucket": "crosstrain-runs", "Key": key})
    again = launch(f"s3://crosstrain-runs/{run}", tmp_path / "second")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "resumed from checkpoint" in out, out[-3000:]
    assert f"checkpoint {newest + 4} was never sealed" in out, out[-3000:]
    got, want = _records(client, run), _records(client, "runs/mp-reference")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 17))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    sha = lambda r: json.loads(client.get_object(Bucket="crosstrain-runs", Key=f"{r}/summary.json")["Body"].read())  # noqa
    assert sha(run)["params_sha256"] == sha("runs/mp-reference")["params_sha256"]
    # Each process worked in its own cache (its own working copy of the run, its own token store).
    assert all(any((tmp_path / "second" / f"p{i}" / "runs").iterdir()) for i in range(2))


def _is_worker(pid_dir: Path, process_id: int, run: str) -> bool:
    try:
        environ = (pid_dir / "environ").read_bytes().split(b"\0")
        cmdline = (pid_dir / "cmdline").read_bytes()
    except OSError:
        return False
    return f"CROSSTRAIN_PROCESS_ID={process_id}".encode() in environ and run.encode() in cmdline and b"launch" not in cmdline


@pytest.mark.slow
def test_gcs_through_an_emulator(tmp_path):
    """gs:// through the same code as s3://, pointed at an emulator by STORAGE_EMULATOR_HOST alone:
    training data read from the bucket, a run's files written there, and one-line refusals.
    Checkpoint arrays are not tried here: tensorstore's GCS driver writes OCDBT manifests with
    generation preconditions (ifGenerationMatch), which gcp-storage-emulator does not implement
    ('Malformed StorageGeneration'); the S3 tests above run that path against a server that does."""
    import importlib.util
    import urllib.request

    if importlib.util.find_spec("gcsfs") is None:
        pytest.skip("gcsfs (the cloud extra) is not installed")
    port = _port()
    emulator = _serve([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
                       "--in-memory", "--default-bucket", "crosstrain-gcs"], port)
    try:
        env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
        lines = [json.dumps({"text": f"class C{i}:\n    value = {i}\n" * 50}) for i in range(300)]
        up = _run(["tokenize", "--preset", "tiny", "--data", "gs://crosstrain-gcs/none.jsonl"], env,
                  tmp_path / "a")
        assert up.returncode == 2 and "data.path: gs://crosstrain-gcs/none.jsonl does not exist" in up.stderr, up.stderr
        # The object goes in through the JSON API's media upload, as any client would send it.
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/upload/storage/v1/b/crosstrain-gcs/o?uploadType=media&name=data/code.jsonl",
            data="\n".join(lines).encode(), method="POST", headers={"Content-Type": "application/octet-stream"}))
        made = _run(["tokenize", "--preset", "tiny", "--data", "gs://crosstrain-gcs/data/code.jsonl"], env, tmp_path / "b")
        assert made.returncode == 0 and "300 documents" in made.stdout + made.stderr, made.stderr[-2000:]
        missing = _run(["eval", "--run-dir", "gs://crosstrain-gcs/runs/none"], env, tmp_path / "c")
        assert missing.returncode == 2 and "gs://crosstrain-gcs/runs/none does not exist" in missing.stderr
        no_bucket = _run(["train", *TINY, "--run-dir", "gs://no-such-gcs-bucket/run"], env, tmp_path / "d")
        assert no_bucket.returncode == 2 and "the bucket does not exist" in no_bucket.stderr, no_bucket.stderr
    finally:
        _stop(emulator)


def test_one_spec_builder_serves_both_schemes():
    """Orbax's arrays go through tensorstore's own drivers: gs:// to its GCS driver (Orbax's own
    code), s3:// to its S3 driver with the standard endpoint and region variables."""
    from crosstrain import storage

    storage.configure()
    from orbax.checkpoint._src.serialization import tensorstore_utils as tu

    old = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_DEFAULT_REGION="eu-west-1")
    try:
        s3 = tu.build_kvstore_tspec("s3://bucket/run/checkpoints/4/state", use_ocdbt=False)
        gs = tu.build_kvstore_tspec("gs://bucket/run/checkpoints/4/state", use_ocdbt=False)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert s3 == {"driver": "s3", "bucket": "bucket", "path": "run/checkpoints/4/state",
                  "endpoint": "http://127.0.0.1:9", "aws_region": "eu-west-1"}
    assert gs["driver"].startswith("gcs") and gs["bucket"] == "bucket" and gs["path"] == "run/checkpoints/4/state"


@pytest.mark.slow
def test_two_processes_form_one_job_from_slurm_environment_alone(tmp_path):
    """srun gives each task SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID and
    SLURM_STEP_NODELIST (SLURM's sbatch/srun documentation, 'OUTPUT ENVIRONMENT VARIABLES');
    jax.distributed derives the coordinator from them. No crosstrain flag or variable is given."""
    port = next(p for p in range(61440 + 1000, 65535) if _free(p))
    job = 4096 * 7 + (port - 61440)  # JAX's SLURM coordinator port: job id mod 4096 + 61440
    run = tmp_path / "run"
    procs = []
    for rank in range(2):
        env = dict(os.environ, SLURM_JOB_ID=str(job), SLURM_NTASKS="2", SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank), SLURM_STEP_NODELIST="localhost", SLURM_NODELIST="localhost",
                   SLURM_STEP_NUM_NODES="1", SLURM_JOB_NUM_NODES="1", SLURM_NNODES="1", SLURM_NODEID="0")
        env.pop("XLA_FLAGS", None)
        for k in [k for k in env if k.startswith("CROSSTRAIN_") and k != "CROSSTRAIN_CACHE"]:
            env.pop(k)
        procs.append(subprocess.Popen([sys.executable, "-m", "crosstrain", "train", "--preset", "tiny", "--set",
                                       "model.compute_dtype=float32", "train.steps=3", "--run-dir", str(run)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    assert "in 2 process(es)" in outs[0] and "mesh slice=1 data=2" in outs[0]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0
