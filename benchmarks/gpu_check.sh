#!/usr/bin/env bash
# The GPU path measured on a real NVIDIA GPU, in one call of under 10 minutes:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default benchmarks/results)
#
# 1. installs crosstrain with the `cuda` extra (where no package index is reachable, as on an
#    offline GPU host whose image already has a CUDA JAX, it installs crosstrain alone over that
#    JAX and says which JAX it used);
# 2. runs `crosstrain bench` on two shapes, `nano` (6 x 384, 11M parameters) and a ~1B shape
#    (16 layers x 2048, seq 2048), each with the planner's prediction for the same chip and shape
#    (bench prints it beside the measurement);
# 3. runs benchmarks/peers.py on the GPU for the same two shapes: transformers' Qwen3 with
#    torch.optim.AdamW, eager and torch.compile, fp32 and bf16 autocast;
# 4. writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (a dated section, with the GPU's
#    name, ready to go into docs/performance.md) and appends the section to docs/performance.md.
#
# Nothing here runs without a GPU: the script stops at once, saying so, when JAX sees none.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/results}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU in peers.py: no preallocation by JAX there.
start=$(date +%s)

if ! $PY -m pip install --quiet -e '.[cuda]' 2>"$OUT_DIR/gpu_check_pip.log"; then
  echo "gpu_check: could not install the cuda extra (no package index?); using this machine's own JAX" >&2
  $PY -m pip install --quiet --no-deps -e . >>"$OUT_DIR/gpu_check_pip.log" 2>&1 || { echo "gpu_check: pip failed"; exit 2; }
fi
$PY - <<'EOF' || exit 2
import jax
d = jax.devices()[0]
if d.platform != "gpu":
    raise SystemExit(f"gpu_check: JAX sees no GPU here (platform {d.platform}); nothing to measure")
print(f"gpu_check: JAX {jax.__version__} on {len(jax.devices())} x {d.device_kind}")
EOF

ONE_B="model.layers=16 model.hidden=2048 model.heads=16 model.kv_heads=8 model.head_dim=128 model.ffn=5632 model.vocab=32768 model.seq_len=2048 train.batch=8"
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  echo "gpu_check: $name ($(( $(date +%s) - start )) s in)" >&2
  timeout "$limit" "$@" >"$OUT_DIR/gpu_check_$name.json" 2>"$OUT_DIR/gpu_check_$name.log" \
    || echo "gpu_check: $name failed or ran past ${limit}s (see $OUT_DIR/gpu_check_$name.log)" >&2
}
run bench_nano 90 crosstrain bench --preset nano --steps 40 --json
run bench_1b 150 crosstrain bench --preset nano --set $ONE_B --steps 20 --json
XLA_PYTHON_CLIENT_PREALLOCATE=false run peers_nano 120 $PY benchmarks/peers.py --device cuda --steps 10 --rounds 2 --json
XLA_PYTHON_CLIENT_PREALLOCATE=false run peers_1b 180 $PY benchmarks/peers.py --device cuda --steps 5 --rounds 2 --json \
  --set $ONE_B

$PY - "$OUT_DIR" <<'EOF'
import datetime, json, sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    try:
        return json.loads((out / f"gpu_check_{name}.json").read_text())
    except (OSError, ValueError):
        return None


runs = {name: load(name) for name in ("bench_nano", "bench_1b", "peers_nano", "peers_1b")}
gpu = next((r["device_kind"] for r in (runs["bench_nano"], runs["bench_1b"]) if r), "an NVIDIA GPU")
day = datetime.date.today().isoformat()
lines = [f"### {gpu}, {day} (`bash benchmarks/gpu_check.sh`)", "",
         "| shape | crosstrain tokens/s | MFU | planner predicted step / measured | resolved |", "|---|---|---|---|---|"]
for shape in ("nano", "1b"):
    b = runs[f"bench_{shape}"]
    if not b:
        lines.append(f"| {shape} | failed | | | |")
        continue
    pred = b.get("predicted_step_time_s")
    ratio = f"{pred / b['step_time_s']:.2f}x" if pred else "n/a"
    mfu = f"{100 * b['mfu']:.1f}%" if b.get("mfu") is not None else "n/a"
    resolved = ", ".join(f"{k}={b['resolved'][k]}" for k in ("attention", "compute_dtype", "remat"))
    lines.append(f"| {shape} | {b['tokens_per_s']:,.0f} | {mfu} | {ratio} | {resolved} |")
lines += ["", "| shape | " + " | ".join(("crosstrain fp32", "crosstrain bf16", "peer eager fp32", "peer eager bf16",
                                          "peer compiled fp32", "peer compiled bf16")) + " |", "|---" * 7 + "|"]
for shape in ("nano", "1b"):
    p = runs[f"peers_{shape}"]
    if not p:
        lines.append(f"| {shape} | peers.py failed |")
        continue
    r = p["tokens_per_s"]
    keys = ("crosstrain_fp32", "crosstrain_bf16", "peer_eager_fp32", "peer_eager_bf16", "peer_compile_fp32",
            "peer_compile_bf16")
    lines.append(f"| {shape} | " + " | ".join(f"{r[k]:,.0f}" if k in r else "n/a" for k in keys) + " |")
lines.append("")
text = "\n".join(lines)
(out / "gpu_check.md").write_text(text)
(out / "gpu_check.json").write_text(json.dumps({"gpu": gpu, "date": day, **runs}, indent=1))
with open("docs/performance.md", "a") as f:
    f.write("\n" + text)
print(text)
EOF
echo "gpu_check: done in $(( $(date +%s) - start )) s" >&2
