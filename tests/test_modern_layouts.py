"""Issue 24's options on every layout: rotary positions, SwiGLU, grouped-query attention, RMSNorm,
bias-free linears, an untied output, per-head q/k norms, each alone and all together, with and without the four
NormFormer operations.

The model (one forward and backward from one seed, no DeepSpeed): TP=2 for each option alone, TP 2
and 4 with and without sequence parallelism for all together, and grouped-query attention at TP=4
with G = 4 (the fewest groups TP=4 allows) and G = H give bit-identical full weights, the loss and
logits to 1e-5 and every gathered gradient to 1e-5 of one process (test_tensor_parallel's bounds).

Training (DeepSpeed, 5 iterations, test_train_layout's 1e-4): all together with and without
NormFormer at PP=2, at ZeRO-3 with every parameter partitioned (DP=2), and under sequence
parallelism at TP=2 give one process's losses and gradient norms; a checkpoint saved at TP=2 after
3 iterations resumes at TP=1 and at PP=2 and continues the single-process curve.
"""
import dataclasses
import os

import pytest
import torch

from megatron_normformer.config import ModelConfig
from megatron_normformer.testing import spawn
from train_utils import assert_close, rel_error, step_in_full, train_many

# 8 heads of 8 dims (rotary_percent 0.5 still rotates an even 4), F = 128: every count divides by 4.
BASE = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, ffn_hidden_size=128,
                   vocab_size=100, max_position_embeddings=8, hidden_dropout=0.0,
                   attention_dropout=0.0)
NORMFORMER = dict(scale_attn=True, scale_fc=True, scale_heads=True, scale_resids=True)
MODERN = dict(position_embedding_type="rope", swiglu=True, num_query_groups=4, normalization="RMSNorm",
              add_bias_linear=False, untie_embeddings_and_output_weights=True)
ALONE = {  # at TP=2, each with the NormFormer operations so that every norm kind meets them
    "rope": dict(NORMFORMER, position_embedding_type="rope", rotary_base=500, rotary_percent=0.5),
    "swiglu": dict(NORMFORMER, swiglu=True),
    "gqa": dict(NORMFORMER, num_query_groups=2),
    "rmsnorm": dict(NORMFORMER, normalization="RMSNorm"),
    "no_bias": dict(NORMFORMER, add_bias_linear=False),
    "untied": dict(NORMFORMER, untie_embeddings_and_output_weights=True),
    "qk_norm": dict(NORMFORMER, qk_layernorm=True, normalization="RMSNorm", num_query_groups=2),
}
TOGETHER = {"modern": MODERN, "modern_normformer": dict(MODERN, **NORMFORMER)}
GQA_TP4 = {"gqa_g4": dict(NORMFORMER, num_query_groups=4), "gqa_g8": dict(NORMFORMER, num_query_groups=8)}
LAYOUTS = {  # name: (TP, sequence parallel, configs)
    "tp2": (2, False, {**ALONE, **TOGETHER}),
    "sp2": (2, True, TOGETHER),
    "tp4": (4, False, {**TOGETHER, **GQA_TP4}),
    "sp4": (4, True, TOGETHER),
}
ALL_CONFIGS = {**ALONE, **TOGETHER, **GQA_TP4}


def _run(tp, sequence_parallel, names):
    import torch.distributed as dist

    from megatron_normformer.model.gpt import GPTModel
    from megatron_normformer.parallel.random import seed_everything
    from megatron_normformer.parallel.state import ParallelState

    pstate = ParallelState(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    out = {}
    for name in names:
        cfg = dataclasses.replace(BASE, **ALL_CONFIGS[name]).validate(tp)
        seed_everything(7, pstate.tp_rank)
        model = GPTModel(cfg, pstate, seed=11)
        # 16 positions, past max_position_embeddings (8): rotary positions have no table to run off.
        tokens = torch.randint(0, cfg.vocab_size, (3, 17), generator=torch.Generator().manual_seed(5))
        if cfg.position_embedding_type != "rope":
            tokens = tokens[:, :9]
        out[name] = step_in_full(model, cfg, pstate, tokens)
    dist.barrier()
    return out if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def model_results():
    out = {"tp1": spawn(_run, 1, 1, False, list(ALL_CONFIGS))[0]}
    for layout, (tp, sp, configs) in LAYOUTS.items():
        out[layout] = spawn(_run, tp, tp, sp, list(configs))[0]
    return out


@pytest.mark.parametrize("layout,config", [(layout, name) for layout, (_, _, configs) in LAYOUTS.items()
                                           for name in configs])
def test_layout_matches_single_process(model_results, layout, config):
    ref, got = model_results["tp1"][config], model_results[layout][config]
    assert ref["weights"].keys() == got["weights"].keys()
    for name in ref["weights"]:
        assert torch.equal(ref["weights"][name], got["weights"][name]), name
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
    assert rel_error(got["logits"], ref["logits"]) < 1e-5
    for name in ref["grads"]:
        assert rel_error(got["grads"][name], ref["grads"][name]) < 1e-5, name


def test_options_shape_the_parameters(model_results):
    """Each option changes the parameters it should, and every parameter gets a gradient."""
    runs = model_results["tp1"]
    shapes = {c: {n: tuple(w.shape) for n, w in runs[c]["weights"].items()} for c in runs}
    layer = "layers.0."
    d, f, head_dim = BASE.hidden_size, BASE.ffn_hidden_size, BASE.head_dim
    assert shapes["swiglu"][layer + "mlp.fc1.weight"] == (2 * f, d)
    assert shapes["gqa"][layer + "attention.qkv.weight"] == ((8 + 2 * 2) * head_dim, d)
    assert shapes["gqa_g8"][layer + "attention.qkv.weight"] == (3 * d, d)
    assert not any(n.endswith("layernorm.bias") for n in shapes["rmsnorm"])
    assert shapes["rmsnorm"][layer + "mlp.ffn_layernorm.weight"] == (f,)
    assert not any(n.endswith(("qkv.bias", "dense.bias", "fc1.bias", "fc2.bias")) for n in shapes["no_bias"])
    assert any(n.endswith("input_layernorm.bias") for n in shapes["no_bias"])  # LayerNorm keeps its
    assert not any("position_embeddings" in n for n in shapes["rope"])
    assert "head.weight" in shapes["untied"] and "head.weight" not in shapes["swiglu"]
    for config, run in runs.items():
        for name, g in run["grads"].items():
            assert g.abs().sum() > 0, (config, name)


def test_each_option_changes_the_model(model_results):
    """No option is silently ignored: each alone gives another loss than the NormFormer model
    without it (all draw from the same seed)."""
    runs = model_results["tp1"]
    losses = {c: runs[c]["loss"] for c in ALONE}
    assert len({round(v, 6) for v in losses.values()}) == len(losses), losses


# -- training: PP=2, ZeRO-3, sequence parallelism, layout-changing resume -----------------------

ITERS, GLOBAL = 5, 8
TRAIN = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
         "--seq-length 16 --max-position-embeddings 8 --vocab-size 128 --mock-data "
         "--hidden-dropout 0 --attention-dropout 0 --lr 3e-3 --lr-warmup-iters 2 "
         "--num-workers 0 --log-interval 1 --eval-iters 0 --seed 7 "
         f"--train-iters {ITERS} --global-batch-size {GLOBAL} "
         "--position-embedding-type rope --swiglu --group-query-attention --num-query-groups 2 "
         "--normalization RMSNorm --disable-bias-linear --untie-embeddings-and-output-weights").split()
TRAIN_NORMFORMER = "--scale-attn --scale-fc --scale-heads --scale-resids".split()


def _argv(normformer, *extra):
    return TRAIN + (TRAIN_NORMFORMER if normformer else []) + " ".join(map(str, extra)).split()


@pytest.fixture(scope="module")
def train_results(tmp_path_factory):
    save = str(tmp_path_factory.mktemp("ckpt") / "tp2")
    z3 = "--micro-batch-size 2 --zero-stage 3 --zero-param-persistence-threshold 0"
    two_runs = []
    for nf in (False, True):
        two_runs += [_argv(nf, "--micro-batch-size 4 --pipeline-model-parallel-size 2"),
                     _argv(nf, z3),
                     _argv(nf, "--micro-batch-size 4 --tensor-model-parallel-size 2 --sequence-parallel")]
    two_runs += [_argv(True, f"--micro-batch-size 4 --tensor-model-parallel-size 2 --save {save} "
                             "--exit-interval 3"),
                 _argv(True, f"--micro-batch-size 4 --pipeline-model-parallel-size 2 --load {save}")]
    two = spawn(train_many, 2, two_runs)[0]
    one = spawn(train_many, 1, [_argv(False, "--micro-batch-size 4"), _argv(True, "--micro-batch-size 4"),
                                _argv(True, f"--micro-batch-size 4 --load {save}")])[0]
    return one, two


@pytest.mark.parametrize("normformer", [False, True])
@pytest.mark.parametrize("layout", ["pp2", "zero3", "sp2"])
def test_training_layout_matches_single_process(train_results, normformer, layout):
    one, two = train_results
    ref, got = one[int(normformer)], two[3 * int(normformer) + ["pp2", "zero3", "sp2"].index(layout)]
    assert len(ref["losses"]) == ITERS
    assert_close(got["losses"], ref["losses"], 1e-4)
    if layout != "pp2":  # the pipeline engine reports no gradient norm without clipping
        assert_close(got["grad_norms"], ref["grad_norms"], 1e-4, "grad norm")
    if layout == "zero3":
        assert got["zero3"]["partitioned"] > 0 and got["zero3"]["whole"] == 0, got["zero3"]


def test_layout_changing_resume_continues_the_curve(train_results):
    one, two = train_results
    ref = one[1]["losses"]
    saved, resumed_pp2, resumed_tp1 = two[6]["losses"], two[7]["losses"], one[2]["losses"]
    assert_close(saved, {k: ref[k] for k in saved}, 1e-4)
    assert sorted(saved) == [1, 2, 3] and sorted(resumed_pp2) == sorted(resumed_tp1) == [4, 5]
    assert_close(resumed_pp2, {k: ref[k] for k in resumed_pp2}, 1e-4)
    assert_close(resumed_tp1, {k: ref[k] for k in resumed_tp1}, 1e-4)


# -- flags ----------------------------------------------------------------------------------------

def _model_flags(*argv, tp=1):
    from megatron_normformer.arguments import build_pretrain_parser, model_config_from_args

    args = build_pretrain_parser().parse_args(
        ["--tensor-model-parallel-size", str(tp), *" ".join(argv).split()])
    return model_config_from_args(args, vocab_size=1000)


def test_megatron_deepspeed_spellings_equal_megatron_lm_ones():
    lm = _model_flags("--position-embedding-type rope --rotary-base 500000 --swiglu "
                      "--group-query-attention --num-query-groups 4 --normalization RMSNorm "
                      "--disable-bias-linear")
    ds = _model_flags("--use-rotary-position-embeddings --rotary-position-embeddings-theta 500000 "
                      "--swiglu --num-key-value-heads 4 --normalization rmsnorm --disable-bias-linear")
    assert lm == ds
    assert (lm.rotary_base, lm.num_query_groups, lm.normalization, lm.add_bias_linear) == \
        (500000, 4, "RMSNorm", False)
    # Megatron-LM's rule: two thirds of 4 x 768 rounded down to a multiple of 64.
    assert lm.ffn_hidden_size == 2048
    assert _model_flags("--group-query-attention").num_query_groups == 1  # multi-query


def test_rope_is_not_bounded_by_the_position_table():
    from megatron_normformer.arguments import build_pretrain_parser, run_config_from_args

    argv = "--mock-data --train-iters 1 --vocab-size 100 --seq-length 64 --max-position-embeddings 16"
    run = run_config_from_args(build_pretrain_parser().parse_args(
        (argv + " --position-embedding-type rope").split()))
    assert run.train.seq_length == 64 and run.model.max_sequence_length is None
    from megatron_normformer.config import ConfigError
    with pytest.raises(ConfigError, match="--max-position-embeddings"):
        run_config_from_args(build_pretrain_parser().parse_args(argv.split()))


def test_old_configs_load_as_the_old_model():
    saved = dataclasses.asdict(BASE)
    for name in ("position_embedding_type", "rotary_base", "rotary_percent", "swiglu",
                 "num_query_groups", "normalization", "add_bias_linear", "qk_layernorm"):
        saved.pop(name)
    old = ModelConfig.from_dict(saved)
    assert old == dataclasses.replace(BASE, position_embedding_type="sinusoidal")


@pytest.mark.parametrize("argv,tp,message", [
    ("--group-query-attention --num-query-groups 5", 1,
     "--num-query-groups (5) must be a positive divisor of --num-attention-heads (12)"),
    ("--group-query-attention --num-query-groups 2", 4,
     "--num-query-groups (2) must be divisible by --tensor-model-parallel-size (4)"),
    ("--num-query-groups 2", 1, "--num-query-groups needs --group-query-attention"),
    ("--group-query-attention --num-query-groups 2 --num-key-value-heads 4", 1,
     "--num-query-groups 2 contradicts --num-key-value-heads 4"),
    ("--position-embedding-type rope --rotary-percent 0.1 --num-attention-heads 24", 1,
     "--rotary-percent 0.1 of head_dim 32 rotates 3 dims"),
    ("--position-embedding-type rope --rotary-percent 0", 1, "--rotary-percent must be in (0, 1]"),
    ("--position-embedding-type rope --position-embedding-offset 2", 1,
     "--position-embedding-offset offsets a position table"),
    ("--swiglu --activation-fn gelu", 1, "--swiglu gates with silu; --activation-fn gelu"),
    ("--model-size llama-1B --activation-fn relu", 1, "--swiglu gates with silu; --activation-fn relu"),
])
def test_bad_combinations_stop_with_one_line_naming_the_flags(argv, tp, message):
    from megatron_normformer.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _model_flags(argv, tp=tp)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_normalization_choices():
    with pytest.raises(SystemExit):
        _model_flags("--normalization BatchNorm")


def test_model_flops_count_grouped_kv_and_the_gate():
    """MFU's FLOPs: K and V over G groups, SwiGLU's fc1 of 2F rows; G = H without SwiGLU is the
    old 8bsh^2 + 4bs^2h + 4bshf per layer."""
    from megatron_normformer.training.metrics import flops_per_iteration

    b, s, v = 2, 16, 128
    cfg = dataclasses.replace(BASE, num_query_groups=2, swiglu=True)
    h, f, head_dim = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    layer = 2 * b * s * h * ((8 + 2 * 2) * head_dim + h) + 4 * b * s * s * h + 2 * b * s * h * 3 * f
    assert flops_per_iteration(cfg, b, s, v) == 3 * cfg.num_layers * layer + 3 * 2 * b * s * h * v
    plain = 8 * b * s * h * h + 4 * b * s * s * h + 4 * b * s * h * f
    assert flops_per_iteration(BASE, b, s, v) == 3 * BASE.num_layers * plain + 3 * 2 * b * s * h * v
