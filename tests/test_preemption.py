"""Interruptions as clusters deliver them, with DataLoader workers running (--num-workers 2).

SIGTERM to each launcher (torchrun, the deepspeed runner, mpirun) or to the whole process group
(scancel, kill -TERM -- -PGID): every rank finishes its step and saves, `latest` names that step,
its losses and a resume's continue the loss curve of an uninterrupted run exactly. A signal during start-up
ends the launch with one line; a stale JIT-build lock does not hang a launch, and a wait on one says
which file to remove.
"""
import json
import os
import signal
import socket
import subprocess
import time

from launch_utils import deepspeed, launch_env, mpirun_2, torchrun
from megatron_normformer.testing import free_port, spawn
from train_utils import PYTHON, ROOT, flags, train_many

ITERS = 100000  # never reached: the runs are stopped by a signal, the references by --exit-interval


def _argv(tp, workers=2, **kw):
    return flags("--mock-data", train_iters=ITERS, global_batch_size=2,
                 tensor_model_parallel_size=tp, num_workers=workers, **kw)


def _rows(metrics):
    if not os.path.exists(metrics):
        return []
    with open(metrics) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _session_alive(sid):
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                return True
    return False


def _interrupt(cmd, tmp, to="launcher", twice=False, env=None):
    """Start ``cmd`` in a session of its own, SIGTERM it (its leader, or the whole process group)
    once iteration 3 is logged, and wait for every process of the session to end. Returns
    (launcher exit code, seconds from the signal to the launcher's exit, to the session's end,
    output, the launcher's pid)."""
    metrics, log = os.path.join(tmp, "m.jsonl"), os.path.join(tmp, "out.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or launch_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(_rows(metrics)) < 3:
            assert proc.poll() is None and time.time() < deadline, open(log).read()[-3000:]
            time.sleep(0.1)
        send = (lambda: os.killpg(proc.pid, signal.SIGTERM)) if to == "group" else proc.terminate
        send()
        t0 = time.time()
        if twice:
            time.sleep(0.02)
            send()  # a second signal while the step finishes or the checkpoint is written
        rc = proc.wait(timeout=120)
        launcher_s = time.time() - t0
        while _session_alive(proc.pid):
            assert time.time() - t0 < 120, "processes of the run still alive"
            time.sleep(0.1)
        return rc, launcher_s, time.time() - t0, open(log).read(), proc.pid
    finally:
        if proc.poll() is None or _session_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def _check_stop(tmp, out, tp, reason="SIGTERM received"):
    """The run stopped after a whole step k and saved it; its losses are an uninterrupted run's,
    and a resume from its checkpoint continues that run's curve exactly (to k+3)."""
    # no rank failed (torchrun's own SignalException is its one traceback)
    assert out.count("Traceback") == out.count("SignalException: Process"), out[-3000:]
    assert "DataLoader worker" not in out, out[-3000:]
    losses = {r["iteration"]: r["lm_loss"] for r in _rows(os.path.join(tmp, "m.jsonl"))}
    k = max(losses)
    assert k >= 3
    assert f"> {reason}: stopped after iteration {k}, checkpoint in" in out, out[-3000:]
    with open(os.path.join(tmp, "ckpt", "latest")) as f:
        assert f.read() == f"iter_{k:07d}"
    # --exit-interval stops both runs at k+3 without changing the schedule (set by --train-iters)
    reference, resumed = spawn(train_many, tp, [
        _argv(tp, workers=0, exit_interval=k + 3),
        _argv(tp, workers=0, exit_interval=k + 3, load=os.path.join(tmp, "ckpt"))])[0]
    reference = reference["losses"]
    assert losses == {i: reference[i] for i in range(1, k + 1)}
    assert resumed["losses"] == {i: reference[i] for i in range(k + 1, k + 4)}


def test_process_group_sigterm_twice_with_stale_build_lock(tmp_path):
    """`kill -TERM -- -PGID` (as scancel), twice, to a single `python pretrain_gpt.py` whose
    DataLoader workers share its group; a JIT-build lock left by an interrupted build is there."""
    ext = tmp_path / "torch_extensions"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").write_text("")
    tmp = str(tmp_path)
    argv = _argv(1, save=os.path.join(tmp, "ckpt"), metrics_file=os.path.join(tmp, "m.jsonl"))
    rc, seconds, _, out, _ = _interrupt([PYTHON, "pretrain_gpt.py", *argv], tmp, to="group",
                                        twice=True, env=launch_env(TORCH_EXTENSIONS_DIR=str(ext)))
    assert rc == 0, out[-3000:]
    assert seconds < 10
    _check_stop(tmp, out, 1)
    # nothing was built, the planted lock never waited on
    assert sorted(os.listdir(ext)) == ["deepspeed_shm_comm"]
    assert os.listdir(ext / "deepspeed_shm_comm") == ["lock"]
    assert "build lock" not in out


def test_torchrun_sigterm(tmp_path):
    """torchrun forwards SIGTERM to each worker's process group (DataLoader workers included),
    waits up to --shutdown-timeout (30 s) before SIGKILL, then exits 1 re-raising the signal."""
    tmp = str(tmp_path)
    argv = _argv(2, save=os.path.join(tmp, "ckpt"), metrics_file=os.path.join(tmp, "m.jsonl"))
    rc, seconds, _, out, _ = _interrupt(torchrun(*argv), tmp)
    assert rc == 1 and "SignalException" in out, out[-3000:]
    assert seconds < 15 and "forcefully exiting" not in out, out[-3000:]
    _check_stop(tmp, out, 2)


def test_deepspeed_launcher_sigterm(tmp_path):
    """On one node the deepspeed runner forwards nothing: SIGTERM kills it alone (-15). Its ranks
    notice within a second, finish the step, save and exit 0, and so does
    deepspeed.launcher.launch."""
    tmp = str(tmp_path)
    argv = _argv(2, save=os.path.join(tmp, "ckpt"), metrics_file=os.path.join(tmp, "m.jsonl"))
    rc, _, seconds, out, _ = _interrupt(deepspeed(*argv), tmp)
    assert rc == -signal.SIGTERM
    assert seconds < 15, out[-3000:]
    _check_stop(tmp, out, 2, reason="exit of the deepspeed launcher")


def test_deepspeed_launcher_process_group_sigterm(tmp_path):
    """scancel's way: the runner dies at once; deepspeed.launcher.launch SIGTERMs every process
    under it (DataLoader workers too), waits up to 30 s, then exits 1."""
    tmp = str(tmp_path)
    argv = _argv(2, save=os.path.join(tmp, "ckpt"), metrics_file=os.path.join(tmp, "m.jsonl"))
    rc, _, seconds, out, _ = _interrupt(deepspeed(*argv), tmp, to="group")
    assert rc == -signal.SIGTERM
    assert seconds < 15, out[-3000:]
    _check_stop(tmp, out, 2)


def test_mpirun_sigterm(tmp_path):
    """mpirun (OpenMPI 4) sends SIGCONT, SIGTERM odls_base_sigkill_timeout seconds later (default
    1; 5 here), SIGKILL as long again, then exits 1; it forwards no output meanwhile, so each rank
    writes its own log, as docs/training.md advises."""
    tmp = str(tmp_path)
    argv = _argv(2, save=os.path.join(tmp, "ckpt"), metrics_file=os.path.join(tmp, "m.jsonl"))
    rank_log = os.path.join(tmp, "rank")
    script = f"exec {PYTHON} pretrain_gpt.py {' '.join(argv)} > {rank_log}$OMPI_COMM_WORLD_RANK.log 2>&1"
    rc, seconds, _, out, _ = _interrupt([*mpirun_2(), "--mca", "odls_base_sigkill_timeout", "5",
                                         "-x", "PATH", "bash", "-c", script], tmp)
    out += "".join(open(f"{rank_log}{r}.log").read() for r in (0, 1))
    assert rc == 1, out[-3000:]
    assert 5 <= seconds < 15, out[-3000:]  # SIGTERM reached the ranks 5 s after mpirun got it
    _check_stop(tmp, out, 2)


def test_signal_during_rendezvous_exits_with_one_line(tmp_path):
    """Rank 0 of 2 waits for a rank that never comes: it says so after 5 s, and Ctrl-C ends it
    at once with one line; the rendezvous port is free again."""
    port = free_port()
    log = str(tmp_path / "out.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([PYTHON, "pretrain_gpt.py", *_argv(1)], cwd=ROOT,
                                env=launch_env(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                               MASTER_PORT=str(port)),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        waiting = (f"pretrain_gpt.py (rank 0): rendezvous of 2 processes at 127.0.0.1:{port} for 5 s:"
                   " waiting until every rank has joined")
        deadline = time.time() + 120
        while waiting not in open(log).read():
            assert proc.poll() is None and time.time() < deadline, open(log).read()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        assert proc.wait(timeout=10) == 128 + signal.SIGINT
        assert time.time() - t0 < 3
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = open(log).read().rstrip("\n").split("\n")
    assert lines[-1] == (f"pretrain_gpt.py (rank 0): SIGINT during start-up (rendezvous of 2 processes"
                         f" at 127.0.0.1:{port}): exiting before training, nothing saved")
    assert "Traceback" not in "\n".join(lines)
    with socket.socket() as s:  # free for the next launch (a TCPStore binds with SO_REUSEADDR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_stale_build_lock_is_named(tmp_path):
    """A wait on torch's JIT-build lock reports, after 5 s, that no process holds it and which
    file to remove; removing it lets the wait end."""
    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    code = ("from megatron_normformer.runtime import build_locks, signals\n"
            "signals.install('t')\n"
            "build_locks.report_build_lock_waits()\n"
            "from torch.utils.cpp_extension import FileBaton\n"
            f"FileBaton({str(lock)!r}).wait()\n"
            "print('went on', flush=True)\n")
    log = str(tmp_path / "out.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([PYTHON, "-c", code], cwd=ROOT, env=launch_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        report = (f"t: waiting for the C++ extension build lock {lock} for 5 s: no process on this "
                  f"machine holds it: a build was interrupted and left it behind; remove {lock}")
        deadline = time.time() + 120
        while report not in open(log).read():
            assert proc.poll() is None and time.time() < deadline, open(log).read()[-3000:]
            time.sleep(0.1)
        lock.unlink()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert open(log).read().endswith("went on\n")


def test_build_lock_held_by_a_live_build(tmp_path):
    from megatron_normformer.runtime.build_locks import build_lock_report

    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton holds it while it builds
    try:
        assert build_lock_report(str(lock)) == (
            f"a build in process {os.getpid()} holds it; waiting for that build")
    finally:
        os.close(fd)
    assert "no process on this machine holds it" in build_lock_report(str(lock))
