"""Hand-off to Hugging Face: export parity with transformers, import round trip, eval, generation."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch==2.13.0 is a dev extra (pip install -e '.[dev]')")
transformers = pytest.importorskip("transformers", reason="transformers is a dev extra (pip install -e '.[dev]')")

from safetensors.numpy import load_file  # noqa: E402

from crosstrain.cli import main  # noqa: E402
from crosstrain.config import load_config  # noqa: E402
from crosstrain.data.tokenizer import train_bpe  # noqa: E402
from crosstrain.evaluate import evaluate_tokens, token_byte_lengths  # noqa: E402
from crosstrain.generate import Sampling, generate_tokens  # noqa: E402
from crosstrain.hf import from_hf_tensors, to_hf_tensors, write_hf_dir  # noqa: E402
from crosstrain.model import forward, init_params  # noqa: E402

pytestmark = pytest.mark.slow  # transformers parity: full runs and torch models


def perturbed_params(cfg, seed=0):
    params = init_params(cfg.model, jax.random.key(seed))
    # Norm scales of exactly 1 would hide a scale applied in the wrong place.
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * (1.2 + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)))
        if "norm" in jax.tree_util.keystr(path) else x,
        params,
    )


def hf_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from crosstrain.data.corpus import stdlib_files

    tok = train_bpe((f.read_text() for f in stdlib_files()[:40]), 512)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("extra", [(), ("model.tie_embeddings=false",), ("model.qk_norm=false",)])
def test_exported_model_gives_the_same_logits_in_transformers(extra, tmp_path, tokenizer_json):
    cfg = load_config("tiny", ["model.compute_dtype=float32", "model.rope_base=10000", *extra])
    params = perturbed_params(cfg)
    write_hf_dir(jax.device_get(params), cfg.model, tokenizer_json, tmp_path / "hf", eot=0)
    model = hf_model(tmp_path / "hf")
    expected = "Qwen3ForCausalLM" if cfg.model.qk_norm else "LlamaForCausalLM"
    assert type(model).__name__ == expected
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab, size=(2, 40))
    ours = np.asarray(forward(params, jnp.asarray(tokens), cfg.model))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_greedy_continuation_matches_transformers(tmp_path, tokenizer_json):
    cfg = load_config("tiny", ["model.compute_dtype=float32"])
    params = perturbed_params(cfg, seed=1)
    write_hf_dir(jax.device_get(params), cfg.model, tokenizer_json, tmp_path / "hf", eot=0)
    model = hf_model(tmp_path / "hf")
    prompt = [5, 17, 250, 3, 99, 42]
    ours, _, _, _ = generate_tokens(params, cfg, prompt, max_new_tokens=24, sampling=Sampling(greedy=True))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=24)
    assert ours == out[0, len(prompt):].tolist()


def test_import_export_round_trip_is_bit_identical(tmp_path, tokenizer_json):
    cfg = load_config("tiny", ["model.compute_dtype=float32", "model.tie_embeddings=false"])
    params = perturbed_params(cfg, seed=2)
    write_hf_dir(jax.device_get(params), cfg.model, tokenizer_json, tmp_path / "a", eot=0)
    run = tmp_path / "run"
    assert main(["import", "--hf", str(tmp_path / "a"), "--run-dir", str(run), "--preset", "tiny"]) == 0
    assert main(["export", "--run-dir", str(run), "--out", str(tmp_path / "b")]) == 0
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    # and the pure conversion functions invert each other
    back = from_hf_tensors(to_hf_tensors(jax.device_get(params), cfg.model), cfg.model, np.float32)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(jax.device_get(params))):
        np.testing.assert_array_equal(x, y)


def test_eval_loss_equals_transformers_loss(tmp_path, tokenizer_json):
    cfg = load_config("tiny", ["model.compute_dtype=float32"])
    params = perturbed_params(cfg, seed=3)
    write_hf_dir(jax.device_get(params), cfg.model, tokenizer_json, tmp_path / "hf", eot=0)
    model = hf_model(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "def add(a, b):\n    return a + b  # 2024 numbers\n"
    ids = tok(text)["input_ids"]
    from tokenizers import Tokenizer

    assert ids == Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids
    ours = evaluate_tokens(params, cfg, np.asarray(ids), token_byte_lengths(Tokenizer.from_file(str(tokenizer_json))))
    with torch.no_grad():
        theirs = float(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    assert ours.loss == pytest.approx(theirs, rel=1e-4)
    assert ours.tokens == len(ids) - 1
    assert ours.bytes == len(text.encode()) - len(tok.decode(ids[:1]).encode())


def test_unsupported_architectures_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert main(["import", "--hf", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    assert "architecture GPT2LMHeadModel is not supported" in capsys.readouterr().err
    (bad / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                                 "intermediate_size": 128, "num_hidden_layers": 2,
                                                 "num_attention_heads": 4, "vocab_size": 512, "attention_bias": True}))
    assert main(["import", "--hf", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    assert "attention_bias=True is not supported" in capsys.readouterr().err
    (bad / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": 2}))
    assert main(["import", "--hf", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    assert "config.json lacks hidden_size" in capsys.readouterr().err
    (bad / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64,
                                                 "intermediate_size": 128, "num_hidden_layers": 2,
                                                 "num_attention_heads": 4, "vocab_size": 512}))
    assert main(["import", "--hf", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer.json" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_tiny_run_hands_off_to_transformers(tmp_path):
    """Done when: a tiny run, exported, loads in transformers with the same loss and continuation."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    run, out = tmp_path / "run", tmp_path / "hf"

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "crosstrain", *args], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    cli("train", "--preset", "tiny", "--set", "model.compute_dtype=float32", "--run-dir", str(run))
    cli("export", "--run-dir", str(run), "--out", str(out))
    text_file = tmp_path / "sample.txt"
    text_file.write_text("import os\n\ndef main(argv):\n    for name in sorted(os.listdir('.')):\n        print(name)\n")
    ours = json.loads(cli("eval", "--run-dir", str(run), "--text-file", str(text_file), "--json"))
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model = hf_model(out)
    ids = tok(text_file.read_text(), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = float(model(ids, labels=ids).loss)
    assert ours["loss"] == pytest.approx(theirs, rel=1e-3)
    gen = json.loads(cli("generate", "--run-dir", str(run), "--prompt", "def ", "--max-new-tokens", "24", "--greedy", "--json"))
    prompt = tok("def ", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hf_out = model.generate(prompt, max_new_tokens=24, do_sample=False)
    hf_new = hf_out[0, prompt.shape[1]:].tolist()
    assert gen["tokens"] == hf_new[: len(gen["tokens"])]
    assert gen["text"] == tok.decode([t for t in gen["tokens"] if t != tok.eos_token_id])

    # Continued pre-training from the exported directory starts where the trained model is.
    cont = tmp_path / "continued"
    cli("train", "--preset", "tiny", "--set", f"init.from_hf={out}", "model.compute_dtype=float32", "train.steps=3",
        "--run-dir", str(cont))
    first = json.loads((cont / "metrics.jsonl").read_text().splitlines()[0])
    fresh = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] < fresh["loss"] - 1.0
    assert (cont / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
