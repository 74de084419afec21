import pytest
import yaml

from crosstrain.config import (
    Config,
    config_from_dict,
    load_config,
    parse_count,
    resume_differences,
    save_config,
    shipped_presets,
)
from crosstrain.errors import ConfigError, UserError


def test_every_shipped_preset_parses_and_round_trips(tmp_path):
    names = shipped_presets()
    assert {"tiny", "demo", "nano", "afm-on-device-3b", "afm-server-core"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, Config)
        path = tmp_path / f"{name}.yaml"
        save_config(cfg, path)
        assert load_config(str(path)) == cfg, name


def test_nano_and_afm_shapes_are_as_specified():
    nano = load_config("nano").model
    assert (nano.layers, nano.hidden, nano.heads, nano.kv_heads, nano.head_dim, nano.ffn, nano.vocab, nano.seq_len) == (
        6, 384, 6, 2, 64, 1024, 8192, 256,
    )
    assert load_config("nano").train.batch == 8
    for name in ("afm-on-device-3b", "afm-server-core"):
        cfg = load_config(name)
        assert (cfg.model.seq_len, cfg.train.batch) == (4096, 4096)
        assert cfg.optim.lr == 0.01 and cfg.optim.weight_decay == 3.16e-4
        assert cfg.optim.warmup_steps == 5000 and cfg.optim.min_lr_ratio == 0.005
        assert cfg.optim.name == "adastar" and cfg.model.kv_heads == 8
        tokens = cfg.train.steps * cfg.train.batch * cfg.model.seq_len
        assert abs(tokens - 6.3e12) / 6.3e12 < 0.001


def test_overrides_are_type_checked():
    cfg = load_config("tiny", ["model.layers=3", "optim.lr=1e-3", "model.tie_embeddings=false", "train.steps=1_000"])
    assert cfg.model.layers == 3 and cfg.optim.lr == 1e-3
    assert cfg.model.tie_embeddings is False and cfg.train.steps == 1000
    assert load_config("tiny", ["model.compute_dtype=float32"]).model.compute_dtype == "float32"


@pytest.mark.parametrize(
    "override, field, words",
    [
        ("model.layerz=3", "model.layerz", "unknown key"),
        ("modle.layers=3", "modle.layers", "unknown section"),
        ("model.layers=abc", "model.layers", "expected an integer"),
        ("model.layers=2.5", "model.layers", "expected an integer"),
        ("optim.lr=fast", "optim.lr", "expected a number"),
        ("model.tie_embeddings=maybe", "model.tie_embeddings", "true or false"),
        ("model.compute_dtype=float16", "model.compute_dtype", "must be one of"),
        ("model.heads=3", "model.heads", "not divisible by model.kv_heads"),
        ("model.head_dim=15", "model.head_dim", "even"),
        ("train.steps=0", "train.steps", "positive"),
        ("optim.b2=1.0", "optim.b2", "[0, 1)"),
        ("train.microbatches=3", "train.batch", "not divisible by train.microbatches"),
        ("mesh.data=0", "mesh.data", "positive size or -1"),
        ("data.path=/no/such/dir", "data.path", "does not exist"),
        ("layers=3", "layers", "section.key"),
        ("model.layers", "model.layers", "section.key=value"),
    ],
)
def test_bad_values_name_their_field(override, field, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert e.value.field == field
    assert words in str(e.value)


def test_two_fill_axes_rejected():
    with pytest.raises(ConfigError, match="at most one"):
        load_config("tiny", ["mesh.data=-1", "mesh.fsdp=-1"])


def test_user_yaml_preset_and_errors(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text(yaml.safe_dump({"model": {"layers": 3}, "train": {"steps": 7}}))
    cfg = load_config(str(good))
    assert cfg.model.layers == 3 and cfg.train.steps == 7
    with pytest.raises(UserError, match="unknown preset"):
        load_config("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model: a section must be a mapping"):
        load_config(str(wrong))


def test_resume_differences_ignore_layout_but_not_math():
    a = load_config("tiny")
    b = load_config("tiny", ["train.steps=80", "mesh.fsdp=2", "model.remat=full", "train.log_every=5"])
    assert resume_differences(a, b) == []
    c = load_config("tiny", ["model.layers=3", "optim.lr=0.5"])
    diffs = resume_differences(a, c)
    assert any(d.startswith("model.layers") for d in diffs) and any(d.startswith("optim.lr") for d in diffs)


def test_parse_count():
    assert parse_count("6.3T", "tokens") == 6.3e12
    assert parse_count("100B", "tokens") == 1e11
    assert parse_count("2e9", "tokens") == 2e9
    with pytest.raises(ConfigError):
        parse_count("lots", "tokens")


def test_fingerprint_tracks_math_only():
    a, b = load_config("tiny"), load_config("tiny", ["mesh.fsdp=2"])
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != config_from_dict({"model": {"layers": 5}}).fingerprint()
