"""A run whose loss or gradients stop being finite stops, at every ZeRO stage and precision.

- ``--check-for-nan-in-loss-and-grad`` (on by default): a non-finite loss or gradient norm ends
  the run with one line naming the iteration, exit status 1, before anything of that iteration is
  saved, single process and TP=2 (every rank decides together). At ZeRO >= 1 DeepSpeed skips an
  inf-gradient step, which the loop used to take for an fp16 loss-scale skip and train on.
- fp16's loss-scale skips are counted and go on, up to ``--max-consecutive-skipped-iterations``
  in a row or an overflow at ``--min-loss-scale``, each a one-line stop. A non-finite loss under
  fp16 stops at once. (torch runs fp16 on any CPU; DeepSpeed's accelerator claims it only with
  fp16 kernels, so it is told so here where it does not.)
- ``--no-check-for-nan-in-loss-and-grad`` trains on; ``--lr`` beyond what float32 can apply is a
  configuration error.
"""
import os
import re
import subprocess

import pytest

from megatron_normformer.config import ConfigError
from megatron_normformer.testing import free_port, spawn
from train_utils import PYTHON, ROOT, flags

NAN = "--mock-data --lr 1e20 --lr-warmup-iters 0"
VENV_BIN = os.path.dirname(PYTHON)


def _run(cmd, save):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    tags = sorted(t for t in os.listdir(save) if t.startswith("iter_")) if os.path.isdir(save) else []
    latest = open(os.path.join(save, "latest")).read() if tags else None
    return p, tags, latest


@pytest.mark.parametrize("precision", ["", "--bf16"])
@pytest.mark.parametrize("tp", [1, 2])
def test_nan_stops_before_saving_at_zero1(tmp_path, precision, tp):
    """lr 1e20: iteration 1 is finite, iteration 2's loss is NaN and its gradient norm inf."""
    save = str(tmp_path / "ck")
    argv = flags(NAN, precision, train_iters=6, global_batch_size=4, micro_batch_size=2,
                 zero_stage=1, tensor_model_parallel_size=tp, save=save, save_interval=1)
    launcher = [PYTHON] if tp == 1 else [os.path.join(VENV_BIN, "torchrun"), "--nproc-per-node",
                                         "2", "--master-port", str(free_port())]
    p, tags, latest = _run([*launcher, "pretrain_gpt.py", *argv], save)
    assert p.returncode == 1, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if re.match(r"(pretrain_gpt\.py: )?error: ", line)]
    assert len(errors) == 1 and errors[0].split("error: ", 1)[1].startswith(
        "iteration 2: lm loss is nan, gradient norm inf; stopped before saving, the last "
        f"checkpoint is {save}/iter_0000001"), p.stderr[-3000:]
    assert "Traceback" not in p.stderr.split(errors[0])[0]  # none from the trainer itself
    assert tags == ["iter_0000001"] and latest == "iter_0000001"
    assert " iteration        2/" not in p.stdout  # nothing of iteration 2 logged either


def _fp16_runs(runs):
    """spawn() target: each argv trained in turn with DeepSpeed's accelerator claiming fp16; a
    TrainingError's message recorded instead of the summary."""
    from deepspeed.accelerator import get_accelerator

    from megatron_normformer.training.loop import TrainingError
    from megatron_normformer.training.pretrain import train_from_argv

    accelerator = get_accelerator()
    if not accelerator.is_fp16_supported():
        type(accelerator).is_fp16_supported = lambda self: True
    out = []
    for argv in runs:
        try:
            s = train_from_argv(argv)
            out.append({"skipped": s.skipped_iters, "losses": s.losses})
        except TrainingError as e:
            out.append({"error": str(e)})
    return out + [_decisions()]


def _decisions():
    """NonFiniteCheck's verdicts on made-up iterations (it all-reduces: inside spawn())."""
    from types import SimpleNamespace

    from megatron_normformer.training.loop import NonFiniteCheck

    def check(fp16=False, on=True, static=None):
        train = SimpleNamespace(check_for_nan_in_loss_and_grad=on, fp16=fp16, loss_scale=static,
                                max_consecutive_skipped_iterations=3)
        return NonFiniteCheck(SimpleNamespace(train=train))

    inf, nan = float("inf"), float("nan")
    fp16 = check(fp16=True)
    return {
        "finite": check()(1, 5.0, 2.0, False, 1.0),
        "nan loss": check()(1, nan, None, False, 1.0),
        "inf norm": check()(1, 5.0, inf, False, 1.0),
        "skipped, no norm": check()(1, 5.0, None, True, 1.0),
        "weights": check()(1, 5.0, None, False, 1.0, params_norm=inf),
        "unchecked": [check(on=False)(1, nan, inf, True, 1.0, params_norm=inf)],
        "static fp16": check(fp16=True, static=1024.0)(1, 5.0, inf, True, 1024.0),
        "fp16": [fp16(i, 5.0, inf if skip else 1.0, skip, 2.0 ** -i)
                 for i, skip in enumerate([True, True, False, True, True, True], 1)],
    }


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    tiny = dict(global_batch_size=2, micro_batch_size=2)
    runs = {
        "2^32": flags("--mock-data --fp16", train_iters=18, **tiny),
        # DeepSpeed's ZeRO-0 wrapper halves at every overflow and keeps skipping at the minimum.
        "bounded": flags("--mock-data --fp16", train_iters=18, min_loss_scale=2.0 ** 30,
                         max_consecutive_skipped_iterations=6, **tiny),
        # ZeRO-1's scaler halves after --hysteresis and raises at the minimum.
        "min-scale": flags("--mock-data --fp16", train_iters=18, min_loss_scale=2.0 ** 30,
                           hysteresis=1, zero_stage=1, **tiny),
        "nan": flags(NAN, "--fp16", train_iters=6, initial_loss_scale=1024, **tiny),
        "static": flags("--mock-data --fp16", train_iters=6, loss_scale=2.0 ** 32, **tiny),
        "unchecked": flags(NAN, "--bf16 --no-check-for-nan-in-loss-and-grad", train_iters=4,
                           zero_stage=1, **tiny),
    }
    results = spawn(_fp16_runs, 1, list(runs.values()))[0]
    return {**dict(zip(runs, results)), "decisions": results[-1]}


def test_fp16_loss_scale_skips_are_counted_and_go_on(fp16):
    """Megatron's initial scale 2^32 overflows for the first iterations: skipped, counted, and the
    run trains on once the scale has come down."""
    skipped = list(fp16["2^32"]["skipped"].values())
    assert skipped[0] == 1 and sum(skipped) >= 5 and skipped[-1] == 0, skipped
    assert sum(skipped) < 18


def test_fp16_consecutive_skips_are_bounded(fp16):
    """At a minimum scale of 2^30 every step overflows: ZeRO-0's wrapper would skip forever, the
    bound stops it; ZeRO-1's scaler halves 2^32 twice, then overflows at the minimum."""
    assert fp16["bounded"]["error"].startswith(
        "iteration 6: 6 consecutive iterations skipped because the fp16 gradients overflow, down to "
        "loss scale 1.07374e+09 (--max-consecutive-skipped-iterations 6); stopped, no checkpoint")
    assert fp16["min-scale"]["error"].startswith(
        "iteration 3: the fp16 gradients overflow at the minimum loss scale (--min-loss-scale "
        "1.07374e+09); stopped")


def test_fp16_nan_loss_is_not_a_loss_scale_skip(fp16):
    assert fp16["nan"]["error"].startswith("iteration 2: lm loss is nan")


def test_fp16_static_loss_scale_overflow_stops(fp16):
    """A static --loss-scale never moves, so an overflow is non-finite gradients, as Megatron's
    check (on with a static scale) has it: 2^32 overflows at once."""
    assert fp16["static"]["error"].startswith("iteration 1: gradient norm is nan; stopped")


def test_no_check_trains_on(fp16):
    """--no-check-for-nan-in-loss-and-grad: the NaN run of the ZeRO-1 test trains to the end, its
    inf-gradient steps skipped by DeepSpeed and counted."""
    run = fp16["unchecked"]
    assert "error" not in run and sorted(run["losses"]) == [1, 2, 3, 4]
    assert list(run["skipped"].values()) == [0, 1, 1, 1]


def test_what_stops_a_run(fp16):
    """The decision table: a non-finite loss, gradient norm, skipped step or (where the engine
    reports no norm: DeepSpeed's pipeline at ZeRO-0) weights after the step stop the run; fp16's
    dynamic-scale skips count, a clean step resets the count, the bound stops."""
    d = fp16["decisions"]
    assert d["finite"] is None
    assert d["nan loss"] == "lm loss is nan"
    assert d["inf norm"] == "gradient norm is inf"
    assert d["skipped, no norm"] == "the gradients are not finite (DeepSpeed skipped the step)"
    assert d["weights"] == "the weights are not finite after the step (a non-finite gradient)"
    assert d["unchecked"] == [None]
    assert d["static fp16"] == "gradient norm is inf"
    assert d["fp16"][:5] == [None] * 5 and d["fp16"][5] == (
        "3 consecutive iterations skipped because the fp16 gradients overflow, down to loss scale "
        "0.015625 (--max-consecutive-skipped-iterations 3)")


def test_deepspeed_loss_scaler_gives_up_as_the_loop_expects():
    """The loop turns DeepSpeed's "cannot decrease scale anymore" exception into its one line
    (training/step.py, loss_scale_exhausted); this fails the day DeepSpeed raises otherwise."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from megatron_normformer.training.step import loss_scale_exhausted

    scaler = DynamicLossScaler(init_scale=2.0, scale_window=1000, min_scale=2.0, delayed_shift=1,
                               consecutive_hysteresis=False)
    with pytest.raises(Exception) as caught:
        scaler.update_scale(True)  # an overflow at the minimum
    assert loss_scale_exhausted(caught.value)
    assert not loss_scale_exhausted(RuntimeError("Current loss scale already at minimum"))


@pytest.mark.parametrize("extra, message", [
    ("--lr 1e38", r"--lr 1e\+38 is too large for float32: Adam's first update is --lr / "
                  r"\(1 - --adam-beta1\) = 1e\+39, beyond float32's largest value 3.4e\+38"),
    ("--lr 4e38 --optimizer sgd", r"--lr 4e\+38 is beyond float32's largest value"),
    ("--lr inf", "--lr must be a finite number, got inf"),
    ("--lr nan", "--lr must be a finite number, got nan"),
    ("--adam-beta1 1", r"--adam-beta1 must be in \[0, 1\), got 1.0"),
    ("--max-consecutive-skipped-iterations 0", "--max-consecutive-skipped-iterations must be positive"),
])
def test_unusable_numbers_are_configuration_errors(extra, message):
    from megatron_normformer.arguments import build_pretrain_parser, run_config_from_args

    args = build_pretrain_parser().parse_args(flags("--mock-data", train_iters=1) + extra.split())
    with pytest.raises(ConfigError, match=message):
        run_config_from_args(args)


def test_lr_overflow_is_one_line(tmp_path):
    p = subprocess.run([PYTHON, "pretrain_gpt.py", *flags("--mock-data --lr 1e38", train_iters=1)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "error: --lr 1e+38 is too large for float32" in p.stderr.splitlines()[-1]
