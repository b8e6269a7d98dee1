"""Checkpoints: exact resume (TP=2, ZeRO-0 and ZeRO-3, dropout on), the `latest` pointer never
names a partial save, and a --load that is missing or does not match stops with the reason."""
import os

import pytest

from megatron_normformer.config import ConfigError
from megatron_normformer.testing import spawn
from train_utils import flags, train_many

DROPOUT = "--hidden-dropout 0.1 --attention-dropout 0.1"


CASES = {0: {}, 3: {}, "bf16-zero1": {"bf16": True}}  # bf16: DeepSpeed's CPU accelerator has it


def _argv(case, iters, **kw):
    zero = 1 if case == "bf16-zero1" else case
    return flags("--mock-data", DROPOUT, train_iters=6, global_batch_size=4, micro_batch_size=2,
                 tensor_model_parallel_size=2, zero_stage=zero, **CASES[case], **kw) + (
        ["--exit-interval", str(iters)] if iters < 6 else [])


def _resume_runs(tmp):
    """Straight 6 iterations vs 3 + save + resume + 3, for ZeRO-0, ZeRO-3 and bf16 ZeRO-1
    (world 2, TP 2)."""
    out = {}
    for zero in CASES:
        save = os.path.join(tmp, f"z{zero}")
        straight = train_many([_argv(zero, 6)])[0]
        first = train_many([_argv(zero, 3, save=save)])[0]
        second = train_many([_argv(zero, 6, save=save, load=save)])[0]
        with open(os.path.join(save, "latest")) as f:
            latest = f.read()
        out[zero] = dict(straight=straight["losses"], first=first["losses"], second=second["losses"],
                         latest=latest, tags=sorted(os.listdir(save)))
    return out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    return spawn(_resume_runs, 2, str(tmp_path_factory.mktemp("ckpt")))[0]


@pytest.mark.parametrize("zero", list(CASES))
def test_resume_is_exact(resumed, zero):
    r = resumed[zero]
    assert sorted(r["first"]) == [1, 2, 3] and sorted(r["second"]) == [4, 5, 6]
    joined = {**r["first"], **r["second"]}
    for it, loss in r["straight"].items():
        assert abs(joined[it] - loss) <= 1e-6 * abs(loss), (it, joined[it], loss)
    assert r["latest"] == "iter_0000006"
    assert [t for t in r["tags"] if t.startswith("iter_")] == ["iter_0000003", "iter_0000006"]


def test_bf16_tracks_fp32(resumed):
    # Same seed and data: bf16 rounding moves the losses by far less than training does.
    bf16, fp32 = resumed["bf16-zero1"]["straight"], resumed[0]["straight"]
    for it in fp32:
        assert abs(bf16[it] - fp32[it]) <= 2e-2 * abs(fp32[it]), (it, bf16[it], fp32[it])
    assert bf16 != fp32  # it really ran in bf16


def _interrupted_save(tmp):
    """Iteration 2 saves fine; the save at iteration 4 dies inside DeepSpeed's save_checkpoint."""
    import deepspeed

    save = os.path.join(tmp, "ckpt")
    argv = flags("--mock-data", train_iters=4, global_batch_size=2, save=save, save_interval=2)
    original = deepspeed.DeepSpeedEngine.save_checkpoint

    def dying(self, save_dir, tag=None, **kw):
        if tag.endswith("iter_0000004"):  # the temporary directory the tag is written into
            os.makedirs(os.path.join(save_dir, tag), exist_ok=True)  # half-written directory
            raise KeyboardInterrupt("killed mid-save")
        return original(self, save_dir, tag=tag, **kw)

    deepspeed.DeepSpeedEngine.save_checkpoint = dying
    try:
        train_many([argv])
        raise AssertionError("the save should have died")
    except KeyboardInterrupt:
        pass
    finally:
        deepspeed.DeepSpeedEngine.save_checkpoint = original
    with open(os.path.join(save, "latest")) as f:
        latest = f.read()
    # Resuming from it continues from iteration 2.
    resumed = train_many([flags("--mock-data", train_iters=4, global_batch_size=2, load=save)])[0]
    straight = train_many([flags("--mock-data", train_iters=4, global_batch_size=2)])[0]
    errors = {}
    for name, extra in (("missing", dict(load=os.path.join(tmp, "nowhere"))),
                        ("mismatch", dict(load=save, hidden_size=64))):
        try:
            train_many([flags("--mock-data", train_iters=4, global_batch_size=2, **extra)])
        except ConfigError as e:
            errors[name] = str(e)
    return dict(latest=latest, resumed=resumed["losses"], straight=straight["losses"],
                errors=errors, tags=sorted(os.listdir(save)))


def test_interrupted_save_keeps_latest_and_bad_loads_are_named(tmp_path):
    r = spawn(_interrupted_save, 1, str(tmp_path))[0]
    assert r["latest"] == "iter_0000002"
    # The partial directory is the temporary one, ignored (and removed by the next run that saves).
    assert ".tmp.iter_0000004" in r["tags"] and "iter_0000004" not in r["tags"]
    assert sorted(r["resumed"]) == [3, 4]
    for it in (3, 4):
        assert abs(r["resumed"][it] - r["straight"][it]) <= 1e-6 * abs(r["straight"][it])
    assert "nowhere: no such directory" in r["errors"]["missing"]
    assert "hidden_size: checkpoint 32 vs this run 64" in r["errors"]["mismatch"]
