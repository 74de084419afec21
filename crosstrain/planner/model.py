"""The planner's physics: per-device memory and step time for a model, a layout and a chip.

Everything is per *device* (a TPU chip, a GPU, a Trainium NeuronCore): a layout's degrees
tp x pp x dp x fsdp x cp multiply to the device count.

Step time, for one pipeline stage (the last, which also holds the output projection):

    compute  = hardware FLOPs (recomputation included) / (peak x matmul efficiency x shape factor)
    memory   = elementwise bytes (norms, residuals, RoPE, SwiGLU, softmax, optimizer) / HBM bandwidth
    tp       = 4 all-reduces of a microbatch's activations per layer (6 with full recomputation),
               on the fast link while tp fits in its domain; partly hidden behind compute
    fsdp, dp = parameter all-gathers (forward and backward, every microbatch), gradient
               reduce-scatter / all-reduce (once per step), on the slowest link the group spans;
               hidden behind compute up to the family's overlap fraction
    bubble   = pipeline fill and drain: (pp - 1) / (microbatches x virtual stages)
    cp       = context parallelism's key/value all-gather per layer (overlappable)

    step = (compute + memory + exposed tp + exposed cp) x (1 + bubble) + exposed fsdp/dp

`implementation="crosstrain"` models crosstrain's own step (used to compare with XLA's analysis of
it); the default models an efficient implementation (flash attention, sequence parallelism).

Memory: parameters (fp32), gradients (fp32) and Adam moments (2 x fp32) sharded over
tp x pp x fsdp (moments also over dp with ZeRO-1); saved activations by remat policy for the
microbatches a 1F1B pipeline keeps in flight; the fp32 logits and their gradient; the gathered
layer of FSDP; a per-family runtime reserve.

The constants are per chip family (a chip's own measured matmul ceiling where the catalog has one),
never per case, and each is documented in FAMILIES.

Over 400 lines on purpose: one model, whose memory and time terms share the layout arithmetic
and the family constants; the constants' sources are written beside them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from crosstrain.config import ModelConfig
from crosstrain.flops import (CROSSTRAIN_CONVENTION, AttnConvention, attention_flops_per_token, flops_per_token,
                              matmul_params, param_count)
from crosstrain.hardware import GIB, Chip
from crosstrain.platform import GPU_MEMORY_FRACTION

BF16 = 2
FP32 = 4


@dataclass(frozen=True)
class Family:
    """Efficiency constants shared by every chip of a family: measured or published, except the two
    marked FITTED (fitted to the family's published runs, never to a single run)."""

    name: str
    # Fraction of dense peak that large bf16 matmuls reach, where the chip has no measured value
    # of its own (Chip.matmul_eff: the GPUs' maximum achievable matmul FLOPS). TPU MXUs run large
    # matmuls at ~90% of peak (MaxText reports up to 71% MFU end to end on v5p); Neuron's
    # compiler reports ~85% on Trainium matmuls.
    matmul_eff: float
    # Matmul width (per device) at which efficiency halves: small tensor-parallel shards and short
    # microbatches leave the systolic arrays / tensor cores underfed.
    width_half: int
    # Fraction of FSDP / data-parallel communication that overlaps compute (XLA async collectives
    # on TPU; NCCL streams on GPU).
    overlap: float
    # Fraction of tensor-parallel all-reduce time hidden behind compute (XLA's collective matmul
    # on TPU; none in Megatron's 2021 schedule or in Neuron's).
    tp_overlap: float
    # Fraction of nominal link bandwidth that collectives achieve.
    link_eff: float
    # Attention kernels skip the masked half of causal attention (Splash / FlashAttention) or not.
    causal_skip: bool
    # Fraction of peak the attention kernels (scores and weighted sum, forward and backward)
    # reach: below GEMMs because of softmax and masking work between the matmuls. A chip whose
    # flash kernels were benchmarked uses those (Chip.attention: A100, H100, H200); this is the
    # value elsewhere, and for the score matmuls of attention without a flash kernel.
    attn_eff: float
    # FITTED (with fitted_scale, planner/calibrate.py): passes over activations that the
    # software's elementwise work makes, relative to one fully fused pass. Nothing here measures
    # it; it was a guess (XLA 1.0, PyTorch frameworks 2.5) until it was fitted.
    elementwise_passes: float
    # Memory the runtime keeps for itself per device (GiB), and the fraction of HBM usable.
    reserved_gib: float
    usable: float
    # Collectives over a group that spans several fast domains run hierarchically: only each
    # device's share crosses the slow link. TPU: XLA decomposes multi-slice collectives into ICI
    # and DCN phases. GPU: NCCL runs one ring (channel) per NIC, each carrying its share of the
    # buffer, so a node's cross-node traffic is split over all its NICs and each ring's other
    # hops ride NVLink. False: a flat ring whose every hop may be the slow link.
    hierarchical: bool = False
    # FITTED: the fraction of the modelled compute rate (matmul and attention efficiency above)
    # that published training software reaches, fitted with elementwise_passes to the published
    # runs of the family (crosstrain/planner/calibrate.py) and judged by leave-one-group-out
    # cross-validation (`plan --cases`, docs/planner.md). 1.0: not fitted.
    fitted_scale: float = 1.0


FAMILIES: dict[str, Family] = {
    "tpu": Family("tpu", matmul_eff=0.90, width_half=96, overlap=0.9, tp_overlap=0.25, link_eff=0.8,
                  causal_skip=True, attn_eff=0.6, elementwise_passes=2.0, reserved_gib=0.5, usable=0.97,
                  hierarchical=True, fitted_scale=0.9),
    "gpu": Family("gpu", matmul_eff=0.75, width_half=160, overlap=0.8, tp_overlap=0.0, link_eff=0.75,
                  causal_skip=True, attn_eff=0.4, elementwise_passes=1.5, reserved_gib=2.0, usable=GPU_MEMORY_FRACTION,
                  hierarchical=True, fitted_scale=0.80),
    "trainium": Family("trainium", matmul_eff=0.85, width_half=128, overlap=0.7, tp_overlap=0.0, link_eff=0.7,
                       causal_skip=False, attn_eff=0.5, elementwise_passes=1.0, reserved_gib=1.0, usable=0.95,
                       fitted_scale=0.70),
    "cpu": Family("cpu", matmul_eff=0.85, width_half=64, overlap=0.0, tp_overlap=0.0, link_eff=1.0,
                  causal_skip=False, attn_eff=0.5, elementwise_passes=1.0, reserved_gib=1.0, usable=0.8),
}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    fsdp: int = 1
    cp: int = 1
    microbatch: int = 1  # sequences per data-parallel rank per microbatch
    virtual_stages: int = 1  # interleaved pipeline schedule
    sequence_parallel: bool = True  # shard norm/residual activations over tp (Megatron SP)
    # A distributed optimizer (Megatron-core's, Apex's distributed fused Adam, NxD's ZeRO-1):
    # bf16 weights on every rank, their fp32 master copy and both moments sharded over the
    # data-parallel ranks (dp x cp).
    zero1: bool = False
    remat: str = "full"  # none | selective | dots | minimal | dots_except_mlpwi | op | attention | mlp | offload | full
    # FSDP: weights all-gathered for every microbatch's forward and backward (ZeRO-3, the
    # default), or once per step and kept gathered until the backward is done (ZeRO-2; Llama 3's
    # "FSDP that does not reshard after forward").
    keep_gathered: bool = False
    # Bytes per weight element in FSDP's all-gathers: 2 (bf16), 1 where the weights are gathered
    # in fp8 (torchtitan's float8 all-gather).
    gather_bytes: int = BF16
    # Bytes per gradient element in FSDP's reduce-scatter and DP's all-reduce: 4 (fp32), 2 where
    # the software reduces in bf16 (Composer's "PURE" FSDP mixed precision).
    reduce_bytes: int = FP32
    # Bytes per element of the stored weights and of each of Adam's two moments: 4 (an fp32
    # master copy and fp32 moments, mixed precision's usual), 2 where the source keeps them in
    # bf16 (MaxText's weight_dtype=bfloat16, whose moments follow the weights; Neuron's
    # XLA_USE_BF16 with a plain optimizer and no master copy).
    state_bytes: int = FP32
    # The software overlaps tensor-parallel collectives with the matmuls (Megatron-core's
    # --tp-comm-overlap, XLA's collective matmul): a source-stated setting, not a fitted one.
    tp_comm_overlap: bool = False
    # The activations the remat policy saves go to host memory (MaxText's offloading policies:
    # `decoder_layer_input` offloaded under an otherwise full remat), none stay on the device.
    host_offload: bool = False
    # The output layer and its loss computed in this many vocabulary tiles (MaxText's
    # num_vocab_tiling): only one tile's logits are live at a time.
    vocab_tiles: int = 1
    # Bytes per logit element the loss keeps at its peak, where the source's loss differs from
    # the family's (0: 6 on GPUs and Trainium, Megatron's fp32 copy and its bf16 gradient; 2 on
    # TPU). flash-attn's fused cross-entropy (llm-foundry's default) keeps the bf16 logits and
    # writes a bf16 gradient: 4.
    logit_bytes: int = 0
    # The data-parallel gradient all-reduce overlaps the backward pass. XLA on TPU reduces the
    # scanned layers' gradients after the backward loop unless its data-parallel all-reduce
    # optimization is on (AXLearn's launcher sets it only for multi-slice runs).
    dp_overlap: bool = True
    # The fraction of the transformer blocks the remat policy applies to; the others keep all
    # their activations (none recomputed). fms-fsdp's block-level "selective" checkpointing wraps
    # every n-th block (`apply_fsdp_checkpointing(model, every_xth_item=n)`): 1/n.
    remat_blocks: float = 1.0

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp * self.fsdp * self.cp

    @property
    def ranks(self) -> int:
        return self.dp * self.fsdp

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("tp", "pp", "dp", "fsdp", "cp") if getattr(self, k) > 1]
        return ",".join(parts) or "single device"


@dataclass
class Estimate:
    layout: Layout
    devices: int
    chips: float
    step_time_s: float
    time: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)  # bytes per device
    memory_per_device_gib: float = 0.0
    capacity_gib: float = 0.0
    fits: bool = True
    model_flops_per_step: float = 0.0
    hardware_flops_per_step: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layout"] = asdict(self.layout)
        return d


def _shape_factor(width: float, half: int) -> float:
    return width / (width + half)


def _dense_shape_factor(m: ModelConfig, tp: int, half: float, glu: bool = True) -> float:
    """Efficiency of a layer's weight matmuls from their shapes under tensor parallelism: each
    matmul is limited by its narrower weight dimension per device (the output width of the column-
    parallel q/k/v and MLP up projections, the contraction of the row-parallel output and down
    projections), and the layer's time is the sum of its matmuls' times (a FLOP-weighted harmonic
    mean)."""
    hd = m.head_dim
    shapes = [  # (FLOPs weight = in x out, narrower dimension per device)
        (m.hidden * (m.heads + 2 * m.kv_heads) * hd / tp, min(m.hidden, (m.heads + 2 * m.kv_heads) * hd / tp)),
        (m.heads * hd / tp * m.hidden, min(m.heads * hd / tp, m.hidden)),
        ((2 if glu else 1) * m.hidden * m.ffn / tp, min(m.hidden, m.ffn / tp)),
        (m.ffn / tp * m.hidden, min(m.ffn / tp, m.hidden)),
    ]
    total = sum(w for w, _ in shapes)
    return total / sum(w / _shape_factor(n, half) for w, n in shapes)


def layer_params(m: ModelConfig, glu: bool = True) -> float:
    return param_count(m, glu=glu, part="layer")


def recomputed_dense_fraction(m: ModelConfig, remat: str, glu: bool = True, *, xla: bool = False) -> float:
    """Fraction of the layers' weight-matmul forward recomputed in the backward pass.

    `xla`: the software is a JAX program (crosstrain's step, MaxText, AXLearn). jax.checkpoint
    reruns only what the backward pass reads (its rematerialized forward is dead-code eliminated),
    and nothing in the backward reads the MLP's down projection's output (its gradient needs the
    input and the weight; the residual add passes the gradient through), so that matmul is never
    rerun. PyTorch's checkpointing reruns the whole block."""
    qkv = m.hidden * (m.heads + 2 * m.kv_heads) * m.head_dim
    out = m.heads * m.head_dim * m.hidden
    mlp = (3 if glu else 2) * m.hidden * m.ffn
    down = m.hidden * m.ffn if xla else 0.0
    if remat in ("full", "attention"):
        return (qkv + out + mlp - down) / (qkv + out + mlp)
    if remat == "mlp":  # the MLP is recomputed
        return (mlp - down) / (qkv + out + mlp)
    if remat == "op":
        # torchtitan's op-level selective checkpointing saves every second weight matmul's output
        # (q, v, the MLP's gate and its down projection) and recomputes the others (k, the
        # attention projection, the MLP's up; without a gate, k and the attention projection).
        return (m.hidden * m.kv_heads * m.head_dim + out + (m.hidden * m.ffn if glu else 0)) / (qkv + out + mlp)
    if remat == "offload":
        # q, k, v come back from host memory; the attention output projection and the MLP are
        # recomputed.
        return (out + mlp - down) / (qkv + out + mlp)
    if remat == "dots_except_mlpwi":  # the MLP's gate and up projections are rerun
        return (mlp - m.hidden * m.ffn) / (qkv + out + mlp)
    return 0.0


def recomputed_attention_fraction(remat: str, *, flash: bool, implementation: str = "efficient") -> float:
    """Fraction of the attention forward recomputed in the backward pass. Attention is recomputed
    under full remat and offload, and under selective (Megatron's definition: recompute the
    attention core) except in crosstrain's step with Splash, whose selective policy keeps the
    kernel's residuals; "attention", "dots" and torchtitan's "op" keep its output."""
    if remat in ("full", "offload", "minimal", "dots_except_mlpwi") or (remat == "selective" and not (flash and implementation == "crosstrain")):
        return 1.0
    if remat == "mlp" and not flash:
        return 0.5  # the attention output is kept; the scores (QK^T, softmax) are not
    return 0.0


def quantize_cast_bytes_per_token_layer(m: ModelConfig, lay: Layout, glu: bool = True) -> float:
    """HBM bytes per token and layer that 8-bit matmuls add beyond their GEMMs (FP8 training with
    Transformer Engine or torchao's float8; int8 with MaxText's AQT, which quantizes the same
    operands the same way): every GEMM operand that is not a weight is cast to fp8 before its GEMM, in
    the forward (the inputs of the QKV, attention-output, MLP-in and MLP-out projections) and in
    the backward (the gradients arriving at each of them), and each cast also writes the
    transposed copy the other GEMM of the pair reads. Per element: current (per-tensor) scaling's
    amax pass reads the bf16 tensor (2 bytes), the cast reads it again and writes fp8 twice
    (2 + 1 + 1)."""
    h_div = lay.tp if (lay.sequence_parallel and lay.tp > 1) else 1
    forward = 2 * m.hidden / h_div + m.heads * m.head_dim / lay.tp + m.ffn / lay.tp
    backward = ((m.heads + 2 * m.kv_heads) * m.head_dim / lay.tp + 2 * m.hidden / h_div
                + (2 if glu else 1) * m.ffn / lay.tp)
    return (forward + backward) * (BF16 + BF16 + 1 + 1)


def elementwise_bytes_per_token_layer(m: ModelConfig, lay: Layout, *, flash: bool, glu: bool = True,
                                      passes: float = 1.0, implementation: str = "efficient") -> float:
    """HBM bytes per token and layer that the elementwise work moves (per device): norms, residual
    adds, QK-norm and RoPE, the SwiGLU product, forward and backward (3 passes' worth of bf16
    reads and writes per element), once more for what is recomputed, times `passes` (1.0: one
    fully fused pass); plus, without a flash kernel, the attention scores."""
    h_div = lay.tp if (lay.sequence_parallel and lay.tp > 1) else 1
    base = BF16 * 3 * (10 * m.hidden / h_div + 10 * (m.heads + 2 * m.kv_heads) * m.head_dim / lay.tp
                       + (4 if glu else 2) * m.ffn / lay.tp)
    # What a policy reruns of the elementwise chain: JAX skips the down projection's matmul, not
    # the SwiGLU product that is its input, so the chain is counted as PyTorch reruns it.
    base *= (1.0 + recomputed_dense_fraction(m, lay.remat, glu) * lay.remat_blocks / 3.0) * passes
    if flash:
        return base
    # Attention without a flash kernel writes the scores to memory and reads them back: per score
    # element, the forward writes S, a fused softmax reads S and writes P, the weighted sum reads P
    # (8 bytes in bf16); the backward writes dP, reads P and dP and writes dS, and three matmuls
    # read dS twice and P once (14 bytes). The forward is repeated when attention is recomputed.
    # One fused softmax kernel per pass (Megatron's scaled_masked_softmax, an XLA fusion), so no
    # extra passes.
    recompute_attn = recomputed_attention_fraction(lay.remat, flash=flash, implementation=implementation) * lay.remat_blocks
    return base + m.heads * (m.seq_len / lay.cp) * (22 + 8 * recompute_attn) / lay.tp


def total_params(m: ModelConfig, glu: bool = True) -> float:
    return param_count(m, glu=glu)


# crosstrain's own step (reference attention, fp32 norms/RoPE/softmax, no sequence parallelism)
# keeps more than the bf16 minimum when nothing is recomputed. Least-squares fit to XLA's TPU memory
# analysis of the compiled step (v5p, fsdp=4, 4 layers, widths 384/768, sequences 256/512;
# docs/planner.md): 5.0 bytes per activation element (2.5 bf16 copies) and 6.3 bytes per
# attention-score element, per token and layer.
CROSSTRAIN_NONE_BYTES_PER_ELEMENT = 5.0
CROSSTRAIN_SCORE_BYTES = 6.3
# The HBM traffic of crosstrain's compiled TPU step outside its matmuls: XLA's elementwise and
# reduction fusions and layout copies, summed from the optimized HLO of unrolled 1- and 2-layer
# programs (`plan --aot` reports it as xla_elementwise_passes), per layer, relative to the one
# fully fused pass of elementwise_bytes_per_token_layer. The median over benchmarks/aot_sweep.py's
# nine programs (v4/v5e/v5p/v6e, 8-1024 chips, four policies): 1.07, six of them within
# 1.00-1.15; the 8-chip plan 1.30, tp=4 1.25, the two-slice v4 program 2.01 (docs/planner.md).
CROSSTRAIN_TPU_ELEMENTWISE_PASSES = 1.07
# The same measured on crosstrain's GPU programs (CUDA's deviceless compile) for the AOT sweep's
# five searched H100/H200/B200 plans: 0.74 (64 H100), 0.90 (8 H200), 0.73 (1024 H100), 1.27 (256
# B200), 1.81 (256 H100, the one with tensor parallelism); their median (0.84-0.90 with the
# layouts the search picked before round two's fourth pass). crosstrain's own GPU step is priced
# with it, not with the fitted passes of published GPU software (PyTorch's).
CROSSTRAIN_GPU_ELEMENTWISE_PASSES = 0.90


@dataclass(frozen=True)
class ProgramMemory:
    """What XLA keeps for crosstrain's step with the platform's flash kernel (Splash on TPU, cuDNN
    on GPU) beyond the tensors a remat policy names, which are counted exactly
    (activation_bytes_per_token_layer), and beyond parameters, optimizer state and FSDP's gathered
    weights. Least-squares fits to XLA's memory analysis of the compiled step on 8 chips
    (AFM-on-device widths 2048/3072, 13/26 layers, vocab 24,576/49,152, microbatches of 1-4
    sequences of 4096, the four policies; fsdp, tp x fsdp, dp x fsdp, pure dp):
    `python benchmarks/memory_fit.py --chip h100-sxm|tpu-v5p` (docs/planner.md has the errors)."""

    none_bytes_per_element: float  # everything kept (remat none), per activation element
    working_bytes_per_element: float  # one layer's activations while it is recomputed
    logit_bytes: float  # per logit element at the peak (fp32 logits, their exp, the bf16 residual)
    gradient_buffers: float  # fp32 gradient-sized buffers at the peak (the gradients, their update)
    accumulation_buffers: float  # more of them when microbatches are accumulated (the running sum)


CROSSTRAIN_PROGRAM = {
    # 52 programs on 8 H100: median error 2.7%, worst 10.7%.
    "gpu": ProgramMemory(none_bytes_per_element=2.66, working_bytes_per_element=0.75, logit_bytes=4.6,
                         gradient_buffers=1.93, accumulation_buffers=1.03),
    # 20 programs on 8 v5p (libtpu's compiles are slower: five shapes a policy), with the logits
    # held at their bf16 residual (2 bytes: free, the fit put them at 0.25 against the other
    # terms) and no working set (the free fit's was within noise of 0): median error 5.4%, worst
    # 21% (remat none at one sequence per microbatch).
    "tpu": ProgramMemory(none_bytes_per_element=3.07, working_bytes_per_element=0.0, logit_bytes=2.0,
                         gradient_buffers=1.91, accumulation_buffers=2.29),
}


def activation_elements_per_token_layer(m: ModelConfig, lay: Layout, glu: bool = True) -> float:
    """Elements of a layer's activations per token and device, counted as for remat none: both
    norms' inputs and outputs; q, k, v before and after QK-norm and RoPE, the attention output;
    gate, up, silu(gate) and the product."""
    h_div = lay.tp if (lay.sequence_parallel and lay.tp > 1) else 1
    return (4 * m.hidden / h_div + (4 * m.heads + 4 * m.kv_heads) * m.head_dim / lay.tp
            + (4 if glu else 2) * m.ffn / lay.tp)


def activation_bytes_per_token_layer(m: ModelConfig, lay: Layout, *, flash: bool, glu: bool = True,
                                     implementation: str = "efficient", kernel: str = "splash") -> dict[str, float]:
    """Bytes saved for the backward pass, per token per layer (bf16 activations), by policy.

    Counted for this decoder: norm inputs/outputs and residuals (h-sized), q/k/v before and after
    QK-norm and RoPE and the attention output (head-sized), gate/up/silu/product (ffn-sized), and
    without a flash kernel the fp32 scores and bf16 probabilities (heads x sequence)."""
    tp = lay.tp
    h_div = tp if (lay.sequence_parallel and tp > 1) else 1
    hd = m.head_dim
    scores = 0.0 if flash else m.heads * (m.seq_len / lay.cp) * (FP32 + BF16) / tp / BF16
    # Everything: both norms' inputs and outputs; q, k, v before and after QK-norm and RoPE, the
    # attention output; gate, up, silu(gate) and the product (or up and gelu).
    full_layer = BF16 * (4 * m.hidden / h_div + (4 * m.heads + 4 * m.kv_heads) * hd / tp
                         + (4 if glu else 2) * m.ffn / tp + scores)
    # Selective: what the backward pass cannot avoid: each matmul's input (two norm outputs and
    # their inputs, the attention output, the MLP product) and q, k, v, gate, up; the attention
    # scores and the elementwise chain are recomputed.
    selective = BF16 * (4 * m.hidden / h_div + (2 * m.heads + 2 * m.kv_heads) * hd / tp + (3 if glu else 2) * m.ffn / tp)
    layer_input = BF16 * m.hidden / h_div
    # The attention output, and with a flash kernel its fp32 log-sum-exp per head.
    attn_saved = BF16 * m.heads * hd / tp + (FP32 * m.heads / tp if flash else 0.0)
    # jax's dots_saveable (AXLearn) and checkpoint_dots_with_no_batch_dims (MaxText's "minimal"):
    # every weight matmul's output (q, k, v, the attention projection, the MLP's gate and up, its
    # down projection) beside the layer input; norms, RoPE and activations are recomputed.
    dots = (2 * layer_input + BF16 * (m.heads + 2 * m.kv_heads) * hd / tp + BF16 * m.hidden / h_div
            + BF16 * (2 if glu else 1) * m.ffn / tp)
    if flash and implementation != "crosstrain":
        # Published software with a flash kernel and fused elementwise ops (Transformer Engine's
        # fused RoPE and SwiGLU, XLA's fusions) keeps, with no recomputation, what the backward
        # pass cannot avoid: the selective set. RoPE's backward is linear and needs no input,
        # SwiGLU's recomputes silu from the gate, and the softmax, the only thing Megatron's
        # selective recomputation drops, a flash kernel never stores.
        full_layer = selective
    working = full_layer
    if implementation == "crosstrain":
        elements = activation_elements_per_token_layer(m, lay, glu)
        if flash and kernel == "cudnn":
            # crosstrain's step on GPU (cuDNN's flash attention): the policies' named tensors,
            # counted exactly. cuDNN's residuals are q, k, v after RoPE, its output (the
            # attention output the policies name) and the fp32 softmax statistics per head;
            # crosstrain names them as Splash's (model/attention.py).
            qkv = BF16 * (m.heads + 2 * m.kv_heads) * hd / tp
            attn_out = BF16 * m.heads * hd / tp
            residuals = qkv + FP32 * m.heads / tp  # beside the attention output
            attn_saved = attn_out + residuals
            # selective = the layer input (the scan carry), q/k/v before QK-norm, the attention
            # output and its projection, the MLP's gate and up, and cuDNN's residuals.
            selective = (layer_input + qkv + attn_saved + BF16 * m.hidden / h_div
                         + BF16 * (2 if glu else 1) * m.ffn / tp)
            full_layer = CROSSTRAIN_PROGRAM["gpu"].none_bytes_per_element * elements
            working = CROSSTRAIN_PROGRAM["gpu"].working_bytes_per_element * elements
        elif flash:
            # crosstrain's step with Splash, counted from what the compiled TPU program keeps
            # (XLA's memory analysis, docs/planner.md): Splash's residuals are q, k, v after RoPE,
            # the scaled q, its output (bf16) and the log-sum-exp (fp32); the fused ops' custom
            # backward rules keep their bf16 inputs (the two norm outputs).
            attn_saved = BF16 * (3 * m.heads + 2 * m.kv_heads) * hd / tp + FP32 * m.heads / tp
            # selective = the layer input, both norm outputs, the attention projection, q/k/v
            # before QK-norm, Splash's residuals, the MLP gate and up.
            selective = (4 * layer_input + BF16 * (m.heads + 2 * m.kv_heads) * hd / tp + attn_saved
                         + BF16 * (2 if glu else 1) * m.ffn / tp)
            full_layer = CROSSTRAIN_PROGRAM["tpu"].none_bytes_per_element * elements
            working = CROSSTRAIN_PROGRAM["tpu"].working_bytes_per_element * elements
        else:
            # crosstrain's selective policy saves by name (model/transformer.py SELECTIVE_SAVED):
            # q, k, v, the attention output and its projection, the MLP gate and up; the layer
            # input is the scan carry.
            selective = BF16 * (2 * m.hidden / h_div + (2 * m.heads + 2 * m.kv_heads) * hd / tp + 2 * m.ffn / tp)
            full_layer = (CROSSTRAIN_NONE_BYTES_PER_ELEMENT * elements
                          + CROSSTRAIN_SCORE_BYTES * m.heads * (m.seq_len / lay.cp) / tp)
            working = full_layer
    return {
        "none": full_layer,
        "selective": selective,
        # Every weight matmul's output: XLA's analysis of crosstrain's step (v5p, AFM-on-device)
        # keeps what selective keeps, within 1% (the fused ops' backward saves their bf16 outputs).
        "dots": selective if implementation == "crosstrain" else dots,
        # MaxText's "minimal": the same tensors; the attention kernel (no weight matmul) is rerun.
        "minimal": dots,
        # MaxText's save_dot_except_mlpwi: as "minimal" without the MLP's gate and up outputs
        # (mlpwi), which the backward pass recomputes.
        "dots_except_mlpwi": dots - BF16 * (2 if glu else 1) * m.ffn / tp,
        "attention": layer_input + attn_saved,
        # torchtitan's op-level selective checkpointing (the block's input; every second weight
        # matmul's output: q, v, the MLP's gate and down projection; the flash kernel's output
        # and log-sum-exp).
        "op": (layer_input + BF16 * (m.heads + m.kv_heads) * hd / tp + attn_saved
               + BF16 * m.ffn / tp + (BF16 * m.hidden / h_div if glu else 0.0)),
        # AXLearn's default (save_only_these_names of the attention's q, k, v, context and
        # output projection): the MLP and the norms are recomputed.
        "mlp": layer_input + BF16 * ((2 * m.heads + 2 * m.kv_heads) * hd / tp + m.hidden / h_div),
        # The layer input and q, k, v go to host memory (MaxText's "custom" policy with offloads,
        # AXLearn's offload_attention_proj_policy): nothing stays on the device.
        "offload": 0.0,
        "full": layer_input,  # only each layer's input
        "working": working,  # one layer's activations while it is recomputed / differentiated
    }


def estimate(
    m: ModelConfig,
    chip: Chip,
    lay: Layout,
    *,
    global_batch: int,
    family: Optional[Family] = None,
    flash: Optional[bool] = None,
    compute_dtype: str = "bfloat16",
    glu: bool = True,
    power_cap_w: Optional[float] = None,
    implementation: str = "efficient",
    slice_chips: Optional[int] = None,
    framework: Optional[str] = None,
    sliding_window: Optional[tuple[int, int]] = None,
    attention_kernel: Optional[str] = None,
) -> Estimate:
    fam = family or FAMILIES[chip.family]
    flash = fam.causal_skip if flash is None else flash
    # A flash kernel's rate: its benchmark on this chip where one is catalogued (`attention_kernel`:
    # "cudnn" or "flash2"; None: the chip's best), else the family's value. Without a flash kernel
    # the scores' matmuls run at the family's value and their softmax goes through memory (below).
    attn_eff = (chip.attention_eff(attention_kernel) if flash else None) or fam.attn_eff
    D = lay.devices
    notes: list[str] = []
    seq = m.seq_len
    tokens_step = global_batch * seq

    # ---- work ------------------------------------------------------------------------------
    executed_attn: AttnConvention = "causal" if flash else "full"
    model_flops = flops_per_token(m, attention=CROSSTRAIN_CONVENTION, glu=glu) * tokens_step
    dense_fwd = 2.0 * (matmul_params(m, glu=glu) - m.hidden * m.vocab)  # per token, all layers
    attn_fwd = attention_flops_per_token(m, attention=executed_attn)
    if sliding_window and flash:
        # (window, local layers): those layers attend to the last `window` tokens only, and a
        # flash kernel skips the blocks outside the band (Splash's local mask, FlashAttention's
        # window): a query sees on average w - w^2 / 2s keys where causal attention sees s / 2.
        window, local = sliding_window
        w = min(window, seq)
        band = (w - w * w / (2.0 * seq)) / (seq / 2.0)
        attn_fwd *= (m.layers - local + local * band) / m.layers
    # JAX programs: crosstrain's own step everywhere; published software on TPU (MaxText,
    # AXLearn, PaLM's) and wherever its source says so (`framework`: AXLearn on Trainium, Pax on
    # GPU). Other published GPU and Trainium software is PyTorch.
    xla = implementation == "crosstrain" or (framework == "jax" if framework else chip.family == "tpu")
    recompute_dense = recomputed_dense_fraction(m, lay.remat, glu, xla=xla) * lay.remat_blocks
    # forward, backward (2x), recomputed forward
    dense_per_token = (3.0 + recompute_dense) * dense_fwd
    recompute_attn = recomputed_attention_fraction(lay.remat, flash=flash, implementation=implementation) * lay.remat_blocks
    attn_per_token = (3.0 + recompute_attn) * attn_fwd
    head_per_token = 3.0 * 2.0 * m.hidden * m.vocab
    hw_flops = (dense_per_token + attn_per_token + head_per_token) * tokens_step

    peak = chip.peak_flops(compute_dtype) or chip.peak_flops("bfloat16")
    # FP8 training (Transformer Engine and the like) runs the weight GEMMs in fp8; attention and
    # everything else stay in bf16.
    attn_peak = chip.peak_flops("bfloat16") if compute_dtype in ("fp8", "int8") else peak
    if power_cap_w and chip.power_w and power_cap_w < chip.power_w:
        # Dynamic power ~ f V^2 with V ~ f: a power cap lowers the sustained clock by (cap/TDP)^(1/3).
        clock = (power_cap_w / chip.power_w) ** (1.0 / 3.0)
        peak *= clock
        attn_peak *= clock
        notes.append(f"power cap {power_cap_w:.0f} W of {chip.power_w:.0f} W: sustained clock x{clock:.2f}")
    peak_device = peak / chip.devices_per_chip * fam.fitted_scale
    attn_peak_device = attn_peak / chip.devices_per_chip * fam.fitted_scale
    ranks_batch = global_batch / lay.ranks  # sequences per data-parallel rank per step
    micro = min(lay.microbatch, ranks_batch)
    n_micro = max(1, int(round(ranks_batch / micro)))
    micro_tokens = micro * seq / lay.cp  # tokens per device per microbatch
    # The width at which matmuls reach half their efficiency grows with the systolic array: TPU
    # v6e has 256x256 MXUs where v4/v5e/v5p have 128x128 (cloud.google.com/tpu/docs/v6e).
    half = fam.width_half * (chip.mxu / 128 if chip.mxu else 1)
    eff = (chip.matmul_eff or fam.matmul_eff) * _dense_shape_factor(m, lay.tp, half, glu) * _shape_factor(micro_tokens, half)
    # The busiest pipeline stage: its share of the layers, plus the output projection (last stage).
    per_device = tokens_step / (D / lay.pp)
    t_compute = per_device * (
        (dense_per_token / lay.pp + head_per_token) / (peak_device * eff)
        + attn_per_token / lay.pp / (attn_peak_device * attn_eff)
    )

    # ---- memory-bound work ------------------------------------------------------------------
    # crosstrain's own TPU and GPU programs: the passes XLA's compiled HLO makes (measured, below);
    # everything else: the family's fitted passes of published software.
    measured = {"tpu": CROSSTRAIN_TPU_ELEMENTWISE_PASSES, "gpu": CROSSTRAIN_GPU_ELEMENTWISE_PASSES}
    passes = (measured[chip.family] if implementation == "crosstrain" and chip.family in measured
              else fam.elementwise_passes)
    elem_per_token_layer = elementwise_bytes_per_token_layer(m, lay, flash=flash, glu=glu, passes=passes,
                                                             implementation=implementation)
    if compute_dtype in ("fp8", "int8"):
        elem_per_token_layer += quantize_cast_bytes_per_token_layer(m, lay, glu)
    tokens_device = tokens_step / (lay.ranks * lay.cp)
    layers_stage = m.layers / lay.pp
    params_total = total_params(m, glu)
    shard = lay.tp * lay.pp * lay.fsdp
    # read params, grads, two moments; write three; a bf16 copy (all in fp32 state: 32 bytes)
    opt_bytes = params_total / shard * (7 * lay.state_bytes + 4)
    hbm = chip.hbm_gbps * 1e9 / chip.devices_per_chip
    t_memory = (elem_per_token_layer * layers_stage * tokens_device + opt_bytes) / hbm

    # ---- communication ----------------------------------------------------------------------
    domain_devices = min(chip.link_domain, slice_chips or chip.link_domain) * chip.devices_per_chip
    fast = chip.link_gbps * 1e9 / chip.devices_per_chip * fam.link_eff
    slow = min(fast, (chip.scaleout_gbps or chip.link_gbps) * 1e9 / chip.devices_per_chip * fam.link_eff)

    def bandwidth(group: int, inner: int) -> float:
        """Per-device bandwidth (bytes/s, one direction) of a group of `group` devices whose
        members are `inner` devices apart."""
        return fast if group * inner <= domain_devices else slow

    def gather_time(volume: float, group: int, inner: int) -> float:
        """Seconds for one all-gather (or reduce-scatter) of a `volume`-byte buffer over `group`
        devices `inner` apart: each device receives (group - 1) / group of it. Hierarchically
        (Family.hierarchical), only the shards of the devices in other domains cross the slow
        link; the rest moves inside the domain."""
        if group <= 1:
            return 0.0
        if group * inner <= domain_devices or not fam.hierarchical:
            return volume * (group - 1) / group / bandwidth(group, inner)
        inside = max(1, min(group, domain_devices // max(1, inner)))
        outside = group / inside
        return volume * (outside - 1) / group / slow + volume * (inside - 1) / inside / fast

    tp_bw = bandwidth(lay.tp, 1)
    tp_passes = 4 + 2 * recompute_dense
    tp_volume = micro_tokens * m.hidden * BF16
    t_tp = 0.0
    if lay.tp > 1:
        t_tp = tp_passes * layers_stage * n_micro * 2 * (lay.tp - 1) / lay.tp * tp_volume / tp_bw
    t_cp = 0.0
    if lay.cp > 1:
        kv_bytes = micro_tokens * 2 * m.kv_heads * m.head_dim * BF16 / lay.tp
        t_cp = 3 * layers_stage * n_micro * (lay.cp - 1) * kv_bytes / bandwidth(lay.cp, lay.tp)
    stage_params = params_total / (lay.tp * lay.pp)
    t_fsdp = 0.0
    if lay.fsdp > 1:
        gathers = (1 if lay.keep_gathered else 2 * n_micro) * stage_params * lay.gather_bytes
        scatter = stage_params * lay.reduce_bytes
        t_fsdp = gather_time(gathers + scatter, lay.fsdp, lay.tp * lay.cp)
    t_dp = 0.0
    if lay.dp > 1:
        grads = stage_params / lay.fsdp * lay.reduce_bytes
        # An all-reduce: a reduce-scatter and an all-gather.
        t_dp = 2 * gather_time(grads, lay.dp, lay.tp * lay.cp * lay.fsdp)
    bubble = (lay.pp - 1) / (n_micro * lay.virtual_stages) if lay.pp > 1 else 0.0
    if lay.pp > 1 and n_micro < lay.pp:
        notes.append(f"only {n_micro} microbatches for {lay.pp} pipeline stages: large bubble")
    # With the software's TP overlap on, TP traffic hides like FSDP's (async beside the matmuls).
    exposed_tp = t_tp * (1 - (max(fam.tp_overlap, fam.overlap) if lay.tp_comm_overlap else fam.tp_overlap))
    exposed_cp = t_cp * (1 - fam.overlap)
    # The data-parallel all-reduce hides behind the backward pass only where the software lets it
    # start before the backward ends (NCCL's bucketed all-reduce, XLA on TPU with its data-parallel
    # all-reduce optimization); otherwise it waits for the last layer's gradients, all of it exposed.
    overlappable = t_fsdp + (t_dp if lay.dp_overlap else 0.0)
    exposed_sharding = max(overlappable - fam.overlap * t_compute, (1 - fam.overlap) * overlappable)
    if not lay.dp_overlap:
        exposed_sharding += t_dp
    busy = t_compute + t_memory + exposed_tp + exposed_cp
    step = busy * (1 + bubble) + exposed_sharding

    # ---- memory -----------------------------------------------------------------------------
    # The gradient buffer is kept in the dtype it is reduced in (Megatron's grad_reduce_in_fp32,
    # Apex's grad_sync_dtype, Composer's PURE mixed precision); crosstrain's own is fp32.
    grads_b = params_total / shard * (FP32 if implementation == "crosstrain" else lay.reduce_bytes)
    params_b = params_total / shard * lay.state_bytes
    opt_b = params_total / shard * 2 * lay.state_bytes
    if lay.zero1:
        # The weights on every rank in the dtype they are gathered in (bf16, or fp8 with
        # Megatron's fp8_param_gather); the fp32 master copy and both moments over dp x cp.
        params_b = params_total / shard * lay.gather_bytes
        opt_b = params_total / shard * 3 * lay.state_bytes / (lay.dp * lay.cp)
    # crosstrain's own flash kernel is the platform's: Splash on TPU, cuDNN on NVIDIA GPUs, each
    # with what XLA's program for that platform keeps (ProgramMemory).
    program = (CROSSTRAIN_PROGRAM.get("gpu" if chip.family == "gpu" else "tpu")
               if implementation == "crosstrain" and flash else None)
    act = activation_bytes_per_token_layer(m, lay, flash=flash, glu=glu, implementation=implementation,
                                           kernel="cudnn" if chip.family == "gpu" else "splash")
    in_flight = min(lay.pp, n_micro) if lay.pp > 1 else 1
    # Blocks outside the policy's share (Layout.remat_blocks) keep everything, as under "none".
    per_layer = lay.remat_blocks * act[lay.remat] + (1 - lay.remat_blocks) * act["none"]
    saved = 0.0 if lay.host_offload else per_layer * micro_tokens * layers_stage * in_flight
    working = act["working"] * micro_tokens * (1 if lay.remat != "none" else 0)
    # fp32 logits and their gradient; crosstrain's fused loss without a flash kernel keeps one fp32
    # copy live beside the reference attention's scores (XLA's TPU memory analysis).
    # Published software: on GPUs and Trainium, the loss's fp32 copy of the logits, which its
    # backward turns into the gradient in place, and that gradient cast to bf16 for the output
    # layer's backward (Megatron's vocab-parallel cross-entropy). On TPU, XLA fuses the softmax
    # and its gradient into the output matmuls and keeps only the bf16 logits (measured on
    # crosstrain's step: ProgramMemory.logit_bytes; MaxText's and AXLearn's losses are the same
    # jnp program). In vocabulary tiles, one tile's logits at a time.
    published_logit_bytes = lay.logit_bytes or (
        CROSSTRAIN_PROGRAM["tpu"].logit_bytes if chip.family == "tpu" else FP32 + BF16)
    logits = micro_tokens * m.vocab / lay.tp / lay.vocab_tiles * (
        program.logit_bytes if program else FP32 if implementation == "crosstrain" else published_logit_bytes)
    gathered = 0.0
    if lay.fsdp > 1:
        # Two layers' weights in flight (the one computing, the next arriving), or the whole
        # stage kept gathered.
        in_flight_layers = 2
        if implementation != "crosstrain" and chip.family == "tpu":
            in_flight_layers = 1
        gathered = (layers_stage if lay.keep_gathered else in_flight_layers) * layer_params(m, glu) / lay.tp * lay.gather_bytes
    accumulation = 0.0
    if program is not None:
        # The compiled program's gradient-sized fp32 buffers: the gradients and the scan's reduced
        # copy of the stacked layer gradients; with several microbatches, the running sum.
        # (Where memory allows, XLA on TPU may also hoist FSDP's bf16 weight all-gathers out of the
        # microbatch loop, keeping the gathered model live; not modelled: docs/planner.md.)
        grads_b *= program.gradient_buffers
        if n_micro > 1:
            accumulation = program.accumulation_buffers * params_total / shard * FP32
    elif implementation == "crosstrain" and n_micro > 1:
        # crosstrain's gradient accumulation (a scan over microbatches) keeps the running sum and
        # the next microbatch's gradients in fp32.
        accumulation = 2 * params_total / shard * FP32
    memory = {
        "params": params_b,
        "grads": grads_b,
        "optimizer": opt_b,
        "activations": saved + working,
        "logits": logits,
        "fsdp_buffers": gathered,
        "grad_accumulation": accumulation,
        "reserved": fam.reserved_gib * GIB,
    }
    total = sum(memory.values())
    # crosstrain's XLA client takes a fixed fraction of a GPU's memory (platform.py); PyTorch's
    # caching allocator can take all of it, the CUDA context and NCCL's buffers being `reserved`.
    usable = 1.0 if chip.family == "gpu" and implementation != "crosstrain" else fam.usable
    capacity = chip.hbm_gib / chip.devices_per_chip * usable
    return Estimate(
        layout=lay,
        devices=D,
        chips=D / chip.devices_per_chip,
        step_time_s=step,
        time={
            "compute_s": t_compute,
            "memory_bound_s": t_memory,
            "tp_comm_s": t_tp,
            "tp_exposed_s": exposed_tp,
            "fsdp_comm_s": t_fsdp,
            "dp_comm_s": t_dp,
            "sharding_exposed_s": exposed_sharding,
            "cp_comm_s": t_cp,
            "pipeline_bubble": bubble,
            "matmul_efficiency": eff,
            "microbatches": n_micro,
        },
        memory=memory,
        memory_per_device_gib=total / GIB,
        capacity_gib=capacity,
        fits=total / GIB <= capacity,
        model_flops_per_step=model_flops,
        hardware_flops_per_step=hw_flops,
        notes=notes,
    )


def mfu(est: Estimate, chip: Chip, compute_dtype: str = "bfloat16") -> float:
    peak = chip.peak_flops(compute_dtype) or chip.peak_flops("bfloat16")
    return est.model_flops_per_step / est.step_time_s / (est.chips * peak)


def div_ceil(a: float, b: float) -> int:
    return int(math.ceil(a / b))
