"""Hugging Face hand-off: export a run as a `transformers` model directory, import one back.

crosstrain's decoder is, piece for piece, Hugging Face's Qwen3 (RMSNorm, per-head RMSNorm on q and
k before rotate-half RoPE, GQA, SwiGLU, optional tied embeddings); without QK-norm it is Llama.
Export writes `config.json` for that architecture, the weights as safetensors in PyTorch's
(out_features, in_features) layout, `generation_config.json`, and the run's tokenizer so that
`AutoTokenizer` and `AutoModelForCausalLM` load the directory offline. Import reads a Qwen3 or
Llama directory (one safetensors file or an index of shards) back into crosstrain's parameters.
Neither direction needs torch. This module converts and reads and writes files only; `crosstrain
export` and `import` (cli.py) load and write the runs around it (runtime.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np

from crosstrain.config import Config, ModelConfig, dtype_of
from crosstrain.errors import UserError

SUPPORTED = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
SHARD_BYTES = 4 * 1024**3


def architecture(m: ModelConfig) -> str:
    return "Qwen3ForCausalLM" if m.qk_norm else "LlamaForCausalLM"


# --------------------------------------------------------------------------------------------
# Tensors: crosstrain's stacked layout <-> per-layer (out, in) matrices.


def to_hf_tensors(params: dict[str, Any], m: ModelConfig) -> dict[str, np.ndarray]:
    p = {k: np.asarray(v) for k, v in params["layers"].items()}
    d, h, kv, hd = m.hidden, m.heads, m.kv_heads, m.head_dim
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]), "model.norm.weight": np.asarray(params["final_norm"])}
    for i in range(m.layers):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = p["attn_norm"][i]
        out[pre + "post_attention_layernorm.weight"] = p["mlp_norm"][i]
        out[pre + "self_attn.q_proj.weight"] = p["wq"][i].reshape(d, h * hd).T
        out[pre + "self_attn.k_proj.weight"] = p["wk"][i].reshape(d, kv * hd).T
        out[pre + "self_attn.v_proj.weight"] = p["wv"][i].reshape(d, kv * hd).T
        out[pre + "self_attn.o_proj.weight"] = p["wo"][i].reshape(h * hd, d).T
        if m.qk_norm:
            out[pre + "self_attn.q_norm.weight"] = p["q_norm"][i]
            out[pre + "self_attn.k_norm.weight"] = p["k_norm"][i]
        out[pre + "mlp.gate_proj.weight"] = p["w_gate"][i].T
        out[pre + "mlp.up_proj.weight"] = p["w_up"][i].T
        out[pre + "mlp.down_proj.weight"] = p["w_down"][i].T
    if not m.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]).T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf_tensors(tensors: dict[str, np.ndarray], m: ModelConfig, dtype) -> dict[str, Any]:
    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise UserError(f"--hf: the checkpoint has no tensor '{name}'")
        return np.asarray(tensors[name])

    d, h, kv, hd = m.hidden, m.heads, m.kv_heads, m.head_dim

    def stack(fn):
        return np.stack([fn(f"model.layers.{i}.") for i in range(m.layers)]).astype(dtype)

    layers = {
        "attn_norm": stack(lambda p: get(p + "input_layernorm.weight")),
        "mlp_norm": stack(lambda p: get(p + "post_attention_layernorm.weight")),
        "wq": stack(lambda p: get(p + "self_attn.q_proj.weight").T.reshape(d, h, hd)),
        "wk": stack(lambda p: get(p + "self_attn.k_proj.weight").T.reshape(d, kv, hd)),
        "wv": stack(lambda p: get(p + "self_attn.v_proj.weight").T.reshape(d, kv, hd)),
        "wo": stack(lambda p: get(p + "self_attn.o_proj.weight").T.reshape(h, hd, d)),
        "w_gate": stack(lambda p: get(p + "mlp.gate_proj.weight").T),
        "w_up": stack(lambda p: get(p + "mlp.up_proj.weight").T),
        "w_down": stack(lambda p: get(p + "mlp.down_proj.weight").T),
    }
    if m.qk_norm:
        layers["q_norm"] = stack(lambda p: get(p + "self_attn.q_norm.weight"))
        layers["k_norm"] = stack(lambda p: get(p + "self_attn.k_norm.weight"))
    params = {
        "embed": get("model.embed_tokens.weight").astype(dtype),
        "layers": layers,
        "final_norm": get("model.norm.weight").astype(dtype),
    }
    if not m.tie_embeddings:
        params["lm_head"] = get("lm_head.weight").T.astype(dtype)
    return params


# --------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def hf_config(m: ModelConfig, eot: int, dtype: str) -> dict[str, Any]:
    arch = architecture(m)
    cfg = {
        "architectures": [arch],
        "model_type": SUPPORTED[arch],
        "vocab_size": m.vocab,
        "hidden_size": m.hidden,
        "intermediate_size": m.ffn,
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps,
        # transformers >= 5 reads rope_parameters; 4.x reads the top-level rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_base},
        "rope_theta": m.rope_base,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if arch == "LlamaForCausalLM":
        cfg["mlp_bias"] = False
    else:
        cfg["use_sliding_window"] = False
    return cfg


def model_from_hf(hf: dict[str, Any], base: ModelConfig) -> dict[str, Any]:
    """The model section for a Hugging Face config.json (exit 2 naming what is unsupported)."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        named = ", ".join(archs) or hf.get("model_type", "unknown")
        raise UserError(f"--hf: architecture {named} is not supported (supported: {', '.join(SUPPORTED)})")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in hf:
            raise UserError(f"--hf: config.json lacks {key}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    unsupported = {
        "attention_bias": hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        "use_sliding_window": hf.get("use_sliding_window", False),
    }
    for key, value in unsupported.items():
        if value:
            raise UserError(f"--hf: {key}={value} is not supported (crosstrain's decoder has no such feature)")
    if rope_type not in (None, "default"):
        raise UserError(f"--hf: rope_type={rope_type} is not supported (only the default rotary embedding)")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"--hf: hidden_act={hf['hidden_act']} is not supported (SwiGLU uses silu)")
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or hf.get("rope_theta", 10000.0)
    heads = hf["num_attention_heads"]
    return {
        "layers": hf["num_hidden_layers"],
        "hidden": hf["hidden_size"],
        "heads": heads,
        "kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "ffn": hf["intermediate_size"],
        "vocab": hf["vocab_size"],
        "rope_base": float(theta),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "qk_norm": arch == "Qwen3ForCausalLM",
        "norm_eps": float(hf.get("rms_norm_eps", base.norm_eps)),
    }


def read_hf_dir(directory: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    if not (directory / "config.json").is_file():
        raise UserError(f"--hf: {directory} has no config.json")
    try:
        hf = json.loads((directory / "config.json").read_text())
    except ValueError as e:
        raise UserError(f"--hf: {directory / 'config.json'} is not valid JSON ({e})") from None
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"--hf: {directory} has no model.safetensors (nor an index of shards); .bin files are not read (pickle)")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
    return hf, tensors


def apply_hf_model(cfg: Config, directory: Path) -> Config:
    """cfg with its model shape taken from a Hugging Face directory, and its tokenizer."""
    hf = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else None
    if hf is None:
        raise UserError(f"init.from_hf: {directory} has no config.json")
    model = model_from_hf(hf, cfg.model)
    for key, value in model.items():
        if f"model.{key}" in cfg.explicit and getattr(cfg.model, key) != value:
            raise UserError(f"model.{key}: {getattr(cfg.model, key)} conflicts with the Hugging Face model's {value}")
    data = {}
    if not cfg.data.tokenizer:
        if not (directory / "tokenizer.json").is_file():
            raise UserError(f"init.from_hf: {directory} has no tokenizer.json (set data.tokenizer)")
        data["tokenizer"] = str(directory / "tokenizer.json")
    return cfg.override(model=model, data=data)


def load_hf_params(directory: Path, m: ModelConfig):
    """The parameters of a Hugging Face directory for model `m` (whose shape must be the
    directory's), in m's param_dtype."""
    hf, tensors = read_hf_dir(directory)
    expected = model_from_hf(hf, m)
    for key, value in expected.items():
        if getattr(m, key) != value:
            raise UserError(f"--hf: model.{key} is {getattr(m, key)} but the checkpoint has {value}")
    return from_hf_tensors(tensors, m, np.dtype(dtype_of(m.param_dtype)))


# --------------------------------------------------------------------------------------------
# Writing a model directory.


def _save_sharded(tensors: dict[str, np.ndarray], out: Path) -> None:
    from safetensors.numpy import save_file

    total = sum(t.nbytes for t in tensors.values())
    meta = {"format": "pt"}
    if total <= SHARD_BYTES:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if size + t.nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )


def write_hf_dir(params: dict[str, Any], m: ModelConfig, tokenizer_json: Optional[Path], out: Path, *, eot: int,
                 dtype: Optional[str] = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_tensors(params, m)
    dtype = dtype or m.param_dtype
    if dtype != "float32":
        import ml_dtypes

        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    _save_sharded(tensors, out)
    (out / "config.json").write_text(json.dumps(hf_config(m, eot, dtype), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "do_sample": False}, indent=2)
    )
    if tokenizer_json is not None:
        from tokenizers import Tokenizer

        shutil.copyfile(tokenizer_json, out / "tokenizer.json")
        eot_token = Tokenizer.from_file(str(tokenizer_json)).id_to_token(eot)
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": eot_token,
            "eos_token": eot_token,
            "pad_token": eot_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": m.seq_len,
        }, indent=2))
        (out / "special_tokens_map.json").write_text(
            json.dumps({"bos_token": eot_token, "eos_token": eot_token, "pad_token": eot_token}, indent=2)
        )
