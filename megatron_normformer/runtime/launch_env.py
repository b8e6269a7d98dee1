"""Who this process is in the launch: its rank, the world size and the rendezvous address, read
from whatever launcher started it (torchrun, the deepspeed launcher, OpenMPI, PMI/PMIx, Slurm's
srun, or none)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import List, Optional

from megatron_normformer.config.base import ConfigError


@dataclass
class LaunchEnv:
    """Rank facts read from whatever launcher started this process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _mpi_master_addr(world_size: int, local_size: int) -> str:
    """The address of MPI rank 0, via mpi4py when present, else localhost for a single node."""
    try:
        from mpi4py import MPI  # type: ignore

        return MPI.COMM_WORLD.bcast(socket.gethostbyname(socket.gethostname()), root=0)
    except ImportError:
        nodelist = _slurm_nodelist(os.environ)
        if nodelist:  # mpirun / srun --mpi=pmi2 inside a Slurm allocation: rank 0 is on its first host
            return expand_hostlist(nodelist)[0]
        if local_size != world_size:
            raise ConfigError(
                "mpirun across nodes needs MASTER_ADDR set to the first node's address "
                "(e.g. mpirun -x MASTER_ADDR=node0 ...) or mpi4py installed to discover it")
        return "127.0.0.1"


def expand_hostlist(hostlist: str) -> List[str]:
    """Slurm's compressed host list in full: ``node[01-03,7],gpu-a1`` -> node01, node02, node03,
    node7, gpu-a1 (zero padding kept; several bracket groups in one name multiply out)."""
    hosts, name, depth = [], "", 0
    for ch in hostlist + ",":
        if ch == "," and depth == 0:
            if name:
                hosts.extend(_expand_name(name, hostlist))
            name = ""
            continue
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            raise ConfigError(f"SLURM_JOB_NODELIST {hostlist!r}: unbalanced brackets")
        name += ch
    if depth:
        raise ConfigError(f"SLURM_JOB_NODELIST {hostlist!r}: unbalanced brackets")
    return hosts


def _expand_name(name: str, hostlist: str) -> List[str]:
    if "[" not in name:
        return [name]
    head, rest = name.split("[", 1)
    ranges, tail = rest.split("]", 1)
    values = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ConfigError(f"SLURM_JOB_NODELIST {hostlist!r}: cannot read the range {part!r}")
        width = len(low)
        values += [str(i).zfill(width) for i in range(int(low), int(high or low) + 1)]
    return [head + v + t for v in values for t in _expand_name(tail, hostlist)]


def _slurm_nodelist(env) -> Optional[str]:
    return env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")


def _slurm_port(env) -> int:
    """MASTER_PORT, else one derived from the job id, so every task of the job picks the same
    port and two jobs sharing a node rarely collide."""
    if "MASTER_PORT" in env:
        return int(env["MASTER_PORT"])
    return 15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000


def read_launch_env() -> LaunchEnv:
    """Ranks from torchrun / the deepspeed launcher (RANK, WORLD_SIZE, ...), OpenMPI, PMI or
    Slurm's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the first host of
    SLURM_JOB_NODELIST).

    A plain ``python script.py`` is a world of one. Nothing has to be set by hand on one machine.
    """
    env = os.environ
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), port, "env")
    for prefix, launcher in (("OMPI_COMM_WORLD_", "openmpi"), ("PMI_", "pmi"), ("PMIX_", "pmix")):
        if prefix + "RANK" in env and prefix + "SIZE" in env:
            rank, world = int(env[prefix + "RANK"]), int(env[prefix + "SIZE"])
            local_rank = int(env.get(prefix + "LOCAL_RANK", env.get("MPI_LOCALRANKID", rank)))
            local_size = int(env.get(prefix + "LOCAL_SIZE", env.get("MPI_LOCALNRANKS", world)))
            addr = env.get("MASTER_ADDR") or _mpi_master_addr(world, local_size)
            return LaunchEnv(rank, world, local_rank, addr, port, launcher)
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        # One process per task of an srun step (the step's task count; the job's outside srun).
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS")))
        nodelist = _slurm_nodelist(env)
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif nodelist:
            addr = expand_hostlist(nodelist)[0]
        elif world == 1:
            addr = "127.0.0.1"
        else:
            raise ConfigError("srun: SLURM_JOB_NODELIST is not set; set MASTER_ADDR to the first "
                              "node's address")
        return LaunchEnv(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), addr,
                         _slurm_port(env), "slurm")
    if "MASTER_PORT" not in env:
        # A world of one still needs a rendezvous port: take a free one, so that several
        # single-process runs on one machine do not collide on the default.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")
