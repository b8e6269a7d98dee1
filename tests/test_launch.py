"""The three launchers start the same training: deepspeed, torchrun (one node and two "nodes" on
this machine) and mpirun. Each run's per-iteration losses (from --metrics-file) must equal a
single-process reference run's to 1e-4 relative. Nothing is set in the environment by hand."""
import json
import os
import shutil
import subprocess

import pytest

from megatron_normformer.testing import free_port
from train_utils import PYTHON, ROOT, flags

VENV_BIN = os.path.dirname(PYTHON)
ITERS = 3


def _argv(metrics, **kw):
    return flags("--mock-data", train_iters=ITERS, global_batch_size=4, metrics_file=metrics, **kw)


def _env():
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _losses(metrics):
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    return {r["iteration"]: r["lm_loss"] for r in rows if "lm_loss" in r}


def _run(cmds, timeout=240):
    procs = [subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in cmds]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    metrics = str(tmp_path_factory.mktemp("ref") / "m.jsonl")
    _run([[PYTHON, "pretrain_gpt.py", *_argv(metrics)]])
    losses = _losses(metrics)
    assert sorted(losses) == list(range(1, ITERS + 1))
    return losses


def _assert_same(got, ref):
    assert got.keys() == ref.keys()
    for k in ref:
        assert abs(got[k] - ref[k]) <= 1e-4 * abs(ref[k]), (k, got[k], ref[k])


def test_deepspeed_launcher(reference, tmp_path):
    m = str(tmp_path / "m.jsonl")
    out = _run([[os.path.join(VENV_BIN, "deepspeed"), "--num_gpus", "2", "--master_port",
                 str(free_port()), "pretrain_gpt.py", *_argv(m, tensor_model_parallel_size=2)]])
    assert "TP 2" in out[0]
    _assert_same(_losses(m), reference)


def test_torchrun_single_node_data_parallel(reference, tmp_path):
    m = str(tmp_path / "m.jsonl")
    _run([[os.path.join(VENV_BIN, "torchrun"), "--nproc-per-node", "2", "--master-port",
           str(free_port()), "pretrain_gpt.py", *_argv(m, zero_stage=2)]])
    _assert_same(_losses(m), reference)


def test_torchrun_two_nodes(reference, tmp_path):
    m = str(tmp_path / "m.jsonl")
    port = str(free_port())
    cmds = [[os.path.join(VENV_BIN, "torchrun"), "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
             "pretrain_gpt.py", *_argv(m, tensor_model_parallel_size=2)] for node in (0, 1)]
    _run(cmds)
    _assert_same(_losses(m), reference)


def test_mpirun(reference, tmp_path):
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: apt-get install -y openmpi-bin"
    m = str(tmp_path / "m.jsonl")
    env_flags = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    _run([[mpirun, *env_flags, "--oversubscribe", "-np", "2", "-x", "PATH",
           PYTHON, "pretrain_gpt.py", *_argv(m, tensor_model_parallel_size=2, zero_stage=1)]])
    _assert_same(_losses(m), reference)
