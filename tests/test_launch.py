"""The three launchers start the same training: deepspeed, torchrun (one node and two "nodes" on
this machine) and mpirun. Each run's per-iteration losses (from --metrics-file) must equal a
single-process reference run's to 1e-4 relative. Nothing is set in the environment by hand."""
import json
import os
import subprocess

import pytest

from launch_utils import VENV_BIN, deepspeed, launch_env, mpirun_2, torchrun
from megatron_normformer.testing import free_port
from train_utils import PYTHON, ROOT, flags

ITERS = 3


def _argv(metrics, **kw):
    return flags("--mock-data", train_iters=ITERS, global_batch_size=4, metrics_file=metrics, **kw)


def _losses(metrics):
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    return {r["iteration"]: r["lm_loss"] for r in rows if "lm_loss" in r}


def _run(cmds, timeout=240, envs=None):
    """Run the commands side by side (``envs``: extra variables per command); kill them all if
    one does not finish in time."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=launch_env(**(e or {})), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for c, e in zip(cmds, envs or [None] * len(cmds))]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
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
    out = _run([deepspeed(*_argv(m, tensor_model_parallel_size=2))])
    assert "TP 2" in out[0]
    _assert_same(_losses(m), reference)


def test_torchrun_single_node_data_parallel(reference, tmp_path):
    m = str(tmp_path / "m.jsonl")
    _run([torchrun(*_argv(m, zero_stage=2))])
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
    m = str(tmp_path / "m.jsonl")
    _run([[*mpirun_2(), "-x", "PATH", PYTHON, "pretrain_gpt.py",
           *_argv(m, tensor_model_parallel_size=2, zero_stage=1)]])
    _assert_same(_losses(m), reference)


def _slurm_port():
    """A free port that _slurm_port() derives from a job id (15000 + id % 20000)."""
    import random
    import socket

    for _ in range(100):
        port = random.randint(15000, 34999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in 15000-34999")


def test_srun(reference, tmp_path):
    """What srun gives each task (rank, task count, local id, a compressed node list whose first
    host is this machine, the job id), nothing else: the ranks find each other from it."""
    m = str(tmp_path / "m.jsonl")
    job = _slurm_port() - 15000
    cmds, envs = [], []
    for task in (0, 1):
        cmds.append([PYTHON, "pretrain_gpt.py", *_argv(m, tensor_model_parallel_size=2)])
        envs.append({"SLURM_PROCID": str(task), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(task),
                     "SLURM_JOB_NODELIST": "localhost,gpu-b[02-03]", "SLURM_JOB_ID": str(job)})
    outs = _run(cmds, envs=envs)
    assert "TP 2" in outs[0]
    _assert_same(_losses(m), reference)


def test_slurm_environment_is_read(monkeypatch):
    from megatron_normformer.runtime.launch_env import expand_hostlist, read_launch_env

    assert expand_hostlist("node[01-03,7],gpu-a[1-2]") == [
        "node01", "node02", "node03", "node7", "gpu-a1", "gpu-a2"]
    assert expand_hostlist("r[1-2]-n[08-09]") == ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
                "PMI_RANK", "PMIX_RANK", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[07-10]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    env = read_launch_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
            env.launcher) == (5, 8, 1, "node07", 15000 + 123456 % 20000, "slurm")
    monkeypatch.setenv("RANK", "0")  # torchrun inside an allocation: its variables win
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert read_launch_env().launcher == "env"
