"""Layout invariance of training: same seed, data and global batch give the same per-iteration
losses (1e-4 relative, 5 iterations, dropout 0) whatever the TP / DP / accumulation / ZeRO layout,
on mock data and on a real preprocessed dataset. Also: activation checkpointing (with dropout)
reproduces the losses and gradient norms of the plain run. Sequence parallelism gives TP's losses
at TP=2 (with ZeRO-3, with pipelining), its checkpoint resumes without it, and activation
checkpointing replays its per-rank dropout streams.

ZeRO-3 runs partition every parameter (--zero-param-persistence-threshold 0; DeepSpeed's default
would keep all of the tiny model's tensors whole): TP=2 x DP=2 with the tied embedding and
activation checkpointing, a checkpoint resume, and a consolidated export equal to one process's.
"""
import os
import subprocess
import sys

import pytest

from megatron_normformer.testing import spawn
from train_utils import ROOT, assert_close, flags, make_null_dataset, train_many

ITERS = 5
GLOBAL = 8


def base(data, *extra, **kw):
    return flags(data, *extra, train_iters=ITERS, global_batch_size=GLOBAL, **kw)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    prefix = make_null_dataset(str(tmp_path_factory.mktemp("data")))
    ckpt = tmp_path_factory.mktemp("ckpt")
    one_dir, z3_dir, sp_dir = str(ckpt / "one"), str(ckpt / "z3"), str(ckpt / "sp")
    z3 = dict(micro_batch_size=2, tensor_model_parallel_size=2, zero_stage=3,
              zero_param_persistence_threshold=0)
    real = f"--data-path {prefix} --split 90,10,0 --eval-iters 1 --eval-interval 3"
    mock = "--mock-data"
    dropout = "--hidden-dropout 0.1 --attention-dropout 0.1"
    one = spawn(train_many, 1, [
        base(mock, micro_batch_size=2, save=one_dir),                        # 0 ref, 4 accumulation
        base(real, micro_batch_size=8),                                      # 1 real ref
        base(mock, dropout, micro_batch_size=4),                             # 2 dropout
        base(mock, dropout, micro_batch_size=4, checkpoint_activations=True),  # 3 + recompute
    ])[0]
    two = spawn(train_many, 2, [
        base(mock, micro_batch_size=4, tensor_model_parallel_size=2),       # TP2, accumulation 2
        base(mock, micro_batch_size=1),                                      # DP2, accumulation 4
        base(real, micro_batch_size=4, tensor_model_parallel_size=2),        # real, TP2
        base(mock, dropout, micro_batch_size=4, tensor_model_parallel_size=2, checkpoint_activations=True),
        base(mock, dropout, micro_batch_size=4, tensor_model_parallel_size=2),
        base(mock, micro_batch_size=4, tensor_model_parallel_size=2, sequence_parallel=True,  # 5 SP
             save=sp_dir, exit_interval=3),
        base(mock, micro_batch_size=4, tensor_model_parallel_size=2, load=sp_dir),  # 6 resume, no SP
        base(mock, dropout, micro_batch_size=4, tensor_model_parallel_size=2, sequence_parallel=True),
        base(mock, dropout, micro_batch_size=4, tensor_model_parallel_size=2, sequence_parallel=True,
             checkpoint_activations=True),                                   # 8 SP + recompute
    ])[1]
    four = spawn(train_many, 4, [
        base(mock, checkpoint_activations=True, **z3),                               # TP2 x DP2 Z3
        base(real, micro_batch_size=2, tensor_model_parallel_size=2, zero_stage=1),  # TP2 x DP2 Z1
        base(mock, micro_batch_size=1, zero_stage=2),                                # DP4 Z2, acc 2
        base(mock, cpu_offload=True, **z3),                                          # ZeRO-Offload
        base(mock, save=z3_dir, exit_interval=3, **z3),                              # Z3 3 its + save
        base(mock, save=z3_dir, load=z3_dir, **z3),                                  # resume to 5
        base(mock, sequence_parallel=True, **z3),                                    # Z3 + SP
        base(mock, micro_batch_size=2, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
             zero_stage=1, sequence_parallel=True),                                  # TP2 x PP2 SP
    ])[3]
    return one, two, four, dict(one=one_dir, z3=z3_dir, root=ckpt)


def test_tensor_parallel_matches_single_process(results):
    one, two, *_ = results
    assert_close(two[0]["losses"], one[0]["losses"], 1e-4)
    assert_close(two[0]["grad_norms"], one[0]["grad_norms"], 1e-4, "grad norm")
    assert_close(two[2]["losses"], one[1]["losses"], 1e-4)  # real data
    assert_close(two[2]["val"], one[1]["val"], 1e-4, "val loss")
    assert len(one[0]["losses"]) == ITERS and one[0]["gas"] == 4 and two[0]["gas"] == 2


def test_data_parallel_matches_gradient_accumulation(results):
    one, two, four, _ = results
    assert two[1]["dp"] == 2 and two[1]["gas"] == 4
    assert_close(two[1]["losses"], one[0]["losses"], 1e-4)
    assert_close(two[1]["grad_norms"], one[0]["grad_norms"], 1e-4, "grad norm")
    assert four[2]["dp"] == 4 and four[2]["gas"] == 2
    assert_close(four[2]["losses"], one[0]["losses"], 1e-4)


def test_zero_stages_with_tensor_parallel_match_single_process(results):
    one, _, four, _ = results
    assert four[0]["dp"] == 2
    assert_close(four[0]["losses"], one[0]["losses"], 1e-4)  # ZeRO-3, TP2 x DP2
    assert_close(four[0]["grad_norms"], one[0]["grad_norms"], 1e-4, "grad norm")
    assert_close(four[1]["losses"], one[1]["losses"], 1e-4)  # ZeRO-1 on real data
    assert_close(four[2]["grad_norms"], one[0]["grad_norms"], 1e-4, "grad norm")  # ZeRO-2


def test_zero3_really_partitions_and_resumes(results):
    one, _, four, _ = results
    for run in (four[0], four[3], four[4], four[5]):
        z = run["zero3"]
        # Every parameter, vectors included, is split over DP=2: each rank holds about half.
        assert z["whole"] == 0 and z["partitioned"] > 0, z
        assert z["local_numel"] <= z["full_numel"] // 2 + z["partitioned"], z
    assert sorted(four[4]["losses"]) == [1, 2, 3] and sorted(four[5]["losses"]) == [4, 5]
    assert_close({**four[4]["losses"], **four[5]["losses"]}, one[0]["losses"], 1e-4)


def test_zero3_consolidated_export_matches_single_process(results):
    from megatron_normformer.checkpoint.release import load_consolidated

    *_, dirs = results
    out = []
    for name in ("one", "z3"):
        path = str(dirs["root"] / f"{name}_release")
        done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"),
                               "--load", dirs[name], "--output-consolidated", path],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        out.append(load_consolidated(path)[0])
    a, b = out
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("qkv.bias"):
            continue  # its key part has no gradient: Adam amplifies round-off (test_convert_checkpoint)
        rel = ((a[name] - b[name]).norm() / b[name].norm().clamp_min(1e-12)).item()
        assert rel < 1e-4, (name, rel)


def test_cpu_offload_matches_single_process(results):
    """--cpu-offload (optimizer states and, at ZeRO-3, parameters in host memory) trains the same."""
    one, _, four, _ = results
    assert_close(four[3]["losses"], one[0]["losses"], 1e-4)
    assert_close(four[3]["grad_norms"], one[0]["grad_norms"], 1e-4, "grad norm")


def test_sequence_parallel_matches_tensor_parallel(results):
    one, two, four, _ = results
    assert sorted(two[5]["losses"]) == [1, 2, 3] and sorted(two[6]["losses"]) == [4, 5]
    # SP for 3 iterations, then resumed from its checkpoint without SP: one uninterrupted TP run.
    assert_close({**two[5]["losses"], **two[6]["losses"]}, two[0]["losses"], 1e-4)
    assert_close(two[5]["grad_norms"], {k: two[0]["grad_norms"][k] for k in (1, 2, 3)}, 1e-4, "grad norm")
    assert_close(four[6]["losses"], one[0]["losses"], 1e-4)  # with ZeRO-3 partitioning
    assert four[6]["zero3"]["whole"] == 0
    assert_close(four[7]["losses"], one[0]["losses"], 1e-4)  # with pipeline parallelism
    # Dropout in the sequence-parallel regions draws per-rank masks; recomputation replays them.
    assert_close(two[8]["losses"], two[7]["losses"], 1e-6)
    assert_close(two[8]["grad_norms"], two[7]["grad_norms"], 1e-6, "grad norm")
    assert two[7]["losses"] != two[4]["losses"]  # the masks differ from TP's, as in Megatron


def test_real_data_evaluates_on_schedule(results):
    one, *_ = results
    # --eval-interval 3 and the final evaluation; --split 90,10,0 has no test documents.
    assert sorted(one[1]["val"]) == [3, ITERS] and one[1]["test"] == {}
    assert all(3.0 < v < 6.0 for v in one[1]["val"].values())


def test_activation_checkpointing_reproduces_the_plain_run(results):
    one, two, *_ = results
    # With dropout on: the recompute must replay both the default and the TP dropout streams.
    assert_close(one[3]["losses"], one[2]["losses"], 1e-6)
    assert_close(one[3]["grad_norms"], one[2]["grad_norms"], 1e-6, "grad norm")
    assert_close(two[3]["losses"], two[4]["losses"], 1e-6)
    assert one[2]["losses"] != one[0]["losses"]  # dropout really was on
