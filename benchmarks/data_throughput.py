"""Data pipeline throughput against the `nano` preset's training consumption, measured side by side.

1. Tokenization: building the token store of the built-in corpus (12 MB of Python) with nano's
   8192-token BPE, against the naive way (one `tokenizer.encode` per document). Target >= 1M tokens/s.
2. Loader: sequences/s out of the training iterator (Grain, prefetching, nano's batch and length).
3. Consumption: sequences/s that nano's training step takes on this machine (measured here too).
   Target: loader >= 10x consumption, so the accelerator never waits.

    python benchmarks/data_throughput.py [--json] [--s3]

4. With `--s3`: the same corpus as text objects in a bucket on a local S3-compatible server (moto's,
   benchmarks/local_s3.py), read through the `cloud` extra, against the same files on local disk:
   tokens/s of building the token store from each (a run reads the bucket once, then its local
   store: data wait in training is measured by `benchmarks/checkpoint_overhead.py --s3`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosstrain.platform import skip_absent_accelerators  # noqa: E402

skip_absent_accelerators()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--s3", action="store_true", help="also read the corpus from a bucket on a local S3 server")
    args = ap.parse_args()
    os.environ["CROSSTRAIN_CACHE"] = tempfile.mkdtemp(prefix="crosstrain-bench-")

    import jax
    import numpy as np

    from crosstrain.config import load_config
    from crosstrain.data.pipeline import build_pipeline, resolve_sources
    from crosstrain.data.sources import SourceReport, iter_documents
    from crosstrain.data.store import build_store
    from crosstrain.data.tokenizer import eot_id, train_bpe
    from crosstrain.model import init_params
    from crosstrain.train.step import init_state, make_train_step

    cfg = load_config("nano")
    src = resolve_sources(cfg)[0]
    docs = list(iter_documents(src, SourceReport(src.label, src.format)))
    tok = train_bpe((d.text for d in docs[:300]), cfg.model.vocab)

    # Naive: one encode call per document, in order.
    t = time.perf_counter()
    naive_tokens = sum(len(tok.encode(d.text, add_special_tokens=False).ids) for d in docs)
    naive_s = time.perf_counter() - t

    t = time.perf_counter()
    store = build_store(iter(docs), tok, key="bench", root=Path(os.environ["CROSSTRAIN_CACHE"]) / "s",
                        eot=eot_id(tok), holdout=0.0, report=SourceReport(src.label, src.format))
    store_s = time.perf_counter() - t
    store_tokens = int(store.tokens.size) - len(docs)  # minus the end-of-document tokens

    pipeline = build_pipeline(cfg)
    it = pipeline.batches()
    next(it)
    t = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    loader_seqs = args.batches * cfg.train.batch / (time.perf_counter() - t)

    state = init_state(init_params(cfg.model, jax.random.key(0)))
    step = jax.jit(make_train_step(cfg), donate_argnums=0)
    batch = jax.numpy.asarray(pipeline.train_batch(0))
    state, m = step(state, batch)
    jax.block_until_ready(m)
    n = 5
    t = time.perf_counter()
    for _ in range(n):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    consume_seqs = n * cfg.train.batch / (time.perf_counter() - t)

    bucket = bucket_against_disk(docs, cfg) if args.s3 else None
    result = {
        **({"bucket": bucket} if bucket else {}),
        "tokenize_tokens_per_s": store_tokens / store_s,
        "tokenize_naive_tokens_per_s": naive_tokens / naive_s,
        "tokenize_speedup_vs_naive": (store_tokens / store_s) / (naive_tokens / naive_s),
        "tokens": store_tokens,
        "loader_sequences_per_s": loader_seqs,
        "training_sequences_per_s": consume_seqs,
        "loader_over_training": loader_seqs / consume_seqs,
        "targets": {"tokenize_tokens_per_s": 1e6, "loader_over_training": 10},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"tokenization : {result['tokenize_tokens_per_s'] / 1e6:.2f}M tokens/s "
              f"(naive per-document encode: {result['tokenize_naive_tokens_per_s'] / 1e6:.2f}M, "
              f"{result['tokenize_speedup_vs_naive']:.2f}x)  target >= 1M")
        print(f"loader       : {loader_seqs:,.0f} sequences/s ({cfg.train.batch} x {cfg.model.seq_len + 1} tokens)")
        print(f"nano training: {consume_seqs:,.1f} sequences/s")
        print(f"loader / training consumption: {result['loader_over_training']:,.0f}x  target >= 10x")
        if bucket:
            print(f"token store from local disk: {bucket['disk_tokens_per_s'] / 1e6:.2f}M tokens/s; from the bucket "
                  f"(local S3 server): {bucket['bucket_tokens_per_s'] / 1e6:.2f}M tokens/s "
                  f"({bucket['bucket_over_disk']:.2f}x)")
    ok = result["tokenize_tokens_per_s"] >= 1e6 and result["loader_over_training"] >= 10
    return 0 if ok else 1


def bucket_against_disk(docs, cfg) -> dict:
    """Build the same token store from local files and from objects in a bucket, side by side."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from local_s3 import serve

    from crosstrain.config import load_config
    from crosstrain.data.pipeline import build_pipeline

    local = Path(tempfile.mkdtemp(prefix="crosstrain-corpus-"))
    for i, d in enumerate(docs):
        (local / f"{i:05d}.txt").write_text(d.text)
    with serve() as env:
        os.environ.update(env)
        import fsspec

        from crosstrain import storage

        storage.configure()
        fs = fsspec.filesystem("s3")
        fs.put(str(local) + "/", "crosstrain-bench/corpus/", recursive=True)
        rates = {}
        for name, path in (("disk", str(local)), ("bucket", "s3://crosstrain-bench/corpus")):
            os.environ["CROSSTRAIN_CACHE"] = tempfile.mkdtemp(prefix=f"crosstrain-bench-{name}-")
            c = load_config("nano", [f"data.path={path}", "data.format=text", "data.glob=*.txt"])
            t = time.perf_counter()
            p = build_pipeline(c, write_files=False)
            rates[name] = sum(int(st.tokens.size) for st in p.stores) / (time.perf_counter() - t)
    return {"disk_tokens_per_s": rates["disk"], "bucket_tokens_per_s": rates["bucket"],
            "bucket_over_disk": rates["bucket"] / rates["disk"], "note": "tokenizer training included in both"}


if __name__ == "__main__":
    raise SystemExit(main())
