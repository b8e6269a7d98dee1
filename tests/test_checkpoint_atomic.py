"""Checkpoint writes are atomic and their failures say what happened: a save killed while it
rewrites the tag `latest` names leaves the previous complete state (or a refusal), never a mix; a
full disk fails every rank with one message and keeps the earlier checkpoints; an unwritable --save
stops the start; the converter never replaces what it reads; one model-compatibility rule for
every load; one file mode."""
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_normformer.checkpoint import atomic
from megatron_normformer.checkpoint.universal import check_same_model
from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.testing import spawn
from train_utils import PYTHON, ROOT, flags, train_many

TAG = "iter_0000004"


def _argv(**kw):
    return flags("--mock-data", global_batch_size=2, **kw)


def _digest(tag_dir):
    """{relative path: sha256} of every file of a tag."""
    out = {}
    for directory, _, names in os.walk(tag_dir):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, tag_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _modes(tag_dir):
    """{relative path: permission bits}, DeepSpeed's executable recovery scripts (*.py) aside."""
    return {os.path.relpath(os.path.join(d, n), tag_dir): os.stat(os.path.join(d, n)).st_mode & 0o777
            for d, _, names in os.walk(tag_dir) for n in names if not n.endswith(".py")}


def _train_logged(argv):
    """(losses, what the run printed), or (the ConfigError's message, printed)."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        try:
            return train_many([argv])[0]["losses"], log.getvalue()
        except ConfigError as e:
            return str(e), log.getvalue()


def _kill(*args, **kwargs):
    raise KeyboardInterrupt()  # not an Exception: no handler of the save runs, as under SIGKILL


def _killed(argv):
    try:
        train_many([argv])
    except KeyboardInterrupt:  # what the patched step raised: a kill, no handler runs
        return
    raise AssertionError("the save should have been killed")


def _rewrite_killed(tmp):
    """A checkpoint whose `latest` names iter_0000004, rewritten by `--finetune --load S --save S`
    (which saves iteration 4 again) and killed (1) while writing, (2) between moving the old version
    aside and renaming the new one in; then the next start."""
    from megatron_normformer.checkpoint import training as checkpointing

    ref = os.path.join(tmp, "ref")
    train_many([_argv(train_iters=6, save=ref, save_interval=2, exit_interval=4)])
    continued = train_many([_argv(train_iters=6, load=ref)])[0]["losses"]
    before = _digest(os.path.join(ref, TAG))
    out = dict(continued=continued, modes=_modes(os.path.join(ref, TAG)))

    def rewrite(save):
        return _argv(train_iters=6, load=save, save=save, finetune=True, save_interval=4)

    # (1) killed after DeepSpeed's files and the RNG states, before the universal state.
    s1 = os.path.join(tmp, "s1")
    shutil.copytree(ref, s1)
    original = checkpointing.save_universal
    checkpointing.save_universal = _kill
    try:
        _killed(rewrite(s1))
    finally:
        checkpointing.save_universal = original
    out["s1"] = dict(listing=sorted(os.listdir(s1)), same=_digest(os.path.join(s1, TAG)) == before,
                     partial=sorted(os.listdir(os.path.join(s1, ".tmp." + TAG))))
    out["s1"]["losses"], out["s1"]["log"] = _train_logged(
        _argv(train_iters=6, load=s1, save=s1, save_interval=100))
    out["s1"]["after"] = sorted(os.listdir(s1))

    # (2) killed right after the old version was moved aside: the complete new one is not in place.
    s2 = os.path.join(tmp, "s2")
    shutil.copytree(ref, s2)
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        if os.path.basename(dst) == atomic.REPLACED + TAG:
            raise KeyboardInterrupt()

    os.rename = rename
    try:
        _killed(rewrite(s2))
    finally:
        os.rename = real_rename
    out["s2"] = dict(listing=sorted(os.listdir(s2)),
                     same=_digest(os.path.join(s2, atomic.REPLACED + TAG)) == before)
    out["s2"]["refused"], _ = _train_logged(_argv(train_iters=6, load=s2))  # no --save: no repair
    out["s2"]["losses"], out["s2"]["log"] = _train_logged(
        _argv(train_iters=6, load=s2, save=s2, save_interval=100))
    out["s2"]["after"] = sorted(os.listdir(s2))
    return out


@pytest.fixture(scope="module")
def rewrite(tmp_path_factory):
    return spawn(_rewrite_killed, 1, str(tmp_path_factory.mktemp("rewrite")))[0]


def _assert_same(losses, reference):
    assert sorted(losses) == [5, 6], losses
    for it in (5, 6):
        assert abs(losses[it] - reference[it]) <= 1e-6 * abs(reference[it]), (it, losses, reference)


def test_killed_while_writing_leaves_the_previous_version(rewrite):
    r = rewrite["s1"]
    assert r["listing"] == [".tmp." + TAG, "iter_0000002", TAG, "latest"]
    assert r["same"]  # the tag `latest` names is byte for byte the previous save
    assert "mp_rank_00_model_states.pt" in r["partial"] and "run.json" not in r["partial"]
    # The next start removes the partial directory, says so, and resumes from the previous state.
    assert f"removed .tmp.{TAG} (" in r["log"] and "left by a killed save" in r["log"]
    _assert_same(r["losses"], rewrite["continued"])
    assert r["after"] == ["iter_0000002", TAG, "iter_0000006", "latest"]


def test_killed_between_the_renames_refuses_then_restores(rewrite):
    r = rewrite["s2"]
    assert r["listing"] == [atomic.REPLACED + TAG, ".tmp." + TAG, "iter_0000002", "latest"]
    assert r["same"]
    assert f"a save replacing '{TAG}' was killed" in r["refused"]
    assert f"rename it to {TAG}" in r["refused"]
    assert f"put {TAG} back from {atomic.REPLACED + TAG}" in r["log"]
    _assert_same(r["losses"], rewrite["continued"])
    assert r["after"] == ["iter_0000002", TAG, "iter_0000006", "latest"]


def test_every_checkpoint_file_has_one_mode(rewrite):
    modes = rewrite["modes"]
    assert any(p.startswith("universal/") and p.endswith(".safetensors") for p in modes)
    assert set(modes.values()) == {atomic.file_mode()}, modes


# -- a full disk, an unwritable --save -----------------------------------------------------------

def _disk_full(tmp):
    """2 data-parallel ranks; rank 1's write of its RNG states at iteration 4 finds the disk full."""
    import torch.distributed as dist

    from megatron_normformer.training.loop import TrainingError

    save = os.path.join(tmp, "ck")
    real_save = torch.save

    def full(obj, f, *a, **k):
        if dist.get_rank() == 1 and isinstance(f, str) and TAG in f:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f)
        return real_save(obj, f, *a, **k)

    torch.save = full
    try:
        train_many([_argv(train_iters=6, save=save, save_interval=2)])
        message = None
    except TrainingError as e:
        message = str(e)
    finally:
        torch.save = real_save
    dist.barrier()
    listing = sorted(os.listdir(save))
    unwritable = {}
    blocker = os.path.join(tmp, "a-file")
    open(blocker, "w").close()
    for name, path in (("under a file", os.path.join(blocker, "ck")),):
        try:
            train_many([_argv(train_iters=2, save=path)])
        except ConfigError as e:
            unwritable[name] = str(e)
    return dict(message=message, listing=listing, unwritable=unwritable, save=save)


def test_disk_full_fails_every_rank_and_keeps_the_last_checkpoint(tmp_path):
    ranks = spawn(_disk_full, 2, str(tmp_path))
    save = ranks[0]["save"]
    expected = (f"iteration 4: no space left on device while saving {save}/{TAG} (rank 1); the "
                f"partial {TAG} was removed, {save}/latest still names iter_0000002")
    assert [r["message"] for r in ranks] == [expected, expected]
    assert ranks[0]["listing"] == ["iter_0000002", "latest"]
    blocked = os.path.join(str(tmp_path), "a-file", "ck")
    assert ranks[0]["unwritable"] == {
        "under a file": f"--save {blocked}: cannot create the directory (Not a directory)"}


_FULL_DISK_LAUNCH = """
import errno, os, sys, torch
real = torch.save
def full(obj, f, *a, **k):
    if isinstance(f, str) and "iter_0000004" in f:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    return real(obj, f, *a, **k)
torch.save = full
import megatron_normformer.checkpoint.atomic as atomic
probe = atomic._probe
# The 1 MB probe that follows a failed write finds the disk full.
atomic._probe = lambda d, name, size: errno.ENOSPC if name.startswith("space") else probe(d, name, size)
sys.argv = ["pretrain_gpt.py"] + sys.argv[1:]
from megatron_normformer.training.pretrain import launch
launch()
"""


def test_full_disk_ends_the_launch_with_one_line(tmp_path):
    """PyTorch's own write error (no errno) on a full disk: the probe names the cause."""
    save = str(tmp_path / "ck")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run([PYTHON, "-c", _FULL_DISK_LAUNCH,
                           *_argv(train_iters=6, save=save, save_interval=2)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert (f"error: iteration 4: no space left on device while saving {save}/{TAG}; the partial "
            f"{TAG} was removed, {save}/latest still names iter_0000002") in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(os.listdir(save)) == ["iter_0000002", "latest"]


def test_write_failures_are_described(tmp_path):
    path = str(tmp_path / TAG)
    assert atomic.describe_failure(OSError(errno.ENOSPC, "x"), path) == \
        f"no space left on device while saving {path}"
    assert atomic.describe_failure(OSError(errno.EDQUOT, "x"), path) == \
        f"disk quota exceeded while saving {path}"
    # Without an errno, a probe decides: here the disk has room, so the error is given as it was.
    assert atomic.describe_failure(RuntimeError("unexpected pos 64"), path) == \
        f"saving {path} failed: RuntimeError: unexpected pos 64"
    assert os.listdir(tmp_path) == []  # the probe removed itself


# -- repair -------------------------------------------------------------------------------------

def test_repair_removes_what_killed_saves_left(tmp_path):
    def touch(*parts, size=0):
        path = os.path.join(tmp_path, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"\0" * size)

    touch(".tmp.iter_0000009", "universal", ".tmpk3Xq1z", size=2 << 20)
    touch(".tmp.latest")
    touch("latest.tmp.4242")  # earlier versions wrote each file in place through these
    touch("iter_0000005", "run.json")
    touch("iter_0000005", "rng_rank00001.pt.tmp.77")
    touch("iter_0000005", "universal", ".tmpAbC123", size=1 << 20)
    touch("iter_0000005", "universal", "tp00_pp00_dp000.safetensors")
    touch(".replaced.iter_0000003", "run.json")  # iter_0000003 is in place: obsolete
    touch("iter_0000003", "run.json")
    touch("tensorboard", "events.tmp")  # not a checkpoint: left alone
    with open(tmp_path / "latest", "w") as f:
        f.write("iter_0000005")
    done = atomic.repair(str(tmp_path))
    assert done == [
        "removed .replaced.iter_0000003 (0.0 MB), left by a killed save",
        "removed .tmp.iter_0000009 (2.0 MB), left by a killed save",
        "removed .tmp.latest (0.0 MB), left by a killed save",
        "removed iter_0000005/rng_rank00001.pt.tmp.77 (0.0 MB), left by a killed save",
        "removed iter_0000005/universal/.tmpAbC123 (1.0 MB), left by a killed save",
        "removed latest.tmp.4242 (0.0 MB), left by a killed save",
    ]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "iter_0000005", "latest", "tensorboard"]
    assert os.listdir(tmp_path / "iter_0000005" / "universal") == ["tp00_pp00_dp000.safetensors"]
    assert os.listdir(tmp_path / "tensorboard") == ["events.tmp"]
    assert atomic.repair(str(tmp_path)) == []


# -- the converter ------------------------------------------------------------------------------

CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128,
                  max_position_embeddings=16)


def _full_state():
    from megatron_normformer.model.gpt import GPTModel
    from megatron_normformer.parallel.state import SingleProcessState

    torch.manual_seed(0)
    model = GPTModel(CFG, SingleProcessState())
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _tool(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *args],
                          capture_output=True, text=True)


def test_convert_never_replaces_what_it_reads(tmp_path):
    from megatron_normformer.checkpoint.convert import from_full_state, reshard

    src = str(tmp_path / "src")
    from_full_state(_full_state(), CFG, src, 1, 1)
    before = _digest(os.path.join(src, "iter_0000000"))
    done = _tool("--load", src, "--save", src, "--target-tp", "2")
    assert done.returncode == 2, done.stderr
    assert (f"error: --save {src} would replace the checkpoint being read ({src}/iter_0000000); "
            "write the converted checkpoint to another directory") in done.stderr
    assert "Traceback" not in done.stderr
    os.symlink(src, tmp_path / "alias")
    for save in (str(tmp_path / "alias"), src + "/"):  # the same directory by another name
        with pytest.raises(ConfigError, match="would replace the checkpoint being read"):
            reshard(src, save, 2, 1)
    assert _digest(os.path.join(src, "iter_0000000")) == before
    assert sorted(os.listdir(src)) == ["iter_0000000", "latest"]
    # Into another directory: written, every file in the one mode.
    reshard(src, str(tmp_path / "tp2"), 2, 1)
    modes = _modes(str(tmp_path / "tp2" / "iter_0000000"))
    assert len(modes) == 4 and set(modes.values()) == {atomic.file_mode()}, modes


def test_convert_that_fails_leaves_the_target_as_it_was(tmp_path, monkeypatch):
    from megatron_normformer.checkpoint import convert

    save = str(tmp_path / "ck")
    convert.from_full_state(_full_state(), CFG, save, 1, 1)
    before = _digest(os.path.join(save, "iter_0000000"))
    calls = []

    def full(tensors, path, metadata):
        calls.append(path)
        if len(calls) == 2:  # the second TP shard
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        atomic.save_safetensors(tensors, path, metadata)

    monkeypatch.setattr(convert, "save_safetensors", full)
    with pytest.raises(atomic.CheckpointError) as info:
        convert.from_full_state(_full_state(), CFG, save, 2, 1)  # rewrites iter_0000000
    assert str(info.value) == (f"no space left on device while saving {save}/iter_0000000; the "
                               f"partial iter_0000000 was removed, {save}/latest still names "
                               "iter_0000000")
    assert sorted(os.listdir(save)) == ["iter_0000000", "latest"]
    assert _digest(os.path.join(save, "iter_0000000")) == before


# -- one model-compatibility rule ---------------------------------------------------------------

def test_one_rule_for_the_model_config():
    now = ModelConfig(vocab_size=128).to_dict()  # a GPT: init scheme fairseq, embedding scaled
    old = {k: v for k, v in now.items()
           if k not in ("init_scheme", "position_embedding_offset", "final_layernorm")}
    check_same_model(old, now, "ck")  # fields the checkpoint predates: their values then
    with pytest.raises(ConfigError, match=r"--load ck: checkpoint does not match this run: "
                                          r"hidden_size: checkpoint 512 vs this run 768$"):
        check_same_model(dict(old, hidden_size=512), now, "ck")
    with pytest.raises(ConfigError, match=r"scale_embedding: checkpoint False vs this run True "
                                          r"\(add --no-scale-embedding"):
        check_same_model(dict(old, scale_embedding=False), now, "ck")
    with pytest.raises(ConfigError, match=r"--load ck: unknown model config fields: \['rope'\]"):
        check_same_model(dict(old, rope=True), now, "ck")


def _old_config_resume(tmp):
    """2 ranks: TP=1 (DP=2) saves at iterations 2 and 4; iteration 2's config is made to predate
    --init-scheme; TP=2 resumes it."""
    import torch.distributed as dist

    save = os.path.join(tmp, "ck")
    straight = train_many([_argv(train_iters=4, save=save, save_interval=2)])[0]["losses"]
    if dist.get_rank() == 0:
        tag_dir = os.path.join(save, "iter_0000002")
        for path, keys in ((os.path.join(tag_dir, "run.json"), ("run", "model")),
                           (os.path.join(tag_dir, "universal", "meta.json"), ("model_config",))):
            with open(path) as f:
                meta = json.load(f)
            model = meta
            for key in keys:
                model = model[key]
            del model["init_scheme"]
            with open(path, "w") as f:
                json.dump(meta, f)
        atomic.write_text(os.path.join(save, "latest"), "iter_0000002")
    dist.barrier()
    resumed = train_many([_argv(train_iters=4, load=save, tensor_model_parallel_size=2)])[0]
    return straight, resumed["losses"]


def test_old_config_checkpoint_resumes_in_another_layout(tmp_path):
    straight, resumed = spawn(_old_config_resume, 2, str(tmp_path))[0]
    assert sorted(resumed) == [3, 4]
    for it in (3, 4):
        assert abs(resumed[it] - straight[it]) <= 1e-5 * abs(straight[it]), (it, resumed, straight)
