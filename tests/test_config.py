import pytest
import yaml

from crosstrain.cli import main
from crosstrain.config import (
    Config,
    DataConfig,
    check_paths,
    config_from_dict,
    load_config,
    parse_count,
    read_preset,
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
        ("layers=3", "layers", "section.key"),
        ("model.layers", "model.layers", "section.key=value"),
    ],
)
def test_bad_values_name_their_field(override, field, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert e.value.field == field
    assert words in str(e.value)


@pytest.mark.parametrize(
    "override, field",
    [
        ("data.path=/no/such/dir", "data.path"),
        ("data.tokenizer=/no/such/tokenizer.json", "data.tokenizer"),
        ("init.from_run=/no/such/run", "init.from_run"),
        ("distill.teacher=/no/such/run", "distill.teacher"),
    ],
)
def test_paths_are_checked_only_by_those_that_read_them(override, field):
    cfg = load_config("tiny", [override])  # a value check only: the path is not looked at
    with pytest.raises(ConfigError) as e:
        check_paths(cfg)
    assert e.value.field == field
    section = field.split(".")[0]
    check_paths(cfg, tuple(s for s in ("data", "init", "distill") if s != section))


def test_commands_check_the_files_they_read_and_only_those(tmp_path, capsys):
    missing = str(tmp_path / "moved-away")
    # plan reads no data: a preset whose data path is gone still plans.
    assert main(["plan", "--preset", "tiny", "--data", missing, "--chip", "tpu-v5p", "--chips", "8", "--json"]) == 0
    capsys.readouterr()
    # tokenize reads it: one line naming the field, exit 2.
    assert main(["tokenize", "--preset", "tiny", "--data", missing]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"data.path: {missing} does not exist" in err


def test_override_is_validated_and_keeps_what_the_user_named():
    cfg = load_config("tiny", ["mesh.fsdp=2"])
    new = cfg.override("optim.lr=0.5", model={"remat": "full", "layers": "3"}, train={"steps": 7})
    assert (new.model.remat, new.model.layers, new.train.steps, new.optim.lr) == ("full", 3, 7, 0.5)
    assert new.model.hidden == cfg.model.hidden and new.train.batch == cfg.train.batch
    assert new.explicit == cfg.explicit  # programmatic changes are not the user's settings
    assert cfg.model.remat != "full"  # the original is untouched
    # A section instance replaces the whole section.
    with_data = cfg.override(data={"path": "x.txt", "max_bytes": 5})
    assert with_data.override(data=DataConfig()).data == DataConfig()
    for bad, field, words in ((dict(model={"heads": 3}), "model.heads", "not divisible"),
                              (dict(train={"steps": "many"}), "train.steps", "expected an integer"),
                              (dict(model={"layerz": 2}), "model.layerz", "unknown key")):
        with pytest.raises(ConfigError) as e:
            cfg.override(**bad)
        assert e.value.field == field and words in str(e.value)
    with pytest.raises(ConfigError, match="unknown section"):
        cfg.override("modle.layers=2")


def test_preset_base_inherits_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"description": "base", "model": {"layers": 3, "hidden": 128},
                                    "train": {"steps": 9}, "mesh": {"fsdp": 2}}))
    sub = tmp_path / "sub" / "child.yaml"
    sub.parent.mkdir()
    sub.write_text(yaml.safe_dump({"base": "../base.yaml", "description": "child", "model": {"layers": 5},
                                   "mesh": None}))
    cfg = load_config(str(sub))
    assert (cfg.model.layers, cfg.model.hidden, cfg.train.steps) == (5, 128, 9)
    assert cfg.description == "child"
    assert cfg.mesh.fsdp == 1 and "mesh.fsdp" not in cfg.explicit  # `mesh: ~` dropped the base's
    assert {"model.layers", "model.hidden", "train.steps"} <= cfg.explicit
    # A shipped preset as the base.
    on_tiny = tmp_path / "on_tiny.yaml"
    on_tiny.write_text("base: tiny\ntrain: {steps: 3}\n")
    assert load_config(str(on_tiny)) == load_config("tiny", ["train.steps=3"])


def test_the_afm_on_device_stages_share_the_core_model():
    core, continued, context = (read_preset(f"afm-on-device-3b{s}") for s in ("", "-continued", "-context"))
    shape = ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab")
    for stage in (continued, context):
        assert {k: stage["model"][k] for k in shape} == {k: core["model"][k] for k in shape}
    assert (continued["model"]["seq_len"], context["model"]["seq_len"]) == (8192, 32768)
    assert context["model"]["rope_base"] == 6315089
    # No stage pins a mesh axis: each device's mesh rule lays it out (full FSDP on TPU).
    for stage in (core, continued, context):
        assert set(stage.get("mesh") or {}) <= {"rule"}
    assert {a: getattr(load_config("afm-on-device-3b").mesh, a) for a in ("data", "fsdp", "tensor")} \
        == {"data": -1, "fsdp": 1, "tensor": 1}  # the defaults, until a rule fills them in
    assert not {"mesh.data", "mesh.fsdp", "mesh.tensor"} & load_config("afm-server-core").explicit


@pytest.mark.parametrize(
    "text, words",
    [
        ("base: no-such-preset\n", "base: unknown preset 'no-such-preset'"),
        ("base: [tiny]\n", "base: must name a preset"),
        ("base: loop.yaml\n", "base: the presets form a cycle"),
        ("base: other.yaml\n", "base: the presets form a cycle"),
    ],
)
def test_bad_base_is_one_line_exit_2(text, words, tmp_path, capsys):
    preset = tmp_path / "loop.yaml"
    preset.write_text(text)
    (tmp_path / "other.yaml").write_text("base: loop.yaml\nmodel: {layers: 3}\n")
    assert main(["plan", "--preset", str(preset), "--chip", "tpu-v5p", "--chips", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err


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
