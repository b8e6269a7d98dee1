"""Per-rank memory of a training run, from its flags: weights, gradients, optimizer state,
activations, the logits / cross-entropy buffer and DeepSpeed's communication buffers.

Everything is counted in bytes for the busiest rank of each pipeline stage (all TP and DP ranks of
a stage hold the same amounts; the last TP rank holds the vocabulary padding, which only changes
the logits buffer). The model of each term, and the measurements it was checked against, are in
docs/memory.md. No process group, no DeepSpeed and no tensor is needed: ``estimate`` takes the
:class:`RunConfig` that ``pretrain_gpt.py`` builds from the same flags.

``device`` says what the estimate is for. ``"cuda"`` (the default): fused SDPA kernels (no
seq x seq scores are kept), boolean dropout masks, DeepSpeed's communication buffers allocated at
their configured size and doubled when ``overlap_comm`` is on (as the generated config sets it on
GPUs). ``"cpu"``: what a CPU run touches, the quantity the validation measures (resident memory):
the math SDPA path whenever attention dropout or a mask rules out the fused kernel, dropout masks in
the activation dtype, buffers counted up to the bytes actually written, and host and device are
the same memory, so offloaded state is added to the total.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron_normformer.config import ConfigError, ModelConfig, RunConfig
from megatron_normformer.config import ds_config as dsc
from megatron_normformer.config.data import MASKING_PROB
from megatron_normformer.config.parallel import stage_layer_counts

GIB = 2 ** 30

# DeepSpeed's defaults for the ZeRO settings our generated config leaves unset
# (deepspeed/runtime/zero/config.py).
ZERO_DEFAULTS = {
    "reduce_bucket_size": int(5e8),
    "allgather_bucket_size": int(5e8),
    "stage3_prefetch_bucket_size": int(5e7),
    "stage3_max_live_parameters": int(1e9),
    "stage3_param_persistence_threshold": int(1e5),
}
ALLREDUCE_BUCKET_SIZE = int(5e8)  # the engine's gradient all-reduce buckets without ZeRO


# -- parameters -------------------------------------------------------------------------------

def _norm_parameters(cfg: ModelConfig, size: int) -> int:
    """A norm's parameters: LayerNorm's weight and bias, RMSNorm's weight."""
    return size * (2 if cfg.normalization == "LayerNorm" else 1)


def layer_parameters(cfg: ModelConfig, tp: int = 1) -> Dict[str, int]:
    """Parameters of one NormFormer layer on one TP rank, by tensor group. Grouped-query attention
    shrinks K and V to G heads; SwiGLU's fc1 holds gate and up (2F rows)."""
    h, f, heads = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads
    qkv_rows = (heads + 2 * cfg.query_groups) * cfg.head_dim
    fc1_rows = 2 * f if cfg.swiglu else f
    bias = 1 if cfg.add_bias_linear else 0
    counts = {
        "layernorms": _norm_parameters(cfg, h) * (2 + (1 if cfg.scale_attn else 0)),  # in, pre-MLP[, post-attn]
        "qk_layernorms": 2 * _norm_parameters(cfg, cfg.head_dim) if cfg.qk_layernorm else 0,
        "qkv": qkv_rows * h // tp + bias * qkv_rows // tp,
        "attention_output": h * h // tp + bias * h,
        "fc1": fc1_rows * h // tp + bias * fc1_rows // tp,
        "fc2": h * f // tp + bias * h,
        "ffn_layernorm": _norm_parameters(cfg, f) // tp if cfg.scale_fc else 0,
        "head_scale": (heads // tp if cfg.head_scale_position == "pre-proj" else heads)
        if cfg.scale_heads else 0,
        "resid_scale": h if cfg.scale_resids else 0,
    }
    return counts


def embedding_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    """The word embedding shard (padded vocabulary / TP rows) and learned positions if any (with
    their offset rows); sinusoidal and rotary positions have no parameters."""
    rows = cfg.max_position_embeddings + cfg.position_embedding_offset
    positions = rows * cfg.hidden_size if cfg.position_embedding_type == "learned" else 0
    return cfg.padded_vocab_size(tp) // tp * cfg.hidden_size + positions


def head_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    """What follows the last layer: final norm and the output layer (GPT), or the final
    norm and RoBERTa's LM head (dense, norm, vocabulary bias) of the masked LM. The tied
    projection is the embedding's and not counted here."""
    h = cfg.hidden_size
    vocab_rows = cfg.padded_vocab_size(tp) // tp
    norm = _norm_parameters(cfg, h)
    if cfg.bidirectional:
        return norm + (h * h + h) + norm + vocab_rows
    final_ln = norm if cfg.final_layernorm else 0
    return final_ln + (vocab_rows * h if cfg.untie_embeddings_and_output_weights else 0)


def stage_parameters(cfg: ModelConfig, tp: int = 1, pp: int = 1) -> List[int]:
    """Parameters held by one TP rank of each pipeline stage. With tied embeddings and PP > 1 the
    last stage holds its own copy of the embedding (DeepSpeed ties the two)."""
    per_layer = sum(layer_parameters(cfg, tp).values())
    tied = cfg.bidirectional or not cfg.untie_embeddings_and_output_weights
    out = []
    for stage, layers in enumerate(stage_layer_counts(cfg.num_layers, pp)):
        n = layers * per_layer
        if stage == 0:
            n += embedding_parameters(cfg, tp)
        if stage == pp - 1:
            n += head_parameters(cfg, tp)
            if tied and pp > 1:
                n += embedding_parameters(cfg, tp)
        out.append(n)
    return out


def total_parameters(cfg: ModelConfig) -> int:
    """All parameters of the model (vocabulary padding included), counted once."""
    return stage_parameters(cfg, 1, 1)[0]


# -- the run's layout -------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """What the estimate depends on besides the model, resolved from a RunConfig."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    cpu_offload: bool
    micro_batch: int
    seq_length: int
    gas: int
    sequence_parallel: bool
    dtype_bytes: int               # parameters and activations: 2 (bf16/fp16) or 4
    mixed: str                     # "fp32", "bf16" or "fp16"
    fp32_grad_accumulation: bool   # bf16's default (--accumulate-allreduce-grads-in-fp32)
    recompute: Optional[tuple]     # config.training.Recompute or None
    partition_activations: bool
    reduce_bucket: int
    prefetch_bucket: int
    max_live_parameters: int
    persistence_threshold: int
    overlap_comm: bool
    device: str
    pipe_partitioned: bool = False  # DeepSpeed sends 1/TP of each stage's output, gathered on arrival

    @property
    def optimizer_wrapper(self) -> str:
        """Which DeepSpeed optimizer holds the state (engine._do_optimizer_sanity_check):
        ``bf16_optimizer`` for bf16 with fp32 accumulation at ZeRO 0/1 without offload,
        ``zero`` for ZeRO 1-3, ``fp16_optimizer`` for 16-bit ZeRO-0, ``none`` for fp32 ZeRO-0."""
        if self.mixed == "bf16" and self.fp32_grad_accumulation and self.zero_stage <= 1 and not self.cpu_offload:
            return "bf16_optimizer"
        if self.zero_stage > 0:
            return "zero"
        return "none" if self.mixed == "fp32" else "fp16_optimizer"


def resolve_layout(run: RunConfig, world_size: int, device: str = "cuda",
                   user_ds_config: Optional[Dict] = None) -> Layout:
    """The layout of ``run`` on ``world_size`` ranks, with the DeepSpeed settings our generated
    config (config/ds_config.py) gives on ``device``, and a user's config laid over them."""
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"--device must be cuda or cpu, got {device!r}")
    dp, gas, _ = run.batch_layout(world_size)
    ds = dsc.generate(run, dp, gas, on_gpu=device == "cuda")
    zero = dict(ds["zero_optimization"])
    if user_ds_config:
        zero.update(user_ds_config.get("zero_optimization", {}))
    t = run.train
    tp = run.parallel.tensor_model_parallel_size
    # The pipeline engine's pipe_partitioned / grad_partitioned (DeepSpeed's default true, which
    # our config turns off under sequence parallelism); they only act at TP > 1.
    pipeline = {**ds.get("pipeline", {}), **(user_ds_config or {}).get("pipeline", {})}
    pipe_partitioned = tp > 1 and bool(pipeline.get("pipe_partitioned", True))

    def setting(name):
        return int(float(zero.get(name, ZERO_DEFAULTS[name])))

    return Layout(
        tp=run.parallel.tensor_model_parallel_size, pp=run.parallel.pipeline_model_parallel_size,
        dp=dp, zero_stage=run.ds.zero_stage, cpu_offload=run.ds.cpu_offload,
        micro_batch=t.micro_batch_size, seq_length=t.seq_length, gas=gas,
        sequence_parallel=run.parallel.sequence_parallel and run.parallel.tensor_model_parallel_size > 1,
        dtype_bytes=2 if (t.bf16 or t.fp16) else 4,
        mixed="bf16" if t.bf16 else "fp16" if t.fp16 else "fp32",
        fp32_grad_accumulation=dsc.fp32_grad_accumulation(run),
        recompute=run.recompute(), partition_activations=run.ds.partition_activations,
        reduce_bucket=setting("reduce_bucket_size"),
        prefetch_bucket=setting("stage3_prefetch_bucket_size"),
        max_live_parameters=setting("stage3_max_live_parameters"),
        persistence_threshold=(run.ds.zero_param_persistence_threshold
                               if run.ds.zero_param_persistence_threshold is not None
                               else setting("stage3_param_persistence_threshold")),
        overlap_comm=bool(zero.get("overlap_comm", False)), device=device,
        pipe_partitioned=pipe_partitioned)


# -- activations ------------------------------------------------------------------------------

def _fused_attention(cfg: ModelConfig, lay: Layout, masked: bool) -> bool:
    """Whether SDPA runs a fused kernel (flash / memory-efficient), which keeps only its output
    and the log-sum-exp. On GPUs it does for every mask and dropout this model uses; torch's CPU
    flash kernel takes neither dropout nor a mask, and the math path keeps the scores."""
    if lay.device == "cuda":
        return True
    return cfg.attention_dropout == 0.0 and not masked


def _norm_kept(cfg: ModelConfig, lay: Layout, size: int) -> int:
    """Bytes per token a norm over ``size`` features keeps besides its input (or the input's copy,
    ``_norm_keeps_copy``). A LayerNorm: mean and rstd, fp32 on GPUs, the input's dtype on CPUs. An
    RMSNorm (model/norms.py, autograd over torch ops): rstd in fp32 and the normalised tensor
    before the weight."""
    p = lay.dtype_bytes
    if cfg.normalization == "LayerNorm":
        return 2 * (4 if lay.device == "cuda" else p)
    return 4 + size * p


def _norm_keeps_copy(cfg: ModelConfig, lay: Layout) -> bool:
    """Whether a norm keeps an fp32 copy of its input rather than the input: an RMSNorm of a 16-bit
    one (a LayerNorm, and any norm in fp32, keeps the input itself)."""
    return cfg.normalization == "RMSNorm" and lay.dtype_bytes < 4


def _qk_norm_activations(cfg: ModelConfig, lay: Layout, tokens: int) -> int:
    """What ``--qk-layernorm``'s per-head norms of q and k keep: their inputs (q is a copy when
    groups share K/V; k a view of the QKV output, kept anyway), their per-head statistics, and
    without rotary positions the normalised q and k that SDPA keeps instead of views. Equal to what
    autograd keeps for RMSNorm on the fused-attention path; LayerNorm q/k norms and the math path
    keep somewhat more."""
    if not cfg.qk_layernorm:
        return 0
    p, hd = lay.dtype_bytes, cfg.head_dim
    n = 0
    for heads, is_q in ((cfg.num_attention_heads // lay.tp, True), (cfg.query_groups // lay.tp, False)):
        features = tokens * heads * hd
        if _norm_keeps_copy(cfg, lay):
            n += features * 4
        elif is_q and cfg.query_groups != cfg.num_attention_heads:
            n += features * p
        n += tokens * heads * _norm_kept(cfg, lay, hd)
        if cfg.position_embedding_type != "rope":
            n += features * p
    return n


def layer_activations(cfg: ModelConfig, lay: Layout, masked: bool = False) -> Dict[str, int]:
    """Bytes one NormFormer layer keeps for its backward pass, per micro-batch, on one rank, by
    what keeps them (model/layer.py, attention.py, mlp.py, norms.py), without recomputation or
    with selective recomputation of the core attention."""
    p, t = lay.dtype_bytes, lay.tp
    b, s = lay.micro_batch, lay.seq_length
    tokens = b * s
    local = tokens // t if lay.sequence_parallel else tokens  # tokens outside the TP regions
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    heads = cfg.num_attention_heads // t
    mask = 1 if lay.device == "cuda" else p  # dropout keeps a bool mask on GPU, a scaled one on CPU
    stats = _norm_kept(cfg, lay, h)
    norms = 3 if cfg.scale_attn else 2

    out: Dict[str, int] = {}
    # Outside the TP regions (divided by TP under sequence parallelism): the layer input (kept by
    # the input LN), the input-LN and pre-MLP-LN outputs (kept by QKV and fc1: the local slice
    # under sequence parallelism, which gathers it again in the backward pass), the attention
    # output if the post-attention LN takes it, the residual after attention (kept by the pre-MLP
    # LN and ResScale), the LNs' statistics, two dropout masks.
    # An RMSNorm of a 16-bit input keeps an fp32 copy instead, and then the residual after attention
    # is kept only by ResScale.
    if _norm_keeps_copy(cfg, lay):
        inputs = local * h * 4 * norms + (local * h * p if cfg.scale_resids else 0)
    else:
        inputs = local * h * p * norms
    out["residual_stream"] = 2 * local * h * p + inputs + local * stats * norms
    out["dropout_masks"] = 2 * local * h * mask if cfg.hidden_dropout > 0 else 0

    selective = lay.recompute is not None and lay.recompute.granularity == "selective"
    qkv_features = (cfg.num_attention_heads + 2 * cfg.query_groups) * cfg.head_dim  # K, V: G heads
    qkv = tokens * qkv_features // t * p
    if cfg.position_embedding_type == "rope":
        # Rotated q and k are new tensors, which SDPA keeps; the rotation keeps the layer's cos and
        # sin, [seq, rotary_dim] each (per row of the batch under --reset-position-ids, not counted).
        qkv += tokens * (cfg.num_attention_heads + cfg.query_groups) * cfg.head_dim // t * p
    cos_sin = 2 * s * cfg.rotary_dim * p if cfg.position_embedding_type == "rope" else 0
    context = tokens * h // t * p
    if _fused_attention(cfg, lay, masked):
        # q, k, v are views of the QKV output; SDPA's output is W_O's input (a view of it).
        out["attention"] = qkv + context + (0 if selective else b * heads * s * 4)  # + log-sum-exp
    elif selective:
        # Only the recomputed function's inputs (the QKV output) and W_O's input are kept.
        out["attention"] = qkv + context
    else:
        # The math path, which computes in fp32 whatever the dtype: scaled q and k and a
        # contiguous v, softmax output, dropout mask and the dropped probabilities
        # (b x heads x s x s each), W_O's input (a contiguous copy in the training dtype).
        scores = b * heads * s * s
        score_mask = 1 if lay.device == "cuda" else 4
        score_bytes = scores * 4 + (scores * (score_mask + 4) if cfg.attention_dropout > 0 else 0)
        out["attention"] = 3 * tokens * h // t * 4 + score_bytes + context
    out["attention"] += cos_sin + _qk_norm_activations(cfg, lay, tokens)
    if cfg.scale_heads and cfg.head_scale_position == "pre-proj":
        # HeadScale scales the smaller of W_O's input and W_O (parallel/layers.py): the scaled
        # copy is what W_O's matmul keeps, the multiply the per-feature gammas.
        out["attention"] += min(tokens, h) * h // t * p + h // t * p

    # The FFN, on the whole sequence, F / TP features: what the activation keeps (gelu its input,
    # relu and relu^2 the relu output), the activation output if its consumer keeps its input
    # (fc2, or the TP=1 FFN LN; the partitioned FFN LN keeps x-hat in fp32 instead), the FFN LN
    # output (fc2's input).
    # SwiGLU keeps fc1's 2F outputs (gate for silu, up for the product) and silu's output.
    ff = tokens * f // t
    rms = cfg.normalization == "RMSNorm"
    # The FFN norm's consumer keeps its input, unless it is the partitioned LayerNorm (which keeps
    # x-hat) or an RMSNorm of a 16-bit input (an fp32 copy).
    if rms and cfg.scale_fc:
        keeps_input = not _norm_keeps_copy(cfg, lay)
    else:
        keeps_input = not (cfg.scale_fc and t > 1)
    if cfg.swiglu:
        mlp = 3 * ff * p + (ff * p if keeps_input else 0)
    else:
        mlp = ff * p
        if cfg.activation_fn != "relu" and keeps_input:
            mlp += ff * p
    if cfg.scale_fc:
        if rms:
            mlp += ff * p + tokens * _norm_kept(cfg, lay, f // t) + (ff * 4 if not keeps_input else 0)
        else:
            mlp += ff * p + (tokens * stats if t == 1 else ff * 4 + tokens * 4)
    out["mlp"] = mlp
    return out


def _checkpointed_input(cfg: ModelConfig, lay: Layout) -> int:
    """The one tensor a fully recomputed chunk keeps: its input, [micro batch, seq(/TP), h]."""
    tokens = lay.micro_batch * lay.seq_length
    n = tokens * cfg.hidden_size * lay.dtype_bytes
    if lay.sequence_parallel or lay.partition_activations:
        n //= lay.tp
    return n


def stack_activations(cfg: ModelConfig, lay: Layout, layers: int, masked: bool = False) -> int:
    """A stage's layer stack, one micro-batch, at the peak of its backward pass: with full
    recomputation the kept chunk inputs plus one chunk's recomputed activations."""
    per_layer = sum(layer_activations(cfg, lay, masked).values())
    r = lay.recompute
    if layers == 0:
        return 0
    if r is None or r.granularity == "selective":
        return layers * per_layer
    if r.method == "block":
        recomputed = min(r.num_layers, layers)
        return recomputed * _checkpointed_input(cfg, lay) + (layers - recomputed) * per_layer + \
            (per_layer if recomputed else 0)
    chunks = math.ceil(layers / r.num_layers)
    return chunks * _checkpointed_input(cfg, lay) + min(r.num_layers, layers) * per_layer


def embedding_activations(cfg: ModelConfig, lay: Layout) -> int:
    """The token ids the lookup keeps and the embedding dropout's mask (whole sequence)."""
    tokens = lay.micro_batch * lay.seq_length
    mask = 1 if lay.device == "cuda" else lay.dtype_bytes
    return tokens * 8 + (tokens * cfg.hidden_size * mask if cfg.hidden_dropout > 0 else 0)


def head_activations(cfg: ModelConfig, lay: Layout) -> int:
    """The final LN's input (local slice) and output (whole sequence, kept by the projection);
    without the final LN the projection's input alone."""
    tokens = lay.micro_batch * lay.seq_length
    local = tokens // lay.tp if lay.sequence_parallel else tokens
    h, p = cfg.hidden_size, lay.dtype_bytes
    n = tokens * h * p
    if cfg.final_layernorm:
        if cfg.normalization == "LayerNorm":
            n += local * h * p + local * 8
        else:
            n += local * h * (4 if _norm_keeps_copy(cfg, lay) else p) + local * _norm_kept(cfg, lay, h)
    if cfg.bidirectional:  # RoBERTa's head transform on the scored positions: dense, gelu, LN
        scored = int(tokens * MASKING_PROB)
        n += scored * h * p * 3 + scored * 8
    return n


def logits_bytes(cfg: ModelConfig, lay: Layout) -> int:
    """The vocab-parallel cross entropy's peak (parallel/cross_entropy.py): the logits in the
    training dtype, their fp32 copy when that is narrower, the padded copy on the rank holding
    the padding, the shifted logits that become the kept fp32 softmax."""
    tokens = lay.micro_batch * lay.seq_length
    if cfg.bidirectional:
        tokens = int(tokens * MASKING_PROB)
    padded = cfg.padded_vocab_size(lay.tp)
    local = padded // lay.tp
    per_column = lay.dtype_bytes + (4 if lay.dtype_bytes < 4 else 0) + 4
    if padded != cfg.vocab_size:
        per_column += 4
    return tokens * local * per_column


def pipe_transfer_bytes(cfg: ModelConfig, lay: Layout) -> Dict[str, int]:
    """What DeepSpeed's PipelineEngine (deepspeed/runtime/pipe/engine.py) holds for the hidden
    states travelling between stages, [micro batch, seq (/ TP under sequence parallelism), h] in
    the training dtype (``act``), on a stage that sends them on (``sent``, per micro-batch in
    flight: its output, kept in the pipe buffer until its gradient comes back), on one that
    receives them (``received``, per micro-batch in flight: the received tensor, a leaf the stage
    computes on a clone of, kept until its gradient has been sent), and once per stage
    (``buffer``: the receive buffer, ``_grad_layer_buf``, one tensor for the activations received
    from the previous stage and the gradients from the next). With ``pipe_partitioned`` (TP > 1
    without sequence parallelism) each TP rank sends and keeps 1/TP of the output, the receiver
    computes on the gathered tensor itself, and the sender's backward pass runs with the gathered
    gradient (``gathered_grad``). The masks that travel with them (BERT) are not counted."""
    tokens = lay.micro_batch * lay.seq_length
    if lay.sequence_parallel:
        tokens //= lay.tp
    act = tokens * cfg.hidden_size * lay.dtype_bytes
    if lay.pipe_partitioned:
        return dict(sent=act // lay.tp, received=0, buffer=act // lay.tp, gathered_grad=act)
    return dict(sent=act, received=act, buffer=act, gathered_grad=0)


def pipeline_in_flight(lay: Layout) -> List[int]:
    """Micro-batches whose activations each stage holds at once under 1F1B: the first stage
    runs PP forwards before its first backward, the last one."""
    if lay.pp == 1:
        return [1]
    return [min(lay.pp - stage, lay.gas) for stage in range(lay.pp)]


# -- model states -----------------------------------------------------------------------------

@dataclass
class StageMemory:
    """One rank of one pipeline stage, in bytes. ``host`` is what lives in CPU memory under
    --cpu-offload (on a GPU machine it is not part of ``total``)."""

    stage: int
    parameters: int
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    logits: int = 0
    communication: int = 0
    host: int = 0
    total: int = 0
    in_flight_micro_batches: int = 1
    detail: Dict[str, int] = field(default_factory=dict)


def _zero3_live_parameters(cfg: ModelConfig, lay: Layout, params: int) -> int:
    """Parameters ZeRO-3 holds gathered at once: the persistent ones (smaller than the
    threshold), the module being computed (the largest: a layer, or the embedding) and what is
    prefetched behind it, capped by stage3_max_live_parameters."""
    per_layer = layer_parameters(cfg, lay.tp)
    persistent = sum(n for n in per_layer.values() if 0 < n < lay.persistence_threshold)
    layers = cfg.num_layers // lay.pp
    persistent *= max(layers, 1)
    largest_module = max(sum(per_layer.values()), embedding_parameters(cfg, lay.tp))
    live = min(largest_module + lay.prefetch_bucket, lay.max_live_parameters, params)
    return persistent + live


def model_states(cfg: ModelConfig, lay: Layout, params: int) -> Dict[str, int]:
    """weights, gradients (those alive during the backward pass, and at the step), optimizer
    state (fp32 masters and Adam moments), communication buffers and offloaded bytes, as the
    DeepSpeed optimizer of this layout keeps them."""
    p, d, z = lay.dtype_bytes, lay.dp, lay.zero_stage
    part = math.ceil(params / d)
    touched = lay.device == "cpu"  # count a buffer up to what is written into it
    wrapper = lay.optimizer_wrapper
    masters = 0 if wrapper == "none" else 4 * (params if z == 0 else part)
    moments = 8 * (params if z == 0 else part)

    def bucket(elements: int, nbytes: int, doubled: bool = False) -> int:
        if touched:
            elements = min(elements, params)
        return elements * nbytes * (2 if doubled and lay.overlap_comm and not touched else 1)

    s = dict(weights=params * p, grads=params * p, grads_at_step=0, optimizer=masters + moments,
             communication=0, host=0)
    if z == 3:
        live = _zero3_live_parameters(cfg, lay, params)
        s["weights"] = part * p + live * p
        s["grads"] = part * 4 if (lay.fp32_grad_accumulation or lay.mixed == "fp32") else part * p
        s["communication"] = bucket(lay.reduce_bucket, p)
        if lay.cpu_offload:
            s["host"] += part * p + masters + moments + s["grads"]
            s["weights"] = live * p
            s["optimizer"], s["grads"] = 0, 0
        return s
    if wrapper == "bf16_optimizer":
        # bf16 weights; fp32 gradient accumulators for every parameter, and the bf16 .grad of
        # every parameter, folded in after the backward pass (immediate_grad_update is off by
        # default); fp32 masters and moments of this rank's partition.
        s["grads"] = params * (4 + p)
        if d > 1:
            s["communication"] = bucket(ALLREDUCE_BUCKET_SIZE, 4)
        return s
    if wrapper in ("none", "fp16_optimizer"):
        if d > 1:  # the engine all-reduces flattened buckets of the gradients
            s["communication"] = bucket(ALLREDUCE_BUCKET_SIZE, p)
        if wrapper == "fp16_optimizer":
            s["grads_at_step"] = params * 4  # fp32 copies of the gradients for the step
        return s
    # ZeRO-1/2 (deepspeed/runtime/zero/stage_1_and_2.py, contiguous_gradients): gradients are
    # copied into a bucket of reduce_bucket_size elements (two with overlap_comm) as they arrive,
    # reduced when it is full, and this rank keeps its partition (ZeRO-1 stages fp32
    # accumulators in the bucket under bf16's default).
    accum = 4 if (lay.fp32_grad_accumulation or lay.mixed == "fp32") else p
    s["grads"] = part * accum
    s["communication"] = bucket(lay.reduce_bucket, accum if z == 1 else p, doubled=True)
    if lay.mixed != "fp32" and accum != 4:
        s["grads_at_step"] = part * 4  # the fp32 gradient partition the step reads
    if lay.cpu_offload:
        s["host"] = masters + moments + part * 4
        s["optimizer"] = 0
        if z == 2:
            s["grads"] = 0
    return s


# -- the estimate -----------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    layout: Layout
    total_parameters: int
    stages: List[StageMemory]
    device_memory_bytes: Optional[int] = None

    @property
    def peak(self) -> StageMemory:
        """The rank that needs the most."""
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> Optional[bool]:
        if self.device_memory_bytes is None:
            return None
        return self.peak.total <= self.device_memory_bytes

    def to_dict(self) -> dict:
        return {"layout": dataclasses.asdict(self.layout), "total_parameters": self.total_parameters,
                "stages": [dataclasses.asdict(s) for s in self.stages],
                "peak_rank_bytes": self.peak.total, "device_memory_bytes": self.device_memory_bytes,
                "fits": self.fits}


def estimate(run: RunConfig, world_size: int, device: str = "cuda",
             device_memory_gb: Optional[float] = None, user_ds_config: Optional[Dict] = None,
             masked: Optional[bool] = None) -> MemoryEstimate:
    """Per-rank memory of ``run`` on ``world_size`` ranks. ``masked``: an explicit attention mask
    (--reset-attention-mask, the masked LM's padding mask); derived from ``run`` when None."""
    cfg = run.model
    lay = resolve_layout(run, world_size, device, user_ds_config)
    if masked is None:
        masked = run.train.reset_attention_mask or cfg.bidirectional
    params = stage_parameters(cfg, lay.tp, lay.pp)
    layers = stage_layer_counts(cfg.num_layers, lay.pp)
    in_flight = pipeline_in_flight(lay)
    stages = []
    for stage in range(lay.pp):
        first, last = stage == 0, stage == lay.pp - 1
        m = in_flight[stage] if lay.pp > 1 else 1
        states = model_states(cfg, lay, params[stage])
        act = stack_activations(cfg, lay, layers[stage], masked)
        detail = {"layer_stack": act}
        if first:
            detail["embedding"] = embedding_activations(cfg, lay)
        if last:
            detail["head"] = head_activations(cfg, lay)
        pipe = pipe_transfer_bytes(cfg, lay) if lay.pp > 1 else None
        if pipe and not last:  # the stage's output, kept in the pipe buffer until its backward
            detail["pipe_buffers"] = pipe["sent"]
        if pipe and not first and pipe["received"]:  # the received input, until its grad is sent
            detail["pipe_received"] = pipe["received"]
        per_micro = sum(detail.values())
        # Earlier micro-batches are kept whole; the newest one is at the peak of its backward.
        activations = per_micro * m
        if lay.recompute is not None and lay.recompute.granularity == "full" and m > 1:
            kept_only = per_micro - detail["layer_stack"] + \
                math.ceil(layers[stage] / max(lay.recompute.num_layers, 1)) * _checkpointed_input(cfg, lay)
            activations = kept_only * (m - 1) + per_micro
        if pipe and not last and pipe["gathered_grad"]:
            activations += pipe["gathered_grad"]
        logits = logits_bytes(cfg, lay) if last else 0
        # The receive buffer is there from the first transfer on (first and last stage alike).
        communication = states["communication"] + (pipe["buffer"] if pipe else 0)
        # The backward pass of the first micro-batch: gradients appear as the activations that
        # produced them are freed, so the two overlap at their larger. Every later micro-batch of
        # the iteration (gradient accumulation, the pipeline's) runs with all of the gradients
        # already there. Buffers are there throughout. The step: every gradient, the fp32 copies
        # the step reads.
        if lay.gas > 1:
            backward = activations + logits + states["grads"]
        else:
            backward = max(activations + logits, states["grads"])
        backward += communication
        step = states["grads"] + states["grads_at_step"] + communication
        total = states["weights"] + states["optimizer"] + max(backward, step)
        if device == "cpu":
            total += states["host"]
        detail.update(grads_at_step=states["grads_at_step"])
        stages.append(StageMemory(stage=stage, parameters=params[stage], weights=states["weights"],
                                  gradients=states["grads"], optimizer=states["optimizer"],
                                  activations=activations, logits=logits,
                                  communication=communication, host=states["host"],
                                  total=total, in_flight_micro_batches=m, detail=detail))
    limit = None if device_memory_gb is None else int(device_memory_gb * GIB)
    return MemoryEstimate(lay, total_parameters(cfg), stages, limit)


# -- layouts that fit -------------------------------------------------------------------------

def _divisors(n: int) -> List[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def search(run: RunConfig, world_size: int, device_memory_gb: float, device: str = "cuda",
           zero_stages=(0, 1, 2, 3), recompute_options=(None, "selective", "full"),
           sequence_parallel_options=(False, True), offload_options=(False,)) -> List[dict]:
    """Every TP x PP x DP x ZeRO x recompute x SP layout of ``world_size`` ranks that the trainer
    accepts, each with its per-rank peak and whether it fits, fitting ones first by fewest bytes."""
    rows = []
    cfg = run.model
    for tp in _divisors(world_size):
        if cfg.num_attention_heads % tp or cfg.ffn_hidden_size % tp:
            continue
        for pp in _divisors(world_size // tp):
            if pp > cfg.num_layers:
                continue
            for zero in zero_stages:
                for rc in recompute_options:
                    for sp in sequence_parallel_options:
                        if sp and tp == 1:
                            continue
                        for offload in offload_options:
                            candidate = _variant(run, tp, pp, zero, rc, sp, offload)
                            try:
                                candidate.validate()
                                candidate.batch_layout(world_size)
                                est = estimate(candidate, world_size, device, device_memory_gb)
                            except ConfigError:
                                continue
                            peak = est.peak
                            rows.append(dict(tp=tp, pp=pp, dp=est.layout.dp, zero_stage=zero,
                                             recompute=rc or "none", sequence_parallel=sp,
                                             cpu_offload=offload, peak_bytes=peak.total,
                                             peak_gib=peak.total / GIB, fits=est.fits))
    rows.sort(key=lambda r: (not r["fits"], r["peak_bytes"]))
    return rows


def _variant(run: RunConfig, tp: int, pp: int, zero: int, recompute: Optional[str], sp: bool,
             offload: bool) -> RunConfig:
    train = dataclasses.replace(run.train, recompute_granularity=recompute, recompute_method=None,
                                recompute_num_layers=None, checkpoint_activations=False)
    return dataclasses.replace(
        run, parallel=dataclasses.replace(run.parallel, tensor_model_parallel_size=tp,
                                          pipeline_model_parallel_size=pp, sequence_parallel=sp),
        ds=dataclasses.replace(run.ds, zero_stage=zero, cpu_offload=offload), train=train)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
