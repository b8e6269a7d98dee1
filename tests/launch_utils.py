"""Launching the trainer the way users do, from the tests: the launchers' command lines and the
environment they start from."""
from __future__ import annotations

import os
import shutil

from megatron_normformer.testing import free_port
from train_utils import PYTHON

VENV_BIN = os.path.dirname(PYTHON)
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_env(**extra) -> dict:
    """This process's environment with the virtualenv's launchers first on PATH, one OpenMP thread
    per rank (2 cores run several ranks) and no rank variables of an outer launch, which would
    win over the launcher's own; then ``extra``."""
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for key in RANK_VARIABLES:
        env.pop(key, None)
    env.update(extra)
    return env


def torchrun(*argv, script="pretrain_gpt.py") -> list:
    """``torchrun`` starting ``script argv`` as 2 ranks on this machine, on a free port."""
    return [os.path.join(VENV_BIN, "torchrun"), "--nproc-per-node", "2", "--master-port",
            str(free_port()), script, *argv]


def deepspeed(*argv, script="pretrain_gpt.py") -> list:
    """The ``deepspeed`` runner starting ``script argv`` as 2 ranks on this machine."""
    return [os.path.join(VENV_BIN, "deepspeed"), "--num_gpus", "2", "--master_port",
            str(free_port()), script, *argv]


def mpirun_2() -> list:
    """``mpirun`` for 2 ranks on this machine, however many cores it has (the command's start)."""
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: apt-get install -y openmpi-bin"
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [mpirun, *root, "--oversubscribe", "-np", "2"]
