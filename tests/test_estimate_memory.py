"""The memory planner (megatron_normformer/memory.py, tools/estimate_memory.py): parameter counts
against the real model, ZeRO / sequence-parallel / recompute arithmetic, the activation model
against the bytes autograd keeps for a real layer, the command line, and the validation against
real training runs (bench/memory_validation.py, every estimate within 15 %)."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_normformer.arguments import build_pretrain_parser, run_config_from_args
from megatron_normformer.config import ModelConfig
from megatron_normformer.memory import (
    estimate,
    layer_activations,
    resolve_layout,
    stage_parameters,
    total_parameters,
)
from megatron_normformer.model.summary import summarize
from train_utils import PYTHON, ROOT

TOOL = os.path.join(ROOT, "tools", "estimate_memory.py")
# Issue 24's options together (Llama's architecture).
MODERN = dict(position_embedding_type="rope", swiglu=True, num_query_groups=4, normalization="RMSNorm",
              add_bias_linear=False, untie_embeddings_and_output_weights=True)
MODERN_FLAGS = ("--position-embedding-type rope --swiglu --group-query-attention --num-query-groups 2 "
                "--normalization RMSNorm --disable-bias-linear")


def run_config(*flags):
    argv = ["--mock-data", "--train-iters", "1", "--vocab-size", "1000"] + " ".join(flags).split()
    return run_config_from_args(build_pretrain_parser().parse_args(argv))


@pytest.mark.parametrize("cfg, tp", [
    (ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1000), 1),
    (ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1000,
                 scale_attn=True, scale_fc=True, scale_heads=True, scale_resids=True), 2),
    (ModelConfig(num_layers=3, hidden_size=96, num_attention_heads=8, ffn_hidden_size=200,
                 vocab_size=777, scale_fc=True, scale_heads=True, head_scale_position="post-proj",
                 untie_embeddings_and_output_weights=True, position_embedding_type="learned",
                 max_position_embeddings=64), 4),
    (ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1000,
                 bidirectional=True, position_embedding_type="learned", max_position_embeddings=64,
                 scale_attn=True, scale_fc=True), 2),
    (ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=1000, **MODERN), 4),
    (ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=1000, **MODERN,
                 scale_attn=True, scale_fc=True, scale_heads=True, scale_resids=True), 2),
    (ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=1000,
                 num_query_groups=2, swiglu=True, qk_layernorm=True), 2),
])
def test_parameters_equal_the_real_models(cfg, tp):
    real = summarize(cfg, tp)
    assert stage_parameters(cfg, tp)[0] == real["parameters_per_tp_rank"]
    assert total_parameters(cfg) - real["vocab_padding_parameters"] == real["total_parameters"]


def test_pipeline_stages_hold_the_layers_and_a_tied_copy():
    cfg = ModelConfig(num_layers=5, hidden_size=64, num_attention_heads=4, vocab_size=1000)
    stages = stage_parameters(cfg, 1, 2)
    embedding = cfg.padded_vocab_size(1) * 64
    assert sum(stages) == total_parameters(cfg) + embedding  # the last stage's copy
    assert stages[0] > stages[1] - embedding  # 3 layers before 2


def test_zero_stages_divide_the_states():
    def peak_parts(*flags, world=4):
        return estimate(run_config(*flags), world).peak

    psi = total_parameters(run_config().model)
    z0 = peak_parts("--zero-stage 0")
    assert (z0.weights, z0.gradients, z0.optimizer) == (4 * psi, 4 * psi, 8 * psi)
    z1 = peak_parts("--zero-stage 1")
    assert z1.optimizer == 12 * -(-psi // 4) and z1.gradients == 4 * -(-psi // 4)
    z2 = peak_parts("--zero-stage 2")
    assert z2.gradients == 4 * -(-psi // 4)
    z3 = peak_parts("--zero-stage 3")
    assert z3.weights < z2.weights
    bf16 = peak_parts("--bf16 --zero-stage 1")  # DeepSpeed's BF16 optimizer
    assert (bf16.weights, bf16.gradients, bf16.optimizer) == (2 * psi, 6 * psi, 12 * -(-psi // 4))
    offload = peak_parts("--zero-stage 2 --cpu-offload")
    assert offload.optimizer == 0 and offload.host == 12 * -(-psi // 4) + 4 * -(-psi // 4)
    assert peak_parts("--zero-stage 1", world=8).optimizer < z1.optimizer


def test_sequence_parallel_and_recompute_reduce_activations():
    base = "--num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 512 " \
           "--max-position-embeddings 512 --micro-batch-size 2 --tensor-model-parallel-size 2"
    tp = estimate(run_config(base), 2).peak
    sp = estimate(run_config(base, "--sequence-parallel"), 2).peak
    assert sp.activations < tp.activations
    lay_tp = resolve_layout(run_config(base), 2)
    lay_sp = resolve_layout(run_config(base, "--sequence-parallel"), 2)
    cfg = run_config(base).model
    assert layer_activations(cfg, lay_sp)["residual_stream"] * 2 == layer_activations(cfg, lay_tp)["residual_stream"]
    cpu = [estimate(run_config(base, extra), 2, device="cpu").peak.activations
           for extra in ("", "--recompute-granularity selective", "--recompute-granularity full")]
    assert cpu[0] > cpu[1] > cpu[2]
    pp = estimate(run_config(base.replace("--tensor-model-parallel-size 2", "--pipeline-model-parallel-size 2"),
                             "--global-batch-size 8"), 2)
    assert pp.stages[0].in_flight_micro_batches == 2 and pp.stages[1].in_flight_micro_batches == 1


def test_pipeline_transfers_are_counted_where_deepspeed_keeps_them():
    """A sending stage keeps its output per micro-batch in flight, a receiving one the received
    input; each has one receive buffer. 1/TP of them with DeepSpeed's pipe partitioning (TP > 1),
    the local slice under sequence parallelism."""
    base = "--num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 512 " \
           "--max-position-embeddings 512 --micro-batch-size 2 --global-batch-size 8 " \
           "--pipeline-model-parallel-size 2"
    act = 2 * 512 * 256 * 4
    first, last = estimate(run_config(base), 2, device="cpu").stages
    assert (first.detail["pipe_buffers"], last.detail["pipe_received"]) == (act, act)
    assert "pipe_received" not in first.detail and "pipe_buffers" not in last.detail
    assert first.communication == last.communication == act  # DP 1: the receive buffer only
    for extra, sent, received in (("--tensor-model-parallel-size 2", act // 2, None),
                                  ("--tensor-model-parallel-size 2 --sequence-parallel", act // 2, act // 2)):
        first, last = estimate(run_config(base, extra), 4, device="cpu").stages
        assert first.detail["pipe_buffers"] == sent and last.communication == sent
        assert last.detail.get("pipe_received") == received


@pytest.mark.parametrize("activation, scale_fc, dropout, dtype, modern", [
    ("gelu", True, 0.0, torch.float32, False),
    ("gelu", True, 0.1, torch.float32, False),
    ("gelu", True, 0.1, torch.bfloat16, False),
    ("relu_squared", False, 0.1, torch.float32, False),
    ("relu", True, 0.0, torch.bfloat16, False),
    (None, True, 0.0, torch.float32, True),
    (None, True, 0.1, torch.bfloat16, True),
    (None, False, 0.0, torch.bfloat16, True),
    (None, True, 0.0, torch.float32, "--qk-layernorm"),
])
def test_layer_activations_equal_what_autograd_keeps(activation, scale_fc, dropout, dtype, modern):
    from megatron_normformer.model.layer import NormFormerLayer
    from megatron_normformer.parallel.random import seed_everything
    from megatron_normformer.parallel.state import SingleProcessState

    flags = (f"--num-layers 1 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
             f"--max-position-embeddings 32 --micro-batch-size 2 "
             + (MODERN_FLAGS if modern else f"--activation-fn {activation}") + " "
             + (modern if isinstance(modern, str) else "") + " "
             f"--hidden-dropout {dropout} --attention-dropout {dropout} --scale-attn --scale-heads "
             f"--scale-resids" + (" --scale-fc" if scale_fc else "") + (" --bf16" if dtype == torch.bfloat16 else ""))
    run = run_config(flags)
    seed_everything(1, 0)
    layer = NormFormerLayer(run.model, 0, SingleProcessState(), 1).to(dtype)
    x = torch.randn(2, 32, 64, dtype=dtype, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    expected = sum(layer_activations(run.model, resolve_layout(run, 1, device="cpu")).values())
    assert expected == sum(saved.values())


def tool(*args):
    return subprocess.run([PYTHON, TOOL, *args], capture_output=True, text=True, timeout=120)


def test_cli_reports_and_searches():
    r = tool("--model-size", "1.3B", "--bf16", "--seq-length", "2048", "--micro-batch-size", "4",
             "--tensor-model-parallel-size", "2", "--zero-stage", "1", "--num-gpus", "8",
             "--vocab-size", "50257", "--device-memory-gb", "80", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] is True and out["layout"]["dp"] == 4
    r = tool("--model-size", "13B", "--bf16", "--seq-length", "2048", "--micro-batch-size", "1",
             "--num-gpus", "8", "--vocab-size", "50257", "--device-memory-gb", "80", "--search", "--json")
    rows = json.loads(r.stdout)
    assert any(row["fits"] for row in rows) and not all(row["fits"] for row in rows)
    assert not any(row["tp"] == 1 and row["pp"] == 1 and row["zero_stage"] == 0 and row["fits"] for row in rows)


@pytest.mark.parametrize("args, message", [
    (["--model-size", "1.3B", "--vocab-size", "100", "--tensor-model-parallel-size", "3"],
     "--num-attention-heads (32) must be divisible by --tensor-model-parallel-size (3)"),
    (["--model-size", "1.3B", "--vocab-size", "100", "--tensor-model-parallel-size", "2",
      "--world-size", "3"], "world size 3 is not divisible"),
    (["--model-size", "1.3B"], "give --vocab-size"),
    (["--model-size", "1.3B", "--vocab-size", "100", "--search"], "--search needs --device-memory-gb"),
])
def test_cli_errors_are_one_line(args, message):
    r = tool(*args)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_estimates_match_real_training_runs():
    """At least 6 layouts trained by pretrain_gpt.py's code: every rank within 15 %."""
    sys.path.insert(0, ROOT)
    from bench.memory_validation import run

    summary = run(["--num-layers", "2", "--hidden-size", "512", "--seq-length", "256",
                   "--configs", "dp1_fp32", "dp1_bf16", "dp1_full_recompute", "dp1_selective",
                   "dp2_zero1", "dp2_zero3", "tp2", "tp2_sp", "pp2"])
    assert len(summary["results"]) >= 6
    for name, result in summary["results"].items():
        for r in result["per_rank"]:
            assert abs(r["error"]) <= 0.15, (name, r)
