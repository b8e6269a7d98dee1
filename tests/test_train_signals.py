"""SIGTERM finishes the step, saves and exits 0; a NaN loss stops with the iteration named;
TensorBoard holds the NormFormer diagnostics, identical at ZeRO-0 and ZeRO-3."""
import json
import os
import signal
import subprocess
import time

import pytest

from megatron_normformer.testing import spawn
from train_utils import PYTHON, ROOT, flags, train_many


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    metrics, save = str(tmp_path / "m.jsonl"), str(tmp_path / "ckpt")
    argv = flags("--mock-data", train_iters=100000, global_batch_size=2, metrics_file=metrics,
                 save=save)
    proc = subprocess.Popen([PYTHON, "pretrain_gpt.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-2000:]
    rows = [json.loads(line) for line in open(metrics)]
    last = rows[-1]["iteration"]
    assert last >= 3 and last < 100000
    assert f"SIGTERM received: stopped after iteration {last}" in out
    with open(os.path.join(save, "latest")) as f:
        assert f.read() == f"iter_{last:07d}"


def _nan_run():
    from megatron_normformer.training.loop import TrainingError

    try:
        train_many([flags("--mock-data", "--lr 1e30 --lr-warmup-iters 0", train_iters=5,
                          global_batch_size=2)])
    except TrainingError as e:
        return str(e)
    return None


def test_nan_loss_stops_with_iteration_named():
    message = spawn(_nan_run, 1)[0]
    assert message is not None and message.startswith("iteration 2: lm loss is nan")


def _tensorboard_runs(tmp):
    runs = {}
    for zero in (0, 3):
        tb = os.path.join(tmp, f"tb{zero}")
        s = train_many([flags("--mock-data", train_iters=2, global_batch_size=4, micro_batch_size=2,
                              tensor_model_parallel_size=2, zero_stage=zero, tensorboard_dir=tb)])[0]
        runs[zero] = dict(fc2=s["fc2"], tb=tb, losses=s["losses"])
    return runs


def test_tensorboard_diagnostics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ranks = spawn(_tensorboard_runs, 2, str(tmp_path))
    runs = ranks[1]  # the last rank writes
    for it in (1, 2):
        for tag, v in runs[0]["fc2"][it].items():
            assert v > 0 and abs(runs[3]["fc2"][it][tag] - v) <= 1e-5 * v, (tag, it)
    acc = EventAccumulator(runs[3]["tb"], size_guidance={"histograms": 0, "scalars": 0}).Reload()
    scalars, hists = set(acc.Tags()["scalars"]), set(acc.Tags()["histograms"])
    for tag in ("train/lm_loss", "train/ppl", "train/lr", "train/grad_norm", "train/loss_scale",
                "train/tokens_per_sec", "normformer/fc2_grad_mean_abs/layer_0",
                "normformer/fc2_grad_mean_abs/layer_1"):
        assert tag in scalars, tag
    for layer in (0, 1):
        for name in ("head_scale", "ffn_ln_weight", "post_attn_ln_weight", "resid_scale"):
            assert f"normformer/{name}/layer_{layer}" in hists
    # HeadScale is gathered across TP: all 4 heads present.
    h = acc.Histograms("normformer/head_scale/layer_0")[-1].histogram_value
    assert h.num == 4
    loss = [e.value for e in acc.Scalars("train/lm_loss")]
    assert loss == pytest.approx([runs[3]["losses"][it] for it in (1, 2)], rel=1e-6)  # the logged losses
