"""Model FLOPs per token: the one formula behind the trainer's MFU and the planner.

Counting (PaLM, Chowdhery et al. 2022, appendix B):
- every weight matmul costs 2 FLOPs per weight per token forward, and twice that backward, so
  6 x N per trained token, where N counts the matmul weights: the attention and MLP projections
  (GQA-aware: the K and V projections have kv_heads x head_dim outputs; SwiGLU has three
  matrices) plus the output projection (hidden x vocab; counted once even when tied to the input
  embedding, whose lookup is free). Norm scales are not matmuls and are not counted.
- attention scores and the weighted sum cost 2 x 2 x T x H x Q FLOPs per token per layer forward
  (T = sequence length, H = query heads, Q = head dim), so 12 x L x H x Q x T trained.

`attention="causal"` counts the half of the T x T score matrix a causal mask keeps: crosstrain's
MFU (train, bench, plan) counts the work a causal model does, so a long-context stage is not
credited with the masked half (torchtitan's convention, and later MaxText reports'). `"full"`
counts the whole matrix, PaLM's convention; published runs are compared in the convention their
sources state (planner/cases.py).
Model FLOPs never include recomputation; `hardware_flops_per_token` adds it for a remat policy.
"""

from __future__ import annotations

from typing import Literal

from crosstrain.config import ModelConfig

AttnConvention = Literal["full", "causal"]
CROSSTRAIN_CONVENTION: AttnConvention = "causal"
# How it reads where MFU is printed.
CONVENTION_NOTE = "causal attention counted as half the score matrix"


def param_count(cfg: ModelConfig, *, glu: bool = True, part: Literal["all", "layer", "matmul"] = "all") -> int:
    """The decoder's parameters in closed form: the one count behind the model's summary, the
    FLOPs formula and the planner (the tests hold it to the parameter table, model/params.py).

    `part`: "all", every parameter (a tied embedding once, norm scales included); "layer", one
    layer's weights and norm scales; "matmul", the weights of matrix multiplies: every layer's
    projections and the output projection (hidden x vocab, once even when tied). `glu=False`
    counts a two-matrix MLP (GPT-style), for published models of that shape."""
    d, hd = cfg.hidden, cfg.head_dim
    layer_matmul = d * cfg.heads * hd * 2 + d * cfg.kv_heads * hd * 2 + (3 if glu else 2) * d * cfg.ffn
    layer_norms = 2 * d + (2 * hd if cfg.qk_norm else 0)
    if part == "layer":
        return layer_matmul + layer_norms
    if part == "matmul":
        return cfg.layers * layer_matmul + d * cfg.vocab
    embed = cfg.vocab * d * (1 if cfg.tie_embeddings else 2)
    return cfg.layers * (layer_matmul + layer_norms) + embed + d


def matmul_params(cfg: ModelConfig, *, glu: bool = True) -> int:
    """The matmul weights N of the 6N-per-token rule (`param_count(part="matmul")`)."""
    return param_count(cfg, glu=glu, part="matmul")


def attention_flops_per_token(cfg: ModelConfig, *, seq_len: int | None = None, attention: AttnConvention = CROSSTRAIN_CONVENTION) -> float:
    """Forward FLOPs of the score and value matmuls, per token."""
    t = seq_len or cfg.seq_len
    full = 4.0 * cfg.layers * cfg.heads * cfg.head_dim * t
    return full / 2 if attention == "causal" else full


def flops_per_token(
    cfg: ModelConfig,
    *,
    seq_len: int | None = None,
    attention: AttnConvention = CROSSTRAIN_CONVENTION,
    training: bool = True,
    glu: bool = True,
) -> float:
    """Model FLOPs per token: forward only, or forward + backward (3x) when training."""
    forward = 2.0 * matmul_params(cfg, glu=glu) + attention_flops_per_token(cfg, seq_len=seq_len, attention=attention)
    return 3.0 * forward if training else forward


def hardware_flops_per_token(
    cfg: ModelConfig,
    *,
    remat: str = "none",
    seq_len: int | None = None,
    attention: AttnConvention = CROSSTRAIN_CONVENTION,
    glu: bool = True,
) -> float:
    """Training FLOPs actually executed per token, recomputation included.

    `full` remat reruns each layer's forward (not the output projection) in the backward pass;
    `selective` reruns the attention score and value matmuls only.
    """
    base = flops_per_token(cfg, seq_len=seq_len, attention=attention, glu=glu)
    attn = attention_flops_per_token(cfg, seq_len=seq_len, attention=attention)
    if remat == "full":
        layer_forward = 2.0 * (matmul_params(cfg, glu=glu) - cfg.hidden * cfg.vocab) + attn
        return base + layer_forward
    if remat == "selective":
        return base + attn
    return base
