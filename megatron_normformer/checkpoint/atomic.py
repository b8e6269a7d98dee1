"""Checkpoint directories that a reader never sees half-written, and write errors that say why.

A tag is written into ``DIR/.tmp.TAG``, fsynced, and renamed to ``DIR/TAG``. A tag that already
exists (a re-run saving the same iteration, ``--finetune --load DIR --save DIR``) is first renamed
to ``DIR/.replaced.TAG`` and removed once ``latest`` names the new one. ``latest`` itself is a
temporary file, fsynced and renamed. Wherever a save is killed, ``latest`` names a complete tag
holding one save's files; :func:`repair`, run when the next run starts, removes what the killed save
left behind and, if it died between the two renames, puts the replaced tag back.
"""
from __future__ import annotations

import errno
import functools
import os
import re
import shutil
from typing import Dict, List, Optional

import torch
from safetensors.torch import save_file

LATEST = "latest"
TMP = ".tmp."  # a tag (or ``latest``, or a write probe) being written
REPLACED = ".replaced."  # the previous version of a tag while its new version is renamed in
_TAG = re.compile(r"^iter_\d+$")
# Per-file temporaries of saves by earlier versions, which wrote each file in place: safetensors'
# own ``.tmpXXXXXX``, ``X.tmp`` and ``X.tmp.PID``.
_OLD_TEMPORARY = re.compile(r"^\.tmp|\.tmp(\.\d+)?$")
_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_PROBE_BYTES = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message says why and what is left on disk."""

    every_rank_knows = True  # a save fails on every rank together (checkpoint/training.py)


@functools.lru_cache(maxsize=None)
def file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 under umask 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with the mode of every other checkpoint file (safetensors
    writes through a private temporary file: mode 0600)."""
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, file_mode())


def write_text(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` atomically: a temporary file, fsynced, renamed, the rename
    fsynced."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, TMP + name)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory or ".")


def fsync_dir(path: str) -> None:
    """Make the names in directory ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # a filesystem that cannot fsync a directory has nothing to flush
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str, rank: int = 0, world_size: int = 1) -> None:
    """fsync the files under ``root`` (file i, in sorted order, by rank i mod ``world_size``, so
    the ranks share the writeback) and, on rank 0, its directories."""
    files, dirs = [], []
    for directory, subdirs, names in os.walk(root):
        dirs.append(directory)
        files += [os.path.join(directory, n) for n in names]
    for path in sorted(files)[rank::world_size]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if rank == 0:
        for directory in dirs:
            fsync_dir(directory)


def tmp_dir(save_dir: str, tag: str) -> str:
    """Where tag ``tag`` of ``save_dir`` is written before it is renamed into place."""
    return os.path.join(save_dir, TMP + tag)


def publish(save_dir: str, tag: str) -> None:
    """Rename the written and fsynced :func:`tmp_dir` to ``save_dir/tag`` (an existing version of
    it moved aside first and removed last), then point ``latest`` at it."""
    final, replaced = os.path.join(save_dir, tag), os.path.join(save_dir, REPLACED + tag)
    if os.path.lexists(replaced):  # left by an earlier interrupted replacement; obsolete now
        _remove(replaced)
    had = os.path.lexists(final)
    if had:
        os.rename(final, replaced)
    try:
        os.rename(tmp_dir(save_dir, tag), final)
    except BaseException:
        if had:
            os.rename(replaced, final)
        raise
    fsync_dir(save_dir)
    write_text(os.path.join(save_dir, LATEST), tag)
    if had:
        _remove(replaced)


def read_latest(save_dir: str) -> Optional[str]:
    """The tag ``latest`` names, or None."""
    try:
        with open(os.path.join(save_dir, LATEST)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def repair(save_dir: str) -> List[str]:
    """Undo what killed saves left in ``save_dir``; returns a line per thing done. Run by one
    process, before anything saves into ``save_dir``."""
    if not os.path.isdir(save_dir):
        return []
    latest, done = read_latest(save_dir), []
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        if name.startswith(REPLACED):
            tag = name[len(REPLACED):]
            if tag == latest and not os.path.lexists(os.path.join(save_dir, tag)):
                os.rename(path, os.path.join(save_dir, tag))
                fsync_dir(save_dir)
                done.append(f"put {tag} back from {name} (a save replacing it was killed before "
                            "the new version was in place)")
                continue
        if name.startswith((TMP, REPLACED)) or (name.startswith(LATEST) and _OLD_TEMPORARY.search(name)):
            done.append(f"removed {name} ({_megabytes(path)}), left by a killed save")
            _remove(path)
        elif _TAG.match(name) and os.path.isdir(path):
            for directory in (path, os.path.join(path, "universal")):
                for leftover in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
                    if _OLD_TEMPORARY.search(leftover):
                        where = os.path.join(directory, leftover)
                        done.append(f"removed {os.path.relpath(where, save_dir)} "
                                    f"({_megabytes(where)}), left by a killed save")
                        _remove(where)
    return done


def check_writable(save_dir: str, rank: int) -> Optional[str]:
    """Why ``save_dir`` cannot take a checkpoint (None: it can): it is created if missing and a
    small file is written into it and removed."""
    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as e:
        return f"--save {save_dir}: cannot create the directory ({e.strerror})"
    code = _probe(save_dir, f"write-test.{rank}", 1)
    if code is not None:
        return f"--save {save_dir}: cannot write into it ({os.strerror(code)})"
    return None


def describe_failure(error: BaseException, path: str) -> str:
    """What went wrong while writing checkpoint ``path``. A full disk is recognised by the errno,
    by its text inside another library's error (safetensors), or, for a write failure that says
    nothing of its cause (PyTorch's zip writer: ``[enforce fail at inline_container.cc]
    unexpected pos``), by a 1 MB probe written next to the partial files."""
    code = getattr(error, "errno", None)
    if code not in _NO_SPACE:  # an OSError's text inside another error (safetensors': "os error 28")
        text = str(error)
        code = next((c for c in _NO_SPACE if os.strerror(c) in text or f"os error {c})" in text),
                    None)
    if code is None:
        code = _probe(os.path.dirname(path.rstrip(os.sep)) or ".", f"space-probe.{os.getpid()}",
                      _PROBE_BYTES)
    if code in _NO_SPACE:
        return f"{_NO_SPACE[code]} while saving {path}"
    return f"saving {path} failed: {type(error).__name__}: {error}"


def _probe(directory: str, name: str, size: int) -> Optional[int]:
    """The errno of writing (and fsyncing) ``size`` bytes into ``directory``; None if it works."""
    path = os.path.join(directory, TMP + name)
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as e:
        return e.errno
    finally:
        try:
            os.remove(path)
        except OSError:
            pass  # never created, or gone with the directory


def failed(save_dir: str, tag: str, description: str) -> CheckpointError:
    """The error of a save of ``tag`` that failed as ``description`` says and was discarded."""
    latest = read_latest(save_dir)
    kept = (f"{os.path.join(save_dir, LATEST)} still names {latest}" if latest
            else f"{save_dir} holds no complete checkpoint")
    return CheckpointError(f"{description}; the partial {tag} was removed, {kept}")


def discard(path: str) -> None:
    """Remove the partial tag directory ``path`` of a failed save, as far as possible."""
    shutil.rmtree(path, ignore_errors=True)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _megabytes(path: str) -> str:
    if os.path.isfile(path):
        total = os.path.getsize(path)
    else:
        total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns)
    return f"{total / 2**20:.1f} MB"
