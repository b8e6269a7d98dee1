"""Failures end a launch with the error on the user's terminal, under every launcher.

- An exception in the training loop, DataLoader workers running (--num-workers 2): the launch
  exits non-zero within a bounded time, the error printed, and no process it started is left
  (the workers ignore SIGTERM; they used to keep the trainer waiting for them forever).
- A start-up error (a checkpoint that does not match the flags, a learning-rate schedule that
  differs from the checkpoint's, a --data-path that does not exist) reaches the terminal as its one
  line every time, under torchrun and the deepspeed launcher (each case 3 times) and mpirun, also
  with rank 0 held back 5 s (tests/faulty_pretrain_gpt.py) so that rank 1 finds the error first:
  the launcher used to stop rank 0 before it printed, and the user saw only "SIGTERM during
  start-up". Under srun's environment, where no launcher stops the other rank, rank 1 hears of
  rank 0's report and exits at once. A flag error is one line, without the usage text.

Every process a test starts carries a marker in its environment: torchrun starts its ranks in
sessions of their own, and an orphan outlives its launcher, so that is how they are found.
"""
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from launch_utils import deepspeed, launch_env, mpirun_2, torchrun
from megatron_normformer.testing import free_port, spawn
from train_utils import PYTHON, ROOT, flags, train_many

MARKER = "MEGATRON_NORMFORMER_TEST_LAUNCH"
PARALLEL = 6  # launches at a time (2 ranks each, ~350 MB a rank)


class Launch:
    """A command in a session of its own, its output in a file, started by ``start``."""

    def __init__(self, name, cmd, tmp, env=None):
        self.name, self.cmd, self.env = name, cmd, env or {}
        self.marker = uuid.uuid4().hex
        self.log = os.path.join(tmp, f"{name}.log")
        self.proc = None
        self.ended = None  # time.monotonic() when the last process carrying the marker was gone

    def start(self):
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT,
                                         env=launch_env(**self.env, **{MARKER: self.marker}),
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def output(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def processes(self):
        """Pids of every live process this launch started, the launcher included."""
        tag = f"{MARKER}={self.marker}".encode()
        pids = []
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if tag in f.read().split(b"\0"):
                        with open(f"/proc/{pid}/stat") as s:
                            if s.read().rsplit(")", 1)[1].split()[0] != "Z":
                                pids.append(int(pid))
            except (OSError, ValueError):
                continue
        return pids

    def finished(self):
        if self.ended is None and self.proc.poll() is not None and not self.processes():
            self.ended = time.monotonic()
        return self.ended is not None

    def kill(self):
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _run_all(launches, timeout=240, parallel=PARALLEL, watch=None):
    """Run the launches, ``parallel`` at a time, until each has ended with every process it
    started; ``watch(launch)`` is called on the running ones every 0.2 s. Kills what is left
    after ``timeout`` seconds and fails."""
    waiting, running = list(launches), []
    deadline = time.monotonic() + timeout
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                running.append(waiting.pop(0).start())
            for launch in list(running):
                if watch is not None:
                    watch(launch)
                if launch.finished():
                    running.remove(launch)
            assert time.monotonic() < deadline, \
                [(l.name, l.output()[-3000:]) for l in running]
            time.sleep(0.2)
    finally:
        for launch in launches:
            if launch.proc is not None:
                launch.kill()
    return launches


def _mpirun(*argv, script="pretrain_gpt.py", env=()):
    exported = [x for name in ("PATH", MARKER, "OMP_NUM_THREADS", *env) for x in ("-x", name)]
    return [*mpirun_2(), *exported, PYTHON, script, *argv]


# -- an exception in the training loop ----------------------------------------------------------

def test_exception_in_the_loop_ends_every_launch(tmp_path):
    """RuntimeError at iteration 3 (tests/faulty_pretrain_gpt.py) on the only rank, on rank 1
    of torchrun's two, on rank 0 of the deepspeed launcher's two: exit status 1 and the error line
    within 60 s of the error, every process of the launch gone with it (DataLoader workers, the
    other rank, the launcher)."""
    tmp = str(tmp_path)
    argv = flags("--mock-data", train_iters=1000, global_batch_size=2, num_workers=2)
    script = "tests/faulty_pretrain_gpt.py"
    launches = [
        Launch("python", [PYTHON, script, *argv], tmp, dict(CRASH_AT_ITERATION="3", CRASH_ON_RANKS="0")),
        Launch("torchrun", torchrun(*argv, script=script), tmp,
               dict(CRASH_AT_ITERATION="3", CRASH_ON_RANKS="1")),
        Launch("deepspeed", deepspeed(*argv, script=script), tmp,
               dict(CRASH_AT_ITERATION="3", CRASH_ON_RANKS="0"))]
    line = {"python": "pretrain_gpt.py: error: RuntimeError: injected failure at iteration 3",
            "torchrun": "pretrain_gpt.py (rank 1): error: RuntimeError: injected failure at iteration 3",
            "deepspeed": "pretrain_gpt.py (rank 0): error: RuntimeError: injected failure at iteration 3"}
    reported = {}

    def watch(launch):
        if launch.name not in reported and line[launch.name] in launch.output():
            reported[launch.name] = time.monotonic()

    _run_all(launches, timeout=300, watch=watch)
    for launch in launches:
        out = launch.output()
        assert launch.proc.returncode == 1, (launch.name, out[-3000:])
        assert line[launch.name] in out.splitlines(), (launch.name, out[-3000:])
        assert "iteration        2/" in out  # the workers had been serving batches
        assert launch.ended - reported[launch.name] < 60, (launch.name, out[-3000:])


# -- start-up errors ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def start_up_cases(tmp_path_factory):
    """{case: (flags, the error line)}. The checkpoint is saved by two ranks, as the launches
    resume it: same layout, so the learning-rate schedule is checked as DeepSpeed's files load."""
    tmp = str(tmp_path_factory.mktemp("cases"))
    ckpt = os.path.join(tmp, "ckpt")
    spawn(train_many, 2, [flags("--mock-data", train_iters=2, global_batch_size=2, save=ckpt)])
    missing = os.path.join(tmp, "no-such-corpus")
    resume = flags("--mock-data", train_iters=4, global_batch_size=2, load=ckpt)
    return {
        "checkpoint": (resume + ["--hidden-size", "64"],
                       f"pretrain_gpt.py: error: --load {ckpt}: checkpoint does not match this run: "
                       "hidden_size: checkpoint 32 vs this run 64"),
        "schedule": (resume + ["--lr-decay-style", "cosine"],
                     "pretrain_gpt.py: error: the checkpoint's learning-rate schedule differs from the "
                     "flags': decay_samples 4 (this run 8), style 'linear' (this run 'cosine'); pass "
                     "--override-opt_param-scheduler to take the flags' or "
                     "--use-checkpoint-opt_param-scheduler to keep the checkpoint's"),
        "data-path": (flags(train_iters=4, global_batch_size=2, data_path=missing,
                            tokenizer_type="NullTokenizer"),
                      f"pretrain_gpt.py: error: --data-path {missing}: expected {missing}.bin and "
                      f"{missing}.idx (give the prefix, without extension)"),
    }


def _assert_reported(launch, line):
    out = launch.output()
    assert launch.proc.returncode != 0, (launch.name, out[-3000:])
    assert line in out.splitlines(), (launch.name, out[-3000:])
    # nothing else on our side: no second copy from rank 1, no "SIGTERM during start-up" instead
    assert "(rank 1): error" not in out and "during start-up" not in out, (launch.name, out[-3000:])


def test_start_up_errors_reach_the_terminal_under_every_launcher(start_up_cases, tmp_path):
    """Each case 3 times under torchrun and the deepspeed launcher (once as it comes, twice with
    rank 0 held back), the checkpoint mismatch under mpirun (rank 0 held back)."""
    tmp = str(tmp_path)
    assert shutil.which("mpirun"), "mpirun not found: apt-get install -y openmpi-bin"
    slow, faulty = dict(SLOW_RANK_0="5"), "tests/faulty_pretrain_gpt.py"
    expected = {}
    for case, (argv, line) in start_up_cases.items():
        for name, launcher in (("torchrun", torchrun), ("deepspeed", deepspeed)):
            expected[Launch(f"{name}-{case}", launcher(*argv), tmp)] = line
            for i in (1, 2):
                expected[Launch(f"{name}-{case}-slow-rank-0-{i}", launcher(*argv, script=faulty),
                                tmp, slow)] = line
    argv, line = start_up_cases["checkpoint"]
    expected[Launch("mpirun-checkpoint-slow-rank-0", _mpirun(*argv, script=faulty, env=slow), tmp,
                    slow)] = line
    _run_all(list(expected), timeout=600)
    for launch, line in expected.items():
        _assert_reported(launch, line)


def test_rank_1_leaves_on_rank_0s_report_without_a_launcher(start_up_cases, tmp_path):
    """srun's environment, no launcher to stop the step: rank 1 finds the checkpoint mismatch,
    hears from rank 0 through the rendezvous store that it has printed it, and exits with the same
    status at once, silently (it would print the line itself after REPORT_WAIT, 30 s)."""
    tmp = str(tmp_path)
    argv, line = start_up_cases["checkpoint"]
    port = str(free_port())
    ranks = [Launch(f"task{task}", [PYTHON, "pretrain_gpt.py", *argv], tmp,
                    dict(SLURM_PROCID=str(task), SLURM_NTASKS="2", SLURM_LOCALID=str(task),
                         SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="1", MASTER_PORT=port))
             for task in (0, 1)]
    _run_all(ranks, timeout=240)
    assert [r.proc.returncode for r in ranks] == [2, 2], [r.output()[-2000:] for r in ranks]
    assert ranks[0].output().splitlines()[-1] == line
    assert "error" not in ranks[1].output()
    assert ranks[1].ended - ranks[0].ended < 20


def test_flag_errors_are_one_line():
    """argparse's own errors and the checks of the flags alone: one line, (see --help), and no
    usage text in front of it (argparse's ~100 lines)."""
    def stderr(*argv):
        done = subprocess.run([PYTHON, "pretrain_gpt.py", *argv], cwd=ROOT, env=launch_env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        return done.stderr.strip()

    assert stderr("--mock-data", "--train-iters", "x") == \
        "pretrain_gpt.py: error: argument --train-iters: invalid int value: 'x' (see --help)"
    assert stderr("--no-such-flag") == \
        "pretrain_gpt.py: error: unrecognized arguments: --no-such-flag (see --help)"
    assert stderr("--mock-data", "--train-iters", "2", "--vocab-size", "128", "--hidden-dropout",
                  "1.5") == "pretrain_gpt.py: error: --hidden-dropout must be in [0, 1), got 1.5 (see --help)"
