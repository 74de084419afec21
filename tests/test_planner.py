"""The accelerator planner: FLOPs, memory, scaling, search, published cases, AOT, CLI."""

import json

import jax
import pytest

from crosstrain.cli import main
from crosstrain.config import ModelConfig, load_config
from crosstrain.flops import flops_per_token
from crosstrain.hardware import CATALOG, get_chip
from crosstrain.planner.cases import evaluate_cases, read_cases, shipped_cases_path
from crosstrain.planner.model import (FAMILIES, Layout, estimate, quantize_cast_bytes_per_token_layer, layer_params,
                                      recomputed_attention_fraction, recomputed_dense_fraction, total_params)
from crosstrain.planner.plan import Options, plan
from crosstrain.planner.search import candidate_layouts, search
from crosstrain.runtime import init_train_state, make_setup, total_state_bytes


def test_flops_for_llama2_7b_by_hand():
    m = ModelConfig(layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, ffn=11008, vocab=32000,
                    seq_len=4096, tie_embeddings=False, qk_norm=False)
    n = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000  # 6.607B matmul weights
    assert n == 6_607_077_376
    assert flops_per_token(m, attention="full") == 6 * n + 12 * 32 * 32 * 128 * 4096
    assert flops_per_token(m, attention="causal") == 6 * n + 6 * 32 * 32 * 128 * 4096
    gpt = ModelConfig(layers=24, hidden=2304, heads=24, kv_heads=24, head_dim=96, ffn=9216, vocab=51200, seq_len=2048)
    assert (flops_per_token(gpt, glu=False, attention="full")
            == 6 * (24 * (4 * 2304**2 + 2 * 2304 * 9216) + 2304 * 51200) + 12 * 24 * 24 * 96 * 2048)


def test_memory_matches_real_arrays_on_cpu():
    cfg = load_config("tiny", ["mesh.data=1"])
    setup = make_setup(cfg, jax.devices()[:1])
    state = init_train_state(setup)
    real_params_and_opt = total_state_bytes(state) - 8  # minus the step counter and RNG key
    est = estimate(cfg.model, get_chip("h100-sxm"), Layout(remat="full"), global_batch=8)
    assert est.memory["params"] + est.memory["optimizer"] == pytest.approx(real_params_and_opt, rel=1e-3)
    assert total_params(cfg.model) * 4 == pytest.approx(est.memory["params"], rel=1e-9)
    sharded = estimate(cfg.model, get_chip("h100-sxm"), Layout(fsdp=8, remat="full"), global_batch=8)
    assert sharded.memory["params"] == pytest.approx(est.memory["params"] / 8)


def test_more_chips_never_raise_step_time_for_fixed_work():
    cfg = load_config("afm-on-device-3b")
    for name in ("tpu-v5p", "h100-sxm", "trn2"):
        chip = get_chip(name)
        previous = None
        for chips in (64, 128, 256, 512, 1024):
            devices = chips * chip.devices_per_chip
            est, _ = search(cfg.model, chip, devices, 4096, fixed={"tp": chip.devices_per_chip, "pp": 1, "cp": 1, "remat": "full"})
            assert est is not None
            if previous is not None:
                assert est.step_time_s <= previous * 1.0001, (name, chips)
            previous = est.step_time_s


def test_search_returns_only_fitting_layouts():
    cfg = load_config("afm-server-core")
    chip = get_chip("tpu-v5e")
    est, tried = search(cfg.model, chip, 256, cfg.train.batch)
    assert tried > 10 and est is not None and est.fits
    assert est.memory_per_device_gib <= est.capacity_gib
    unfit = [lay for lay in candidate_layouts(cfg.model, chip, 256, cfg.train.batch)
             if not estimate(cfg.model, chip, lay, global_batch=cfg.train.batch).fits]
    assert unfit  # the search had non-fitting layouts to reject


def test_plan_json_fields_and_pinned_layout_that_does_not_fit(capsys):
    assert main(["plan", "--preset", "afm-on-device-3b", "--chip", "tpu-v5p", "--chips", "256", "--tokens", "6.3T", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("step_time_s", "mfu", "tokens_per_s", "memory_per_chip_gib", "fits", "time_to_train_days", "chip_hours",
                "cost_usd", "energy_mwh", "parallelism", "time_breakdown", "memory_breakdown_gib"):
        assert key in r
    assert r["fits"] and 0 < r["mfu"] < 1
    assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(4096 * 4096)
    assert main(["plan", "--preset", "afm-server-core", "--chip", "tpu-v5e", "--chips", "16", "--remat", "none",
                 "--parallelism", "tp=1,pp=1,dp=16,fsdp=1,cp=1", "--json", "--price", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fits"] is False and r["price_per_chip_hour"] == 2


def test_time_cost_and_energy_follow_the_budget_price_and_pue(capsys):
    """The budget, --price and --pue change what they should and nothing else; the whole budget
    is trained at the planned throughput; the default budget is the preset's own."""
    def planned(*extra):
        assert main(["plan", "--preset", "afm-on-device-3b", "--chip", "tpu-v5p", "--chips", "256", "--json",
                     *extra]) == 0
        return json.loads(capsys.readouterr().out)

    full = planned("--tokens", "6.3T")
    half = planned("--tokens", "3.15T", "--price", "1.5", "--pue", "1.4")
    assert half["parallelism"] == full["parallelism"] and half["step_time_s"] == full["step_time_s"]
    # Whole steps of the global batch: the budget planned is the one trained, at least what was asked.
    per_step = 4096 * 4096
    assert full["steps"] == 375_510 and full["tokens"] == full["steps"] * per_step >= 6.3e12 > full["tokens"] - per_step
    assert full["tokens_per_s"] * full["time_to_train_days"] * 86400 == pytest.approx(full["tokens"])
    assert half["time_to_train_days"] == pytest.approx(full["time_to_train_days"] / 2, rel=1e-5)
    assert full["price_per_chip_hour"] == CATALOG["tpu-v5p"].price_per_hour != 1.5
    assert half["cost_usd"] == pytest.approx(full["cost_usd"] / 2 * 1.5 / full["price_per_chip_hour"], rel=1e-5)
    assert half["energy_mwh"] == pytest.approx(full["energy_mwh"] / 2 * 1.4, rel=1e-5)
    # AFM-on-device's core stage: 375,500 steps of 4096 x 4096 tokens, the preset's budget.
    default = planned()
    assert default["steps"] == 375_500 and default["tokens"] == 375_500 * per_step
    assert default["time_to_train_days"] == pytest.approx(full["time_to_train_days"], rel=1e-3)


def test_cost_objective_never_costs_more():
    cfg = load_config("afm-on-device-3b")
    fast = plan(cfg, Options(chip="h100-sxm", chips=1024, tokens=1e12))
    cheap = plan(cfg, Options(chip="h100-sxm", chips=1024, tokens=1e12, objective="cost"))
    assert cheap["cost_usd"] <= fast["cost_usd"] and cheap["chips"] <= 1024


def test_cost_objective_keeps_to_a_deadline_and_says_when_the_cheapest_is_absurd():
    """Without a deadline the cheapest AFM-on-device plan on up to 2048 H100 takes years on a few
    GPUs; the plan says so, and --max-days bounds it."""
    cfg = load_config("afm-on-device-3b")
    fast = plan(cfg, Options(chip="h100-sxm", chips=2048))
    cheap = plan(cfg, Options(chip="h100-sxm", chips=2048, objective="cost"))
    assert cheap["time_to_train_days"] > 3 * fast["time_to_train_days"]
    assert any("--max-days" in n for n in cheap["notes"])
    bounded = plan(cfg, Options(chip="h100-sxm", chips=2048, objective="cost", max_days=60))
    assert bounded["time_to_train_days"] <= 60 and bounded["cost_usd"] <= fast["cost_usd"]
    assert bounded["steps"] == fast["steps"] == cheap["steps"] and bounded["tokens"] == fast["tokens"]


def test_mfu_counts_causal_attention_as_half():
    """The 32K context stage was credited with the masked half of its attention (86.8% MFU)."""
    cfg = load_config("afm-on-device-3b-context")
    r = plan(cfg, Options(chip="tpu-v5p", chips=2048))
    from crosstrain.flops import flops_per_token

    tokens = cfg.train.batch * cfg.model.seq_len
    assert r["model_tflops_per_chip"] * 1e12 == pytest.approx(
        flops_per_token(cfg.model, attention="causal") * tokens / r["step_time_s"] / r["chips"])
    assert r["mfu"] < 0.8


def test_compare_chart_keeps_options_that_do_not_fit_and_colours_chips_alike(tmp_path, monkeypatch):
    from crosstrain.planner import report

    drawn = {}
    monkeypatch.setattr(report, "save_figure", lambda fig, path: drawn.setdefault(str(path), fig))
    rows = [{"chip": "tpu-v5p", "chips": 64, "time_to_train_days": 0.5, "cost_usd": 2.5e6, "energy_mwh": 10.0},
            {"chip": "trn2", "chips": 16, "fits": False, "error": "the model fits no layout"},
            {"chip": "h100-sxm", "chips": 64, "time_to_train_days": 1.5, "cost_usd": 1.5e7, "energy_mwh": 20.0}]
    report.compare_chart(rows, tmp_path / "a.png", "t")
    fig = drawn[str(tmp_path / "a.png")]
    time_ax, cost_ax = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in time_ax.get_xticklabels()] == ["tpu-v5p\nx64", "trn2\nx16", "h100-sxm\nx64"]
    assert time_ax.get_title() == "hours to train"  # under two days: hours, not 0.0208 days
    assert any("does not" in t.get_text() for t in time_ax.texts)
    assert [p.get_height() for p in time_ax.patches] == pytest.approx([12.0, 0.0, 36.0])
    assert cost_ax.yaxis.get_major_formatter()(1.5e7, 0) == "$15M"
    colours = [p.get_facecolor() for p in time_ax.patches]
    report.compare_chart(list(reversed(rows)), tmp_path / "b.png", "t")
    again = [p.get_facecolor() for p in drawn[str(tmp_path / "b.png")].axes[0].patches]
    assert again == list(reversed(colours))  # a chip keeps its colour whatever the order


def test_recipe_compare_writes_its_chart(tmp_path, capsys):
    out = tmp_path / "recipe.png"
    assert main(["plan", "--recipe", "afm-on-device", "--compare", "tpu-v5p:2048,trn2:1024", "--out", str(out)]) == 0
    assert f"chart: {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_writes_a_chart(tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert main(["plan", "--preset", "afm-server-core", "--tokens", "6.3T", "--out", str(out),
                 "--compare", "tpu-v4:8192,tpu-v5p:2048,trn2:1024,h100-sxm:2048"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("tpu-v4", "tpu-v5p", "trn2", "h100-sxm"))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_published_cases_in_sample_and_leave_one_group_out():
    rows = read_cases(shipped_cases_path())
    result = evaluate_cases(shipped_cases_path())
    assert len(result["cases"]) == len(rows) >= 45
    summary = result["summary"]
    assert summary["groups"] >= 10
    assert {r["chip"] for r in rows} >= {"tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "a100-80gb", "h100-sxm", "h200",
                                         "b200", "trn1", "trn2"}
    for case in result["cases"]:
        assert case["predicted"] > 0 and case["loso_predicted"] > 0 and case["group"]
    # The target: leave-one-group-out median |error| <= 10% (docs/planner.md has the
    # measured values, 7.2% in sample and 9.7% out of sample).
    assert summary["median_abs_rel_error"] <= 0.10
    assert summary["loso_median_abs_rel_error"] <= 0.10
    # Issue 27's target: a run that ran fits the memory model with its stated layout (>= 95%).
    assert summary["memory_fit_fraction"] >= 0.95
    # The shipped fitted constants are the fit on every group.
    assert summary["fitted_scales"] == {name: FAMILIES[name].fitted_scale for name in summary["fitted_scales"]}
    assert summary["fitted_elementwise_passes"] == {
        name: FAMILIES[name].elementwise_passes for name in summary["fitted_elementwise_passes"]}
    assert set(result["by_family"]) == {"gpu", "tpu", "trainium"}


def test_leave_one_group_out_never_sees_the_group_it_predicts():
    from crosstrain.planner.calibrate import fit_and_leave_one_group_out, fit_constants
    from crosstrain.planner.cases import prepare_case

    prepared = [prepare_case(r) for r in read_cases(shipped_cases_path())]
    everything, loso = fit_and_leave_one_group_out(prepared)
    held = "tpu-recipes"
    others = [p for p in prepared if p.group != held]
    fitted = fit_constants(others)
    for p in prepared:
        if p.group == held:
            assert loso[p.row["id"]] == pytest.approx(p.predict({p.family: fitted[p.family]}))
    # The held-out group pulls the in-sample fit: refitting without it moves the TPU constants.
    assert everything["tpu"] != fitted["tpu"]
    assert everything == fit_constants(prepared)


def test_cases_cli_json_and_chart(tmp_path, capsys):
    chart = tmp_path / "cases.png"
    assert main(["plan", "--cases", str(shipped_cases_path()), "--json", "--out", str(chart)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"median_abs_rel_error", "max_abs_rel_error"} <= set(out["summary"])
    assert out["chart"] == str(chart) and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--preset", "nano", "--chip", "tpu-v9", "--chips", "8"], "unknown chip 'tpu-v9' (known:"),
        (["--preset", "nano", "--chip", "tpu-v5p", "--chips", "8", "--parallelism", "tp=3"], "does not divide"),
        (["--preset", "nano", "--chip", "tpu-v5p", "--chips", "8", "--parallelism", "tp=4"], "tp=4 does not divide model.heads"),
        (["--preset", "nano", "--chip", "tpu-v5p", "--chips", "8", "--parallelism", "pp=4"], "pp=4 does not divide model.layers"),
        (["--preset", "nano", "--chip", "tpu-v5p", "--chips", "8", "--parallelism", "tq=2"], "is not KEY=N"),
        (["--preset", "afm-server-core", "--chip", "tpu-v5e", "--chips", "1"], "fits no layout of 1 tpu-v5e"),
        (["--preset", "nano", "--compare", "tpu-v5p"], "is not CHIP:N"),
        (["--preset", "nano", "--chip", "tpu-v5p", "--chips", "8", "--tokens", "lots"], "--tokens"),
        (["--cases", "/no/such.csv"], "--cases: /no/such.csv not found"),
    ],
)
def test_plan_bad_inputs_exit_2(argv, words, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_cases_file_with_missing_column_or_unknown_metric(tmp_path, capsys):
    bad = tmp_path / "c.csv"
    bad.write_text("id,chip,chips\nx,tpu-v5p,4\n")
    assert main(["plan", "--cases", str(bad)]) == 2
    assert "lacks column" in capsys.readouterr().err
    text = shipped_cases_path().read_text().splitlines()
    header, row = text[0], text[1].replace("tflops_per_chip_hw", "joules")
    bad.write_text(header + "\n" + row + "\n")
    assert main(["plan", "--cases", str(bad)]) == 2
    assert "unknown metric 'joules'" in capsys.readouterr().err


def _has_libtpu():
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _has_libtpu(), reason="libtpu (the tpu extra) is not installed")
@pytest.mark.parametrize("remat", ["full", "selective", "none"])
def test_aot_tpu_memory_agrees_with_the_planner(remat, capsys):
    assert main(["plan", "--preset", "nano", "--chip", "tpu-v5p", "--chips", "4", "--remat", remat,
                 "--parallelism", "tp=1,pp=1,dp=1,fsdp=4,cp=1", "--aot", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    aot = out["aot"]
    assert aot["topology"] == "v5p:2x2x1" and aot["xla_flops_per_chip"] > 0
    assert aot["attention"] == "reference"  # nano's head_dim 64 is not Splash's
    # Within 15% for full and no recomputation (measured -1.7% and -2.5%); selective measured -15.3%:
    # XLA keeps about twice the bytes of the named residuals there (docs/planner.md).
    assert abs(aot["planner_rel_error"]) <= (0.20 if remat == "selective" else 0.15)
    # Parameters and Adam moments: 12 bytes per parameter sharded 4 ways, plus TPU tile padding of
    # small minor dimensions (a [6, 64] slice pads to (8, 128) tiles), 6% for nano.
    nano = load_config("nano").model
    assert aot["parameter_and_optimizer_gib"] * 2**30 == pytest.approx(total_params(nano) * 12 / 4, rel=0.10)
    # XLA's elementwise traffic per layer, from the unrolled 1- and 2-layer programs' HLO, is some
    # passes of the planner's fused count (reference attention's scores included in both).
    assert aot["xla_elementwise_gb_per_layer"] > 0 and 0.5 < aot["xla_elementwise_passes"] < 4
    assert aot["xla_elementwise_passes"] == pytest.approx(
        aot["xla_elementwise_gb_per_layer"] / aot["planner_one_pass_gb_per_layer"])
    if remat == "full":
        # benchmarks/aot_sweep.py --planner-only recomputes the planner's side (its one pass
        # included, which the kept XLA traffic is divided by again) without compiling.
        from crosstrain.planner.aot import compile_step

        again = compile_step(load_config("nano"), get_chip("tpu-v5p"), out["parallelism"], 4, "full",
                             planner_only=True)
        assert "memory_per_chip_gib" not in again
        assert again["planner_one_pass_gb_per_layer"] == pytest.approx(aot["planner_one_pass_gb_per_layer"])
        assert again["planner_step_time_s"] == pytest.approx(aot["planner_step_time_s"])


@pytest.mark.slow
@pytest.mark.skipif(not _has_libtpu(), reason="libtpu (the tpu extra) is not installed")
def test_aot_reports_a_program_that_cannot_fit_instead_of_failing(capsys):
    # 64 sequences of 8192 tokens per chip without recomputation: crosstrain's reference attention
    # alone needs 64 x 6 heads x 8192^2 fp32 scores, far past a v5p's 95 GiB.
    argv = ["plan", "--preset", "nano", "--chip", "tpu-v5p", "--chips", "4", "--set", "model.seq_len=8192",
            "--set", "train.batch=256", "--parallelism", "tp=1,pp=1,dp=1,fsdp=4,cp=1,microbatch=64", "--remat", "none",
            "--aot"]
    assert main(argv + ["--json"]) == 0
    aot = json.loads(capsys.readouterr().out)["aot"]
    assert aot["fits"] is False and aot["memory_per_chip_gib"] is None
    assert aot["xla_required_gib"] > aot["capacity_gib"] and aot["planner_memory_per_chip_gib"] > aot["capacity_gib"]
    assert main(argv) == 0
    assert "does not fit" in capsys.readouterr().out


def _afm_like(**changes) -> ModelConfig:
    base = dict(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256,
                seq_len=8192, tie_embeddings=False, qk_norm=False)
    base.update(changes)
    return ModelConfig(**base)


def test_fsdp_across_tpu_slices_is_hierarchical():
    """Only each device's share crosses DCN when FSDP spans two v6e-256 slices (XLA's multi-slice
    collectives); a flat ring over DCN would make the same step communication-bound."""
    import dataclasses

    m = _afm_like(layers=126, hidden=16384, heads=128, ffn=53248)
    chip = get_chip("tpu-v6e")
    one = estimate(m, chip, Layout(fsdp=256, remat="full"), global_batch=256)
    two = estimate(m, chip, Layout(fsdp=512, remat="full"), global_batch=512)
    flat = estimate(m, chip, Layout(fsdp=512, remat="full"), global_batch=512,
                    family=dataclasses.replace(FAMILIES["tpu"], hierarchical=False))
    assert two.time["fsdp_comm_s"] > one.time["fsdp_comm_s"]  # the DCN share costs something
    assert two.time["fsdp_comm_s"] < 2 * one.time["fsdp_comm_s"]
    assert flat.time["fsdp_comm_s"] > 20 * two.time["fsdp_comm_s"]
    assert flat.step_time_s > 3 * two.step_time_s
    # Inside one slice the two collective models agree.
    one_flat = estimate(m, chip, Layout(fsdp=256, remat="full"), global_batch=256,
                        family=dataclasses.replace(FAMILIES["tpu"], hierarchical=False))
    assert one_flat.time["fsdp_comm_s"] == pytest.approx(one.time["fsdp_comm_s"])


def test_fsdp_across_gpu_nodes_splits_over_the_nodes_nics():
    """NCCL runs a ring per NIC, so FSDP over 8 H100 nodes moves only the other nodes' shards over
    the network, spread over each node's eight NICs; a flat ring at one NIC's rate would cost the
    70B step several times more communication."""
    import dataclasses

    m = _afm_like(layers=80, hidden=8192, heads=64, ffn=28672, vocab=32000, seq_len=4096)
    chip = get_chip("h100-sxm")
    lay = Layout(fsdp=64, microbatch=2, remat="full")
    hier = estimate(m, chip, lay, global_batch=128)
    flat = estimate(m, chip, lay, global_batch=128, family=dataclasses.replace(FAMILIES["gpu"], hierarchical=False))
    assert FAMILIES["gpu"].hierarchical
    assert flat.time["fsdp_comm_s"] > 4 * hier.time["fsdp_comm_s"]
    assert flat.step_time_s > 1.3 * hier.step_time_s
    # Inside one node (NVLink) the two collective models agree.
    node = Layout(fsdp=8, microbatch=2, remat="full")
    assert estimate(m, chip, node, global_batch=16).time["fsdp_comm_s"] == pytest.approx(
        estimate(m, chip, node, global_batch=16, family=dataclasses.replace(FAMILIES["gpu"], hierarchical=False)).time["fsdp_comm_s"])


def test_source_stated_settings_change_what_they_should():
    m = _afm_like()
    h100 = get_chip("h100-sxm")
    base = Layout(fsdp=64, microbatch=1, remat="full")
    plain = estimate(m, h100, base, global_batch=512)
    kept = estimate(m, h100, Layout(**{**base.__dict__, "keep_gathered": True}), global_batch=512)
    # ZeRO-2: one all-gather per step instead of two per microbatch, at the price of holding the
    # whole gathered model.
    assert plain.time["microbatches"] == 8
    assert kept.time["fsdp_comm_s"] < plain.time["fsdp_comm_s"] / 5
    assert kept.memory["fsdp_buffers"] > 10 * plain.memory["fsdp_buffers"]
    fp8 = estimate(m, h100, Layout(**{**base.__dict__, "gather_bytes": 1}), global_batch=512)
    bf16_reduce = estimate(m, h100, Layout(**{**base.__dict__, "reduce_bytes": 2}), global_batch=512)
    assert fp8.time["fsdp_comm_s"] < plain.time["fsdp_comm_s"]
    assert bf16_reduce.time["fsdp_comm_s"] < plain.time["fsdp_comm_s"]
    tp = Layout(tp=8, dp=8, microbatch=1, remat="selective")
    no_overlap = estimate(m, h100, tp, global_batch=64)
    overlap = estimate(m, h100, Layout(**{**tp.__dict__, "tp_comm_overlap": True}), global_batch=64)
    assert no_overlap.time["tp_exposed_s"] == pytest.approx(no_overlap.time["tp_comm_s"])  # GPU: none hidden
    assert overlap.time["tp_exposed_s"] < 0.5 * no_overlap.time["tp_exposed_s"]
    assert overlap.step_time_s < no_overlap.step_time_s


def test_offload_recomputes_the_mlp_and_keeps_nothing_on_device():
    m = _afm_like()
    chip = get_chip("tpu-v6e")
    by = {r: estimate(m, chip, Layout(fsdp=8, microbatch=3, remat=r), global_batch=24)
          for r in ("selective", "offload", "full")}
    flops = {r: e.hardware_flops_per_step for r, e in by.items()}
    assert flops["selective"] < flops["offload"] < flops["full"]
    # The MLP is most of a layer's weights: offload recomputes most of what full does.
    assert (flops["offload"] - flops["selective"]) > 0.7 * (flops["full"] - flops["selective"])
    assert by["offload"].memory["activations"] < by["full"].memory["activations"]


def test_memory_settings_the_sources_state():
    """A distributed optimizer, host offload, vocabulary tiles and a chip's memory variant each
    move the memory they name, and nothing else."""
    m = _afm_like()
    h100 = get_chip("h100-sxm")
    base = Layout(tp=4, pp=2, dp=4, cp=2, microbatch=1, remat="none")
    plain = estimate(m, h100, base, global_batch=64)
    dist = estimate(m, h100, Layout(**{**base.__dict__, "zero1": True}), global_batch=64)
    per_device = total_params(m) / (4 * 2)
    # bf16 weights on every rank; fp32 master weights and both moments over dp x cp = 8 ranks.
    assert dist.memory["params"] == pytest.approx(per_device * 2)
    assert dist.memory["optimizer"] == pytest.approx(per_device * 12 / 8)
    assert plain.memory["params"] == pytest.approx(per_device * 4)
    assert plain.memory["optimizer"] == pytest.approx(per_device * 8)
    assert dist.step_time_s == pytest.approx(plain.step_time_s)
    # fp8 weights (Megatron's fp8_param_gather) and a bf16 gradient buffer (grad_reduce_in_fp32 off).
    lean = estimate(m, h100, Layout(**{**base.__dict__, "zero1": True, "gather_bytes": 1, "reduce_bytes": 2}),
                    global_batch=64)
    assert lean.memory["params"] == pytest.approx(per_device * 1)
    assert lean.memory["grads"] == pytest.approx(per_device * 2)
    # PyTorch's allocator may use the whole HBM; crosstrain's XLA client takes a fixed fraction.
    ours = estimate(m, h100, Layout(fsdp=8, microbatch=1, remat="full"), global_batch=8, implementation="crosstrain")
    assert plain.capacity_gib == pytest.approx(h100.hbm_gib)
    assert ours.capacity_gib < 0.95 * h100.hbm_gib
    v6e = get_chip("tpu-v6e")
    full = estimate(m, v6e, Layout(fsdp=8, microbatch=1, remat="full"), global_batch=8)
    host = estimate(m, v6e, Layout(fsdp=8, microbatch=1, remat="full", host_offload=True), global_batch=8)
    assert host.memory["activations"] < 0.5 * full.memory["activations"]  # only the working layer stays
    assert host.hardware_flops_per_step == full.hardware_flops_per_step
    tiled = estimate(m, v6e, Layout(fsdp=8, microbatch=1, remat="full", vocab_tiles=4), global_batch=8)
    assert tiled.memory["logits"] == pytest.approx(full.memory["logits"] / 4)
    # With a flash kernel, published software keeps no more with remat none than Megatron's
    # selective: the softmax it would drop is never stored.
    none = estimate(m, h100, Layout(fsdp=8, microbatch=1, remat="none"), global_batch=8)
    sel = estimate(m, h100, Layout(fsdp=8, microbatch=1, remat="selective"), global_batch=8)
    assert none.memory["activations"] <= sel.memory["activations"]  # selective adds a working layer
    assert none.step_time_s < sel.step_time_s


def test_loss_recomputation_gathers_and_fp8_casts_of_published_software():
    """Settings and physics of round two's third pass, each moving what it names."""
    m = _afm_like()
    h100, v5p = get_chip("h100-sxm"), get_chip("tpu-v5p")
    lay = Layout(fsdp=8, microbatch=2, remat="selective")
    plain = estimate(m, h100, lay, global_batch=16)
    # flash-attn's fused cross-entropy (llm-foundry): bf16 logits and a bf16 gradient, 4 bytes
    # a logit against Megatron's fp32 copy and bf16 gradient (6); time untouched.
    fused = estimate(m, h100, Layout(**{**lay.__dict__, "logit_bytes": 4}), global_batch=16)
    assert fused.memory["logits"] == pytest.approx(plain.memory["logits"] * 4 / 6)
    assert fused.step_time_s == plain.step_time_s
    # torchtitan's op-level checkpointing: keeps less than Megatron's selective set, reruns k,
    # the attention projection and the MLP's up projection but never the flash kernel.
    op = estimate(m, h100, Layout(**{**lay.__dict__, "remat": "op"}), global_batch=16)
    full = estimate(m, h100, Layout(**{**lay.__dict__, "remat": "full"}), global_batch=16)
    assert full.memory["activations"] < op.memory["activations"] < plain.memory["activations"]
    assert recomputed_attention_fraction("op", flash=True) == 0.0 < recomputed_attention_fraction("selective", flash=True)
    assert 0.3 < recomputed_dense_fraction(m, "op") < 0.5
    assert plain.hardware_flops_per_step < op.hardware_flops_per_step < full.hardware_flops_per_step
    # FSDP's weights in flight: PyTorch's FSDP prefetches the next block whole (two layers);
    # XLA on TPU schedules one all-gather per weight, so published TPU software holds one layer.
    # crosstrain's own TPU plans keep the count its compiled programs were fitted with.
    gpu = estimate(m, h100, lay, global_batch=16).memory["fsdp_buffers"]
    tpu = estimate(m, v5p, lay, global_batch=16).memory["fsdp_buffers"]
    ours = estimate(m, v5p, lay, global_batch=16, implementation="crosstrain").memory["fsdp_buffers"]
    assert gpu == pytest.approx(2 * layer_params(m) * 2) and tpu == pytest.approx(gpu / 2) and ours == gpu
    # FP8 casts every GEMM input and incoming gradient (amax, cast, transposed copy): memory-bound
    # time grows by exactly those bytes over the device's tokens and layers.
    bf16 = estimate(m, h100, lay, global_batch=16)
    fp8 = estimate(m, h100, lay, global_batch=16, compute_dtype="fp8")
    extra = quantize_cast_bytes_per_token_layer(m, lay) * m.layers * 16 * m.seq_len / 8 / (h100.hbm_gbps * 1e9)
    assert fp8.time["memory_bound_s"] - bf16.time["memory_bound_s"] == pytest.approx(extra, rel=1e-6)
    assert fp8.time["compute_s"] < bf16.time["compute_s"]
    # A data-parallel all-reduce that waits for the end of the backward (AXLearn's single-slice
    # runs: XLA's data-parallel all-reduce optimization off) is exposed whole.
    dp = Layout(dp=8, microbatch=1, remat="full")
    hidden = estimate(m, v5p, dp, global_batch=8)
    waits = estimate(m, v5p, Layout(**{**dp.__dict__, "dp_overlap": False}), global_batch=8)
    assert hidden.time["dp_comm_s"] > 0 and hidden.time["sharding_exposed_s"] < 0.5 * hidden.time["dp_comm_s"]
    assert waits.time["sharding_exposed_s"] == pytest.approx(waits.time["dp_comm_s"])
    assert waits.step_time_s - hidden.step_time_s == pytest.approx(
        waits.time["dp_comm_s"] - hidden.time["sharding_exposed_s"])


def test_jax_full_recomputation_never_reruns_the_down_projection():
    """XLA's own FLOP count of crosstrain's step (2 unrolled layers, compiled on this CPU): full
    recomputation adds the layers' forward without the MLP's down projection (jax.checkpoint
    reruns only what the backward reads), as recomputed_dense_fraction(xla=True) counts."""
    from crosstrain.flops import attention_flops_per_token, matmul_params
    from crosstrain.planner.aot import _analysis, _compile, _program

    base = load_config("tiny")
    flops = {}
    for remat in ("none", "full"):
        cfg = _program(base, layers=2, remat=remat, batch=8, microbatches=1, mesh={}, scan=False).override(
            model={"hidden": 256, "ffn": 1024, "heads": 4, "kv_heads": 2, "head_dim": 64, "vocab": 512, "seq_len": 128})
        flops[remat] = _analysis(_compile(cfg, jax.devices()[:1])[0])["flops"]
    m = cfg.model
    tokens = 8 * m.seq_len
    dense_fwd = 2.0 * (matmul_params(m) - m.hidden * m.vocab) * tokens
    attn_fwd = attention_flops_per_token(m, attention="full") * tokens
    extra = flops["full"] - flops["none"]
    counted = recomputed_dense_fraction(m, "full", xla=True) * dense_fwd + attn_fwd
    assert recomputed_dense_fraction(m, "full", xla=True) < recomputed_dense_fraction(m, "full") == 1.0
    assert extra == pytest.approx(counted, rel=0.05)
    assert extra < 0.85 * (dense_fwd + attn_fwd)  # not the whole forward


def test_a_row_with_a_memory_variant_of_its_chip(tmp_path, capsys):
    text = shipped_cases_path().read_text().splitlines()
    path = tmp_path / "c.csv"
    path.write_text(text[0] + ",hbm_gb\n" + text[1] + ",160\n")
    assert main(["plan", "--cases", str(path), "--json"]) == 0
    big = json.loads(capsys.readouterr().out)["cases"][0]
    path.write_text(text[0] + "\n" + text[1] + "\n")
    assert main(["plan", "--cases", str(path), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["cases"][0]
    assert big["capacity_gib"] == pytest.approx(plain["capacity_gib"] * 160e9 / get_chip(plain["chip"]).hbm_gib / 2**30)
    path.write_text(text[0] + ",hbm_gb\n" + text[1] + ",lots\n")
    assert main(["plan", "--cases", str(path)]) == 2
    err = capsys.readouterr().err
    assert "hbm_gb must be a positive number" in err and err.count("\n") == 1


def test_bad_source_setting_in_cases_file(tmp_path, capsys):
    text = shipped_cases_path().read_text().splitlines()
    bad = tmp_path / "c.csv"
    bad.write_text(text[0] + ",gather_bytes\n" + text[1] + ",3\n")
    assert main(["plan", "--cases", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "gather_bytes must be 1, 2 or 4" in err and err.count("\n") == 1
    bad.write_text(text[0] + ",logit_bytes\n" + text[1] + ",8\n")
    assert main(["plan", "--cases", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "logit_bytes must be 2, 4 or 6" in err and err.count("\n") == 1


def test_cluster_network_framework_and_state_dtype_settings(tmp_path, capsys):
    """Round two's fourth pass: what a source states about its cluster's network, its framework
    and the dtype of its weights and optimizer moves what it names, and bad values are one-line
    errors."""
    m = _afm_like()
    h100, trn1 = get_chip("h100-sxm"), get_chip("trn1")
    lay = Layout(fsdp=64, microbatch=2, remat="full")
    plain = estimate(m, h100, lay, global_batch=128)
    # bf16 weights and Adam moments (MaxText's weight_dtype, Neuron's XLA_USE_BF16): half the
    # bytes of both, and less optimizer traffic.
    bf16 = estimate(m, h100, Layout(**{**lay.__dict__, "state_bytes": 2}), global_batch=128)
    assert bf16.memory["params"] == pytest.approx(plain.memory["params"] / 2)
    assert bf16.memory["optimizer"] == pytest.approx(plain.memory["optimizer"] / 2)
    assert bf16.time["memory_bound_s"] < plain.time["memory_bound_s"]
    # Without sequence parallelism the tensor-parallel ranks each keep the whole residual stream.
    tp = Layout(tp=8, dp=4, microbatch=1, remat="none")
    sp = estimate(m, trn1, tp, global_batch=32)
    no_sp = estimate(m, trn1, Layout(**{**tp.__dict__, "sequence_parallel": False}), global_batch=32)
    assert no_sp.memory["activations"] > sp.memory["activations"]
    # A JAX program on a GPU (Pax) never reruns the MLP's down projection under full remat.
    jax = estimate(m, h100, lay, global_batch=128, framework="jax")
    assert jax.hardware_flops_per_step < plain.hardware_flops_per_step
    # The rows: a thinner network per node slows a cross-node FSDP run.
    text = shipped_cases_path().read_text().splitlines()
    row = next(line for line in text if line.startswith("ibm-fsdp-llama2-70b-a100-128,"))
    path = tmp_path / "c.csv"

    def run(extra_header: str = "", extra: str = "") -> dict:
        path.write_text(text[0] + extra_header + "\n" + row + extra + "\n")
        assert main(["plan", "--cases", str(path), "--json"]) == 0
        return json.loads(capsys.readouterr().out)["cases"][0]

    stated = run()  # the blog's 400 Gb/s per node (published_cases_assumptions.csv)
    wide = run(",network_gbit_per_node", ",3200")
    assert wide["predicted"] > stated["predicted"]
    assert any("400 Gb/s of scale-out network" in a for a in stated["assumed"])
    _each_bad_setting_is_one_line(path, text[0], row, capsys, (
        ("network_gbit_per_node", "fast", "network_gbit_per_node must be a positive"),
        ("framework", "tensorflow", "framework must be jax or pytorch"),
        ("state_bytes", "1", "state_bytes must be 2 or 4"),
        ("sequence_parallel", "maybe", "sequence_parallel must be true or false")))


def _each_bad_setting_is_one_line(path, header: str, row: str, capsys, cases) -> None:
    """Each (column, value, words): the row with that column added fails `plan --cases` with exit
    2 and a one-line error containing the words."""
    for column, value, words in cases:
        path.write_text(f"{header},{column}\n{row},{value}\n")
        assert main(["plan", "--cases", str(path)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1


def test_block_level_checkpointing_and_stated_memory_bandwidth(tmp_path, capsys):
    """Round two's fifth pass: fms-fsdp checkpoints every n-th block (`remat_blocks`: the share
    of blocks the policy covers; the rest keep everything), and a source's stated HBM bandwidth
    (`hbm_tbps`: Grand Teton's H100s at 2.4 TB/s) sets the memory-bound work's rate. Bad values
    are one-line errors."""
    m = _afm_like()
    h100 = get_chip("h100-sxm")
    base = dict(fsdp=64, microbatch=2)
    none = estimate(m, h100, Layout(**base, remat="none"), global_batch=128)
    full = estimate(m, h100, Layout(**base, remat="full"), global_batch=128)
    half = estimate(m, h100, Layout(**base, remat="full", remat_blocks=0.5), global_batch=128)
    # Half the blocks rerun their forward: half the extra work, and activations between the two.
    extra = full.hardware_flops_per_step - none.hardware_flops_per_step
    assert extra > 0
    assert half.hardware_flops_per_step - none.hardware_flops_per_step == pytest.approx(extra / 2)
    assert full.memory["activations"] < half.memory["activations"] < none.memory["activations"]
    assert full.step_time_s > half.step_time_s > none.step_time_s
    # The rows: IBM's 13B "Selective AC" is full checkpointing on every second block.
    text = shipped_cases_path().read_text().splitlines()
    path = tmp_path / "c.csv"

    def run(row_id: str, extra_header: str = "", extra_value: str = "") -> dict:
        row = next(line for line in text if line.startswith(row_id + ","))
        path.write_text(text[0] + extra_header + "\n" + row + extra_value + "\n")
        assert main(["plan", "--cases", str(path), "--json"]) == 0
        return json.loads(capsys.readouterr().out)["cases"][0]

    ibm = run("ibm-fsdp-llama2-13b-h100-96")
    assert ibm["remat"] == "full on 0.5 of the blocks"
    every = run("ibm-fsdp-llama2-13b-h100-96", ",remat_blocks", ",1")
    assert every["remat"] == "full" and every["predicted"] < ibm["predicted"]
    # torchtitan's Grand Teton H100s: 2.4 TB/s stated; the SXM part's 3.35 would make it faster.
    teton = run("torchtitan-llama3.1-8b-8")
    assert any("2.4 TB/s of memory bandwidth" in a for a in teton["assumed"])
    sxm = run("torchtitan-llama3.1-8b-8", ",hbm_tbps", ",3.35")
    assert sxm["predicted"] > teton["predicted"]
    row = next(line for line in text if line.startswith("ibm-fsdp-llama2-13b-h100-96,"))
    _each_bad_setting_is_one_line(path, text[0], row, capsys, (
        ("remat_blocks", "1.5", "remat_blocks must be a fraction of the blocks in (0, 1]"),
        ("remat_blocks", "half", "remat_blocks must be a fraction"),
        ("hbm_tbps", "-2", "hbm_tbps must be a positive number of TB/s")))


def test_flash_kernels_run_at_their_benchmarked_rate_on_each_gpu(tmp_path, capsys):
    """Round two's sixth pass: a GPU's flash-attention kernel runs at the rate its authors
    benchmarked on that chip (FlashAttention-2 on A100; cuDNN and FlashAttention-2 on H100/H200),
    converted to the planner's count (3 forward-FLOPs against the benchmarks' 3.5), and a row
    names its kernel (`attention_kernel`). Chips without a benchmark keep the family's value."""
    h100, a100, b200 = get_chip("h100-sxm"), get_chip("a100-80gb"), get_chip("b200")
    # cuDNN on H100 at 4k-8k tokens: forward 523.5, backward 508.5 TFLOP/s of 989.
    assert h100.attention_eff("cudnn") == pytest.approx(3 / (989 / 523.5 + 2.5 * 989 / 508.5))
    assert h100.attention_eff() == h100.attention_eff("cudnn") > h100.attention_eff("flash2")
    assert get_chip("h200").attention == h100.attention
    # On A100 every fused kernel is FlashAttention-2's generation; B200 has no benchmark here.
    assert a100.attention_eff("cudnn") == a100.attention_eff("flash2") > h100.attention_eff("flash2")
    assert b200.attention_eff() is None
    m = _afm_like(seq_len=32768)
    lay = Layout(fsdp=64, microbatch=1, remat="full")
    cudnn = estimate(m, h100, lay, global_batch=64)
    fa2 = estimate(m, h100, lay, global_batch=64, attention_kernel="flash2")
    assert fa2.time["compute_s"] > cudnn.time["compute_s"]
    assert fa2.hardware_flops_per_step == cudnn.hardware_flops_per_step
    assert (estimate(m, a100, lay, global_batch=64, attention_kernel="flash2").step_time_s
            == estimate(m, a100, lay, global_batch=64).step_time_s)
    # Without a flash kernel the family's value prices the score matmuls, whatever the row says.
    assert (estimate(m, h100, lay, global_batch=64, flash=False, attention_kernel="flash2").step_time_s
            == estimate(m, h100, lay, global_batch=64, flash=False).step_time_s)
    # The rows: torchtitan's H100s ran SDPA's FlashAttention-2 backend; cuDNN would be faster.
    text = shipped_cases_path().read_text().splitlines()
    path = tmp_path / "c.csv"
    row = next(line for line in text if line.startswith("torchtitan-llama3.1-8b-8,"))

    def run(extra_header: str = "", extra: str = "") -> dict:
        path.write_text(text[0] + extra_header + "\n" + row + extra + "\n")
        assert main(["plan", "--cases", str(path), "--json"]) == 0
        return json.loads(capsys.readouterr().out)["cases"][0]

    stated = run()
    assert any(a.startswith("attention_kernel=flash2") for a in stated["assumed"])
    assert run(",attention_kernel", ",cudnn")["predicted"] > stated["predicted"]
    _each_bad_setting_is_one_line(path, text[0], row, capsys, (
        ("attention_kernel", "fa3", "attention_kernel must be one of cudnn, flash2"),))


def test_sliding_window_attention_and_int8_matmuls(tmp_path, capsys):
    """Gemma 3's local layers attend to a 1024-token band that a flash kernel skips around, and
    AQT's int8 matmuls run at the chip's int8 peak (attention stays bf16)."""
    from crosstrain.flops import attention_flops_per_token

    m = _afm_like(layers=48, seq_len=32768)
    v6e = get_chip("tpu-v6e")
    lay = Layout(fsdp=256, microbatch=1, remat="full")
    full = estimate(m, v6e, lay, global_batch=256)
    local = estimate(m, v6e, lay, global_batch=256, sliding_window=(1024, 40))
    w, s = 1024, 32768
    band = (w - w * w / (2 * s)) / (s / 2)
    attn = attention_flops_per_token(m, attention="causal") * 256 * s
    saved = attn * (1 - (8 + 40 * band) / 48)
    # The saved forward FLOPs, counted again in the backward (2x) and the recomputation (<= 1x).
    assert 3.0 <= (full.hardware_flops_per_step - local.hardware_flops_per_step) / saved <= 4.0
    assert local.hardware_flops_per_step < full.hardware_flops_per_step and local.step_time_s < full.step_time_s
    # Without a flash kernel the masked scores are computed anyway.
    assert estimate(m, v6e, lay, global_batch=256, flash=False, sliding_window=(1024, 40)).step_time_s == \
        estimate(m, v6e, lay, global_batch=256, flash=False).step_time_s
    # int8 weight GEMMs at twice the bf16 peak on v5p; the quantization's amax and cast passes cost
    # memory-bound time like FP8's.
    v5p = get_chip("tpu-v5p")
    assert v5p.peak_flops("int8") == 2 * v5p.peak_flops("bfloat16")
    m = _afm_like()
    lay = Layout(fsdp=64, microbatch=2, remat="full")
    bf16 = estimate(m, v5p, lay, global_batch=128)
    int8 = estimate(m, v5p, lay, global_batch=128, compute_dtype="int8")
    assert int8.time["compute_s"] < bf16.time["compute_s"] and int8.time["memory_bound_s"] > bf16.time["memory_bound_s"]
    # The row's fields: a bad window is a one-line error.
    text = shipped_cases_path().read_text().splitlines()
    row = next(line for line in text if line.startswith("tpurec-v6e-gemma3-12b-1x256,"))
    path = tmp_path / "c.csv"
    path.write_text(text[0] + ",sliding_window,sliding_layers\n" + row + ",wide,40\n")
    assert main(["plan", "--cases", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sliding_window must be a positive number of tokens" in err and err.count("\n") == 1
    path.write_text(text[0] + "\n" + row + "\n")
    assert main(["plan", "--cases", str(path), "--json"]) == 0
    case = json.loads(capsys.readouterr().out)["cases"][0]
    path.write_text(text[0] + ",sliding_layers\n" + row + ",1\n")  # one local layer instead of the stated 40
    assert main(["plan", "--cases", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cases"][0]["step_time_s"] > case["step_time_s"]


def test_maxtexts_save_dot_except_mlpwi_policy():
    """MaxText's save_dot_except_mlpwi keeps every weight matmul's output but the MLP's gate and
    up (recomputed in the backward), between `minimal` (all kept) and `full` (none)."""
    from crosstrain.planner.model import activation_bytes_per_token_layer

    m = _afm_like()
    lay = Layout(fsdp=64, microbatch=4, remat="dots_except_mlpwi")
    act = activation_bytes_per_token_layer(m, lay, flash=True)
    assert act["minimal"] - act["dots_except_mlpwi"] == pytest.approx(2 * 2 * m.ffn)  # gate and up, bf16
    assert act["full"] < act["dots_except_mlpwi"] < act["minimal"]
    weights = m.hidden * (m.heads + 2 * m.kv_heads) * m.head_dim + m.heads * m.head_dim * m.hidden + 3 * m.hidden * m.ffn
    assert recomputed_dense_fraction(m, "dots_except_mlpwi") == pytest.approx(2 * m.hidden * m.ffn / weights)
    v5p = get_chip("tpu-v5p")
    kept = estimate(m, v5p, Layout(fsdp=64, microbatch=4, remat="minimal"), global_batch=256)
    rerun = estimate(m, v5p, lay, global_batch=256)
    assert rerun.hardware_flops_per_step > kept.hardware_flops_per_step
    assert rerun.memory["activations"] < kept.memory["activations"]


def test_each_weight_matmul_is_judged_by_its_own_shape():
    """Under wide tensor parallelism the attention projections get narrow (heads x head_dim / tp)
    while the MLP stays wide: the layer's efficiency lies between the two, weighted by FLOPs, not
    at the narrowest matmul's."""
    from crosstrain.planner.model import _dense_shape_factor, _shape_factor

    m = _afm_like(layers=32, hidden=4096, heads=32, ffn=14336)  # GQA: 8 key/value heads
    half = 128
    narrow = _shape_factor(32 * 128 / 32, half)  # the output projection's contraction at tp=32
    wide = _shape_factor(14336 / 32, half)  # the MLP's width at tp=32
    layer = _dense_shape_factor(m, 32, half)
    assert narrow < layer < wide
    assert layer > (narrow + wide) / 2  # the MLP is most of the FLOPs
    assert _dense_shape_factor(m, 1, half) > layer  # no tensor parallelism: every matmul is wide


def test_attention_without_flash_pays_for_its_scores_in_memory_traffic():
    m = _afm_like(layers=4, hidden=2048, heads=16, ffn=8192)
    chip = get_chip("a100-80gb")
    lay = Layout(dp=8, microbatch=1, remat="none")
    times = {}
    for seq in (2048, 4096):
        mm = ModelConfig(**{**m.__dict__, "seq_len": seq})
        flash = estimate(mm, chip, lay, global_batch=8, flash=True)
        plain = estimate(mm, chip, lay, global_batch=8, flash=False)
        assert plain.time["memory_bound_s"] > flash.time["memory_bound_s"]
        times[seq] = (plain.time["memory_bound_s"] - flash.time["memory_bound_s"]) / seq  # per token
    # Score traffic per token grows with the sequence (heads x seq elements per token and layer).
    assert times[4096] == pytest.approx(2 * times[2048], rel=1e-6)


def test_a_measured_matmul_ceiling_replaces_the_family_value():
    import dataclasses

    m = _afm_like()
    h100 = get_chip("h100-sxm")
    assert 0.7 < h100.matmul_eff < 0.9 and "matmul" in h100.sources
    lay = Layout(fsdp=8, microbatch=1, remat="full")
    measured = estimate(m, h100, lay, global_batch=8)
    unmeasured = estimate(m, dataclasses.replace(h100, matmul_eff=0.0), lay, global_batch=8)
    ratio = h100.matmul_eff / FAMILIES["gpu"].matmul_eff
    assert measured.time["matmul_efficiency"] == pytest.approx(unmeasured.time["matmul_efficiency"] * ratio)
    assert CATALOG["tpu-v5p"].matmul_eff == 0.0  # no published measurement: the family's value


def test_elementwise_traffic_counted_from_optimized_hlo():
    """The entry computation's elementwise/reduction fusions and copies read their operands and
    write their results; matmul fusions, custom calls (Splash) and parameters move nothing here.
    Attributes may span lines (kernel metadata) without ending the computation."""
    from crosstrain.planner.aot import elementwise_bytes

    hlo = "\n".join([
        "%fused_computation.1 (p: bf16[4,8]) -> bf16[4,8] {",
        "  %p = bf16[4,8]{1,0} parameter(0)",
        "  ROOT %n = bf16[4,8]{1,0} negate(%p)",
        "}",
        "",
        "ENTRY %main (a: bf16[4,8], b: f32[8,16]) -> (bf16[4,16], f32[4]) {",
        "  %a = bf16[4,8]{1,0} parameter(0)",
        "  %b = f32[8,16]{1,0} parameter(1)",
        "  %fusion.1 = bf16[4,8]{1,0:T(8,128)(2,1)} fusion(%a), kind=kLoop, calls=%fused_computation.1",
        "  %fusion.2 = bf16[4,16]{1,0} fusion(%fusion.1, %b), kind=kOutput, calls=%fused_computation.2",
        "  %custom-call.1 = (f32[4]{0}, bf16[4,16]{1,0}) custom-call(%fusion.2), custom_call_target=\"tpu_custom_call\", "
        "frontend_attributes={kernel_metadata={",
        "\"xprof_metadata\":\"{}\"",
        "}}, metadata={op_name=\"splash\"}",
        "  %gte = f32[4]{0} get-tuple-element(%custom-call.1), index=0",
        "  %fusion.3 = f32[4]{0} fusion(%gte, %b), kind=kInput, calls=%fused_computation.3",
        "  %copy.1 = bf16[4,16]{0,1} copy(%fusion.2)",
        "  ROOT %t = (bf16[4,16]{1,0}, f32[4]{0}) tuple(%copy.1, %fusion.3)",
        "}",
    ])
    loop = 2 * (4 * 8) * 2  # negate: read a, write the result
    reduce = 4 * 4 + 4 * 4 + 8 * 16 * 4  # read the custom call's f32[4] and b, write f32[4]
    copy = 2 * (4 * 16) * 2
    assert elementwise_bytes(hlo) == loop + reduce + copy


def test_crosstrain_tpu_and_gpu_plans_use_the_passes_measured_from_their_hlo():
    """crosstrain's own TPU and GPU steps are priced with the elementwise passes measured from
    their compiled HLO; published software (and Trainium) keep the family's fitted passes."""
    import dataclasses

    from crosstrain.planner.model import CROSSTRAIN_GPU_ELEMENTWISE_PASSES, CROSSTRAIN_TPU_ELEMENTWISE_PASSES

    m = _afm_like(layers=4)
    for chip, family, passes in ((get_chip("tpu-v5p"), "tpu", CROSSTRAIN_TPU_ELEMENTWISE_PASSES),
                                 (get_chip("h100-sxm"), "gpu", CROSSTRAIN_GPU_ELEMENTWISE_PASSES)):
        assert passes != FAMILIES[family].elementwise_passes
        for remat in ("none", "selective", "full"):
            lay = Layout(fsdp=8, microbatch=1, remat=remat, sequence_parallel=False)
            own = estimate(m, chip, lay, global_batch=8, flash=True, implementation="crosstrain")
            as_measured = estimate(m, chip, lay, global_batch=8, flash=True,
                                   family=dataclasses.replace(FAMILIES[family], elementwise_passes=passes))
            published = estimate(m, chip, lay, global_batch=8, flash=True)
            assert own.time["memory_bound_s"] == pytest.approx(as_measured.time["memory_bound_s"])
            assert (own.time["memory_bound_s"] < published.time["memory_bound_s"]) == (passes < FAMILIES[family].elementwise_passes)
    trn2 = get_chip("trn2")
    lay = Layout(tp=4, fsdp=8, microbatch=1, remat="none", sequence_parallel=False)
    assert estimate(m, trn2, lay, global_batch=8, flash=True, implementation="crosstrain").time["memory_bound_s"] == \
        pytest.approx(estimate(m, trn2, lay, global_batch=8, flash=True).time["memory_bound_s"])


def test_a_row_that_cannot_be_laid_out_is_reported_not_fatal(tmp_path, capsys):
    """plan --cases evaluates every row: one no layout can hold is refused with its reason, counted
    as a 100% miss, and the command still exits 0 with the others."""
    text = shipped_cases_path().read_text().splitlines()
    header, first = text[0], text[1].split(",")
    cols = header.split(",")
    impossible = dict(zip(cols, first))
    impossible.update({"id": "impossible", "chips": "8", "tp": "16", "pp": "", "dp": "", "fsdp": "", "cp": ""})
    path = tmp_path / "cases.csv"
    path.write_text("\n".join([header, text[1], ",".join(impossible[c] for c in cols)]) + "\n")
    assert main(["plan", "--cases", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    refused = [c for c in out["cases"] if c["refused"]]
    assert [c["id"] for c in refused] == ["impossible"] and "no layout" in refused[0]["reason"]
    assert out["summary"]["refused"] == 1 and out["summary"]["count"] == 2
    assert out["summary"]["max_abs_rel_error"] == 1.0  # the refused row counts as a full miss
    kept = next(c for c in out["cases"] if not c["refused"])
    assert kept["memory_per_device_gib"] > 0 and isinstance(kept["memory_fits"], bool)
    assert 0 <= out["summary"]["memory_fit_fraction"] <= 0.5


def test_plans_price_both_softwares_and_say_how_far_to_trust_them():
    cfg = load_config("afm-server-core")
    own = plan(cfg, Options(chip="trn2", chips=1024))
    best = plan(cfg, Options(chip="trn2", chips=1024, software="published"))
    # Trainium: crosstrain's step has no flash kernel (NKI); the published software has one.
    assert own["software"] == "crosstrain" and best["software"] == "published"
    assert best["step_time_s"] < own["step_time_s"]
    from crosstrain.planner.plan import compare

    rows = compare(cfg, [("trn2", 1024), ("h100-sxm", 1024)], Options(chip="", chips=0))
    assert [(r["chip"], r["software"]) for r in rows] == [("trn2", "crosstrain"), ("trn2", "published"),
                                                           ("h100-sxm", "crosstrain"), ("h100-sxm", "published")]
    near = plan(load_config("afm-on-device-3b"), Options(chip="tpu-v5p", chips=2048))["nearest_published"]
    assert near[0]["id"] == "axlearn-honeycrisp3b-v5p-2048" and near[0]["chip"] == "tpu-v5p"
    assert all(n["chip"].startswith("tpu") and isinstance(n["loso_rel_error"], float) for n in near)
