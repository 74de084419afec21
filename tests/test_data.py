"""The data pipeline: formats, bad records, caching, exactly-once order, resume, sharding, mixtures."""

import collections
import json
import random

import numpy as np
import pytest

from crosstrain.cli import main
from crosstrain.config import config_from_dict
from crosstrain.data.mixture import Mixture, Phase, apportion
from crosstrain.data.pipeline import PackedSequences, build_pipeline
from crosstrain.data.sources import Source, SourceReport, iter_documents
from crosstrain.data.store import LONG_LINE, split_text
from crosstrain.data.tokenizer import load_tokenizer, train_bpe
from crosstrain.errors import UserError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def make_text(rng, n_words):
    return " ".join(rng.choice(WORDS) + str(rng.integers(0, 1000)) for _ in range(n_words))


def cfg_for(data: dict, **train):
    raw = {
        "model": {"vocab": 512, "seq_len": 32},
        "train": {"batch": 8, "seed": 3, **train},
        "data": data,
    }
    return config_from_dict(raw)


@pytest.fixture
def text_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    for i in range(30):
        (d / ("sub" if i % 3 else "") / f"doc{i}.txt").write_text(make_text(rng, 120))
    return d


def test_every_sequence_exactly_once_per_epoch(text_dir):
    p = build_pipeline(cfg_for({"path": str(text_dir), "holdout": 0.0}))
    seqs = p.train_sequences[0]
    n = len(seqs)
    assert n > 40
    expected = collections.Counter(seqs[i].tobytes() for i in range(n))
    got = collections.Counter(p.sequence(i).tobytes() for i in range(n))
    assert got == expected
    # Batches are consecutive windows of that order, and the next epoch is a different order.
    b0 = p.train_batch(0)
    assert [r.tobytes() for r in b0] == [p.sequence(i).tobytes() for i in range(8)]
    epoch2 = [p.sequence(n + i).tobytes() for i in range(n)]
    assert collections.Counter(epoch2) == expected and epoch2 != [p.sequence(i).tobytes() for i in range(n)]


def test_iterator_restores_at_100_random_points(text_dir):
    p = build_pipeline(cfg_for({"path": str(text_dir)}))
    it = p.batches()
    reference, states = [], {}
    points = set(random.Random(0).sample(range(150), 100))
    for step in range(153):
        if step in points:
            states[step] = it.get_state()
        reference.append(next(it))
    for step, state in states.items():
        resumed = p.batches(state=json.loads(json.dumps(state)))  # the state survives JSON (checkpoints)
        for k in range(3):
            np.testing.assert_array_equal(next(resumed), reference[step + k])


def test_process_shards_are_disjoint_and_cover_the_batch(text_dir):
    p = build_pipeline(cfg_for({"path": str(text_dir)}))
    for step in range(5):
        full = p.train_batch(step)
        lo, hi = p.train_batch(step, (0, 4)), p.train_batch(step, (4, 8))
        np.testing.assert_array_equal(np.concatenate([lo, hi]), full)
    a = {p.locate(s * 8 + j) for s in range(20) for j in range(0, 4)}
    b = {p.locate(s * 8 + j) for s in range(20) for j in range(4, 8)}
    assert not a & b and len(a | b) == 160


def test_mixture_proportions_and_no_repeats():
    mix = Mixture([Phase(0, (0.7, 0.2, 0.1))], seed=0)
    sources = collections.Counter(mix.locate(i)[0] for i in range(10_000))
    for k, w in enumerate((0.7, 0.2, 0.1)):
        assert abs(sources[k] / 10_000 - w) < 0.02
    mix = Mixture([Phase(0, (1, 1)), Phase(3000, (1, 3)), Phase(7000, (0, 1))], seed=1)
    located = [mix.locate(i) for i in range(10_000)]
    numbers = collections.defaultdict(list)
    for k, n in located:
        numbers[k].append(n)
    for k, ns in numbers.items():  # each source is read in order, nothing skipped or repeated
        assert ns == list(range(len(ns)))
    second = collections.Counter(k for k, _ in located[3000:7000])
    assert abs(second[1] / 4000 - 0.75) < 0.02
    assert all(k == 1 for k, _ in located[7000:])
    assert list(apportion([1, 1, 1], 10)) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])


def test_pipeline_mixture_follows_weights_and_phases(tmp_path):
    rng = np.random.default_rng(1)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": make_text(rng, 80)}) + "\n" for _ in range(40)))
    b.write_text("".join(json.dumps({"body": make_text(rng, 80)}) + "\n" for _ in range(40)))
    cfg = cfg_for({
        "sources": [{"path": str(a), "weight": 3}, {"path": str(b), "field": "body", "weight": 1}],
        "mixture": [{"step": 500, "weights": [1, 1]}],
    })
    p = build_pipeline(cfg)
    first = collections.Counter(p.locate(i)[0] for i in range(4000))
    assert abs(first[0] / 4000 - 0.75) < 0.02
    later = collections.Counter(p.locate(i)[0] for i in range(4000, 8000))
    assert abs(later[0] / 4000 - 0.5) < 0.02


def test_cache_reused_and_rebuilt_when_a_file_changes(text_dir):
    cfg = cfg_for({"path": str(text_dir)})
    p1 = build_pipeline(cfg)
    stamp = (p1.stores[0].path / "tokens.bin").stat().st_mtime_ns
    p2 = build_pipeline(cfg)
    assert p2.stores[0].path == p1.stores[0].path
    assert (p2.stores[0].path / "tokens.bin").stat().st_mtime_ns == stamp
    target = text_dir / "doc0.txt"
    target.write_text(target.read_text() + " omega999")
    p3 = build_pipeline(cfg)
    assert p3.stores[0].path != p1.stores[0].path
    assert p3.stores[0].tokens.size > p1.stores[0].tokens.size


def test_bad_records_are_counted_never_fatal(tmp_path):
    rng = np.random.default_rng(2)
    f = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": make_text(rng, 50)}).encode() for _ in range(20)]
    lines.insert(3, b'{"text": "bad \xff\xfe bytes"}')  # invalid UTF-8
    lines.insert(5, b'{"text": ""}')  # empty document
    lines.insert(7, b'{"text": "unterminated')  # malformed JSON
    lines.insert(9, b'{"other": "no text field"}')  # missing field
    lines.insert(11, b'[1, 2, 3]')  # not an object
    lines.insert(13, json.dumps({"text": "x" * (LONG_LINE * 2 + 10)}).encode())  # one huge line
    f.write_bytes(b"\n".join(lines) + b"\n")
    report = SourceReport(str(f), "jsonl")
    docs = list(iter_documents(Source(str(f), "jsonl"), report))
    assert report.documents == len(docs) == 22
    assert report.invalid_utf8 == 1 and report.empty_skipped == 1
    assert report.malformed_lines == 2 and report.first_malformed == [f"{f}:8", f"{f}:12"]
    assert report.missing_field == 1 and report.first_missing_field == [f"{f}:10"]
    assert any("\ufffd" in d.text for d in docs)

    p = build_pipeline(cfg_for({"path": str(f)}), run_dir=tmp_path)
    saved = json.loads((tmp_path / "data_report.json").read_text())
    totals = saved["totals"]
    assert (totals["invalid_utf8"], totals["empty_skipped"], totals["malformed_lines"], totals["missing_field"]) == (1, 1, 2, 1)
    assert totals["long_lines_split"] >= 2
    assert p.stores[0].report["first_malformed"] == [f"{f}:8", f"{f}:12"]


def test_text_parquet_and_hf_sources(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = ["first document text", "", None, "third document", "fourth"]
    pq.write_table(pa.table({"content": texts}), tmp_path / "d.parquet")
    report = SourceReport("p", "parquet")
    docs = list(iter_documents(Source(str(tmp_path / "d.parquet"), "parquet", field="content"), report))
    assert [d.text for d in docs] == ["first document text", "third document", "fourth"]
    assert report.empty_skipped == 2
    with pytest.raises(UserError, match="column 'text' is not in"):
        list(iter_documents(Source(str(tmp_path / "d.parquet"), "parquet"), SourceReport("p", "parquet")))

    datasets = pytest.importorskip("datasets", reason="datasets (dev extra) writes the save_to_disk fixture")
    datasets.Dataset.from_dict({"text": ["hf one", "hf two", ""]}).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["split train"]}),
                          "test": datasets.Dataset.from_dict({"text": ["split test"]})}).save_to_disk(str(tmp_path / "hfd"))
    cfg = cfg_for({"path": str(tmp_path / "hf")})
    from crosstrain.data.pipeline import resolve_sources

    assert resolve_sources(cfg)[0].format == "hf"
    report = SourceReport("h", "hf")
    assert [d.text for d in iter_documents(resolve_sources(cfg)[0], report)] == ["hf one", "hf two"]
    assert report.empty_skipped == 1
    src = resolve_sources(cfg_for({"path": str(tmp_path / "hfd")}))[0]
    assert [d.text for d in iter_documents(src, SourceReport("h", "hf"))] == ["split train"]

    d = tmp_path / "t"
    d.mkdir()
    (d / "ok.txt").write_text("plain text")
    (d / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    (d / "empty.txt").write_text("   \n")
    (d / "ignored.md").write_text("not matched by the default glob")
    report = SourceReport("t", "text")
    docs = list(iter_documents(Source(str(d), "text"), report))
    assert sorted(x.text for x in docs) == ["caf\ufffd latin-1", "plain text"]
    assert report.invalid_utf8 == 1 and report.empty_skipped == 1


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda t: ["--data", str(t / "nope")], "data.path: "),
        (lambda t: ["--data", str(t / "file.xyz")], "unknown format"),
        (lambda t: ["--data", str(t / "nofield.jsonl")], "data.field: no record in"),
        (lambda t: ["--set", f"data.sources=[{{path: {t / 'file.xyz'}, format: csv}}]"], "must be one of"),
        (lambda t: ["--set", "data.mixture=[{step: 5, weights: [1, 2]}]"], "one weight per source"),
    ],
)
def test_data_user_errors_exit_2(make, words, tmp_path, capsys):
    (tmp_path / "file.xyz").write_text("x")
    (tmp_path / "nofield.jsonl").write_text('{"a": "x"}\n{"b": "y"}\n')
    assert main(["train", "--preset", "tiny", *make(tmp_path), "--run-dir", str(tmp_path / "r")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("crosstrain: error:") and words in lines[-1], lines
    assert all(line[:2].isdigit() for line in lines[:-1])  # only progress log lines before it
    if "no record" not in words:
        assert len(lines) == 1  # decided before anything was logged


def test_user_tokenizer_json_is_used_and_saved(text_dir, tmp_path):
    tok = train_bpe([make_text(np.random.default_rng(5), 500)], 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    run = tmp_path / "run"
    run.mkdir()
    p = build_pipeline(cfg_for({"path": str(text_dir), "tokenizer": str(tmp_path / "tokenizer.json")}), run_dir=run)
    assert p.vocab_size == tok.get_vocab_size()
    assert load_tokenizer(run / "tokenizer.json").to_str() == tok.to_str()
    with pytest.raises(UserError, match="model.vocab: 280 is smaller"):
        build_pipeline(config_from_dict({"model": {"vocab": 280}, "data": {"path": str(text_dir), "tokenizer": str(tmp_path / "tokenizer.json")}}))


def test_chunked_tokenization_equals_whole_documents(text_dir):
    from crosstrain.data.corpus import stdlib_files

    tok = train_bpe((f.read_text() for f in stdlib_files()[:30]), 1024)
    for f in stdlib_files()[:60]:
        text = f.read_text()
        whole = tok.encode(text, add_special_tokens=False).ids
        pieces = [i for part in split_text(text) for i in tok.encode(part, add_special_tokens=False).ids]
        assert pieces == whole, f


def test_packed_sequences_overlap_by_one_token():
    seqs = PackedSequences(np.arange(100, dtype=np.uint16), 10)
    assert len(seqs) == 9
    np.testing.assert_array_equal(seqs[0], np.arange(11))
    np.testing.assert_array_equal(seqs[1][:1], [10])


def test_heldout_split_is_counted_in_tokens_per_source(tmp_path, text_dir):
    """At least data.holdout of each source's tokens (and the 50k floor where a source allows it
    within 10%), made of hash-chosen segments from many documents, the same whatever the order;
    a single large document is split; no held-out token is trained on."""
    from crosstrain.data.store import HOLDOUT_CAP, SEGMENT_MIN, choose_heldout, heldout_target

    big = tmp_path / "one.txt"
    big.write_text(make_text(np.random.default_rng(1), 60_000))
    p = build_pipeline(cfg_for({"sources": [{"path": str(text_dir)}, {"path": str(big)}], "holdout": 0.02}))
    report = p.report()
    for store, src in zip(p.stores, report["sources"]):
        total = store.tokens.size
        held = src["heldout_tokens"]
        # The target counts the source's own tokens; each hole may end the training piece before
        # it with an end-of-document token of its own.
        extra = src["heldout_segments"] + 1
        assert held == store.heldout.size
        assert heldout_target(total - extra, 0.02) <= held <= heldout_target(total, 0.02)
        assert 0.02 <= src["heldout_share"] <= HOLDOUT_CAP + 1e-3 and held >= min(50_000, 0.1 * (total - extra)) - 1
        assert store.train_end + store.heldout.size == total == src["tokens"]
    assert report["sources"][1]["documents"] == 1 and report["sources"][1]["heldout_documents"] == 1  # cut
    assert report["sources"][0]["heldout_documents"] > 1  # segments from several documents, not one or two
    assert report["totals"]["heldout_tokens"] == sum(s.heldout.size for s in p.stores)
    assert report["totals"]["heldout_share"] == pytest.approx(report["totals"]["heldout_tokens"] / report["totals"]["tokens"])
    # No held-out token is trained on: every held-out segment of the big document is absent from its training stream.
    big_store = p.stores[1]
    train = np.asarray(big_store.train)
    held = np.asarray(big_store.heldout)
    bounds = big_store.heldout_bounds
    assert bounds[0] == 0 and bounds[-1] == held.size and len(bounds) == report["sources"][1]["heldout_segments"] + 1
    windows = np.lib.stride_tricks.sliding_window_view(train, 32)
    for lo, hi in zip(bounds[:-1:5], bounds[1::5]):
        probe = held[lo:lo + 32]
        assert probe.size == 32 and not (windows == probe).all(axis=1).any()
    # The choice depends on the names only, not on the order documents come in.
    lengths, orders = [500, 4000, 700, 1200, 3000], [9, 3, 7, 1, 5]
    chosen = choose_heldout(lengths, orders, 2000, segment=256)
    perm = [4, 2, 0, 3, 1]
    chosen2 = choose_heldout([lengths[i] for i in perm], [orders[i] for i in perm], 2000, segment=256)
    assert sorted((perm[d], lo, hi) for d, lo, hi in chosen2) == sorted(chosen)
    assert sum(hi - lo for _, lo, hi in chosen) == 2000
    assert all(hi - lo <= 256 and 0 <= lo < hi <= lengths[d] for d, lo, hi in chosen)
    assert len({d for d, _, _ in chosen}) >= 3  # spread over documents
    assert heldout_target(1000, 0.0) == 0 and heldout_target(10_000_000, 0.01) == 100_000


def test_heldout_segments_are_windowed_each_on_its_own():
    """No window of a segmented held-out set reads one segment as another's context, every token
    after a segment's first is a target once, and the standard error counts segments, not windows."""
    from crosstrain.evaluate import summarize, windows

    tokens = np.arange(1, 31, dtype=np.int32)
    bounds = np.array([0, 10, 11, 30])  # a 10-token segment, a 1-token one (nothing to predict), a 19-token one
    wins, mask, groups = windows(tokens, 8, bounds)
    assert mask.sum() == 9 + 0 + 18
    for w, m, g in zip(wins, mask, groups):
        seg = (0, 10) if g == 0 else (11, 30)
        used = w[: int(m.sum()) + 1]
        assert used.min() >= tokens[seg[0]] and used.max() <= tokens[seg[1] - 1]
    assert set(groups.tolist()) == {0, 2}
    # Windows of one segment that agree with each other but not with the other segment: an SE over
    # two segments is larger than one over their windows taken as independent.
    sums = np.where(groups == 0, 1.0, 3.0) * mask.sum(axis=1)
    by_segment = summarize(sums, mask.sum(axis=1), groups=groups)
    by_window = summarize(sums, mask.sum(axis=1))
    assert by_segment.loss == pytest.approx(by_window.loss) and by_segment.loss_se > by_window.loss_se
    assert by_segment.windows == len(wins)
    # Without bounds the tokens are one text, each window its own group.
    wins1, mask1, groups1 = windows(tokens, 8)
    assert mask1.sum() == 29 and list(groups1) == list(range(len(wins1)))
