"""Megatron-LM's training flags with Megatron's meaning.

- ``--eod-mask-loss`` / ``--reset-position-ids`` / ``--reset-attention-mask``: a packed row of two
  documents gives each document the per-token losses it has alone; training with the flags gives
  the same losses with and without tensor / pipeline parallelism.
- ``--recompute-granularity full|selective``, ``--recompute-method uniform|block``: the losses of
  the plain run (with dropout).
- ``--rampup-batch-size``: Megatron's batch schedule; a resume mid-ramp gives the uninterrupted
  run's losses.
- ``--lr-warmup-samples`` / ``--lr-decay-samples`` / ``--lr-warmup-fraction``: the
  iteration-counted schedule's rates.
- ``--finetune``, ``--override-opt_param-scheduler`` / ``--use-checkpoint-opt_param-scheduler``,
  ``--exit-duration-in-mins``, ``--log-params-norm`` (the same norm in every layout),
  ``--data-impl``.
- A Megatron-DeepSpeed script's logging flags: ``--tensorboard-log-interval``,
  ``--no-log-loss-scale-to-tensorboard``, ``--timing-log-level`` with
  ``--log-timers-to-tensorboard`` (the timers each level adds), ``--log-optimizer-states-to-tensorboard``
  and ``--log-num-zeros-in-grad`` (the same at TP=2 ZeRO-1 and DP=2 ZeRO-0).
- ``--optimizer sgd`` (its momentum resumed in another layout), ``--no-save-optim`` /
  ``--no-save-rng`` (what the checkpoint holds, what the resume does) and ``--use-checkpoint-args``.
"""
import json
import os

import pytest
import torch

from megatron_normformer.arguments import build_pretrain_parser, run_config_from_args
from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.data.document_masks import DocumentMasking
from megatron_normformer.model.attention import document_causal_mask
from megatron_normformer.model.gpt import GPTModel
from megatron_normformer.parallel.state import SingleProcessState
from megatron_normformer.testing import spawn
from megatron_normformer.config import BatchRamp
from megatron_normformer.training.schedule import LRSchedule
from train_utils import assert_close, flags, make_null_dataset

EOD = 127


def _model(position_embedding_type="sinusoidal"):
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                      vocab_size=128, max_position_embeddings=32, hidden_dropout=0.0,
                      attention_dropout=0.0, scale_attn=True, scale_fc=True, scale_heads=True,
                      scale_resids=True, position_embedding_type=position_embedding_type)
    return GPTModel(cfg, SingleProcessState(), seed=3).eval()


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_document_masks_give_each_document_its_own_losses(positions):
    model = _model(positions)
    g = torch.Generator().manual_seed(0)
    doc_a = torch.cat([torch.randint(0, EOD, (6,), generator=g), torch.tensor([EOD])])
    doc_b = torch.randint(0, EOD, (10,), generator=g)
    row = torch.cat([doc_a, doc_b]).unsqueeze(0)  # 17 tokens: 16 inputs, 16 targets
    inputs, labels = row[:, :-1], row[:, 1:]
    fields = DocumentMasking(EOD, True, True, True).fields(inputs)
    packed = model(inputs, labels, position_ids=fields["position_ids"],
                   attention_mask=document_causal_mask(fields["segment_ids"]))[0]
    alone_a = model(doc_a[None, :-1], doc_a[None, 1:])[0]
    alone_b = model(doc_b[None, :-1], doc_b[None, 1:])[0]
    # Inputs 0-5 are doc A predicting its own next tokens; input 6 (its EOD) predicts B's first
    # token, which --eod-mask-loss drops; inputs 7-15 are doc B.
    torch.testing.assert_close(packed[:6], alone_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[7:], alone_b, rtol=1e-5, atol=1e-6)
    assert fields["loss_mask"][0].tolist() == [1.0] * 6 + [0.0] + [1.0] * 9
    plain = model(inputs, labels)[0]
    assert (plain[7:] - alone_b).abs().max() > 1e-3  # without the flags B sees A
    # No end-of-document token: the explicit mask is the plain causal one (SDPA's is_causal path).
    clean = torch.randint(0, EOD, (2, 16), generator=g)
    f = DocumentMasking(EOD, False, True, True).fields(clean)
    torch.testing.assert_close(model(clean, clean, position_ids=f["position_ids"],
                                     attention_mask=document_causal_mask(f["segment_ids"])),
                               model(clean, clean), rtol=1e-6, atol=1e-6)


def test_batch_ramp_follows_megatrons_schedule():
    # start 2, +2 per step, over 12 samples to 8: 3 increments, one every 4 samples.
    ramp = BatchRamp(2, 2, 12, 8)
    consumed, sizes = 0, []
    for _ in range(7):
        sizes.append(ramp.global_batch(consumed))
        consumed += sizes[-1]
    # consumed before each step: 0, 2, 4, 8, 14 (> 12: final), 22, 30
    assert sizes == [2, 2, 4, 6, 8, 8, 8]
    # Megatron: ramp iterations while consumed <= 12 (0, 2, 4, 8 -> 4 iterations, 14 consumed),
    # then (40 - 14) // 8 = 3 more.
    assert ramp.iterations(40) == 7 and ramp.samples(7) == 38


def _run(argv):
    args = build_pretrain_parser().parse_args(argv)
    return run_config_from_args(args)


def _rates(run, steps, batch):
    warmup, decay = run.lr_schedule_samples(batch)
    s = LRSchedule(None, run.optim.lr, run.optim.min_lr, warmup, decay, run.optim.lr_decay_style,
                   batch_size=batch)
    out = []
    for _ in range(steps):
        out.append(s.current_lr())
        s.step()
    return out


def test_samples_schedule_equals_iteration_schedule():
    iters = _run(flags("--mock-data --lr-decay-style cosine", train_iters=10, lr_warmup_iters=2,
                       lr_decay_iters=8, global_batch_size=4))
    samples = _run(flags("--mock-data --lr-decay-style cosine", train_samples=40, lr_warmup_iters=0,
                         lr_warmup_samples=8, lr_decay_samples=32, global_batch_size=4))
    tokens = _run(flags("--mock-data --lr-decay-style cosine", train_samples=40, lr_warmup_iters=0,
                        lr_warmup_tokens=8 * 16, lr_decay_tokens=32 * 16, global_batch_size=4))
    fraction = _run(flags("--mock-data --lr-decay-style cosine", train_iters=10, lr_warmup_iters=0,
                          lr_warmup_fraction=0.25, lr_decay_iters=8, global_batch_size=4))
    ref = _rates(iters, 10, 4)
    assert ref[0] == pytest.approx(3e-3 / 2) and ref[1] == pytest.approx(3e-3) and ref[-1] == 0.0
    for run in (samples, tokens, fraction):
        assert _rates(run, 10, 4) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("extra, message", [
    ("--train-iters 4 --lr-warmup-samples 8", "--lr-warmup-samples goes with --train-samples"),
    ("--train-iters 4 --lr-warmup-iters 2 --lr-warmup-fraction 0.1", "give one warm-up length"),
    ("--train-iters 4 --data-impl lazy", "--data-impl lazy: only mmap"),
    ("--train-iters 4 --finetune", "--finetune needs --load"),
    ("--train-iters 4 --global-batch-size 8 --rampup-batch-size 2 2 8", "needs --train-samples"),
    ("--train-samples 40 --global-batch-size 8 --rampup-batch-size 2 4 8", "multiple of the increment"),
    ("--train-iters 4 --recompute-method block", "needs --recompute-granularity full"),
    ("--train-iters 4 --recompute-granularity selective --recompute-method uniform", "full only"),
    ("--train-iters 4 --initial-loss-scale 1000", "power of 2"),
])
def test_bad_flag_combinations_are_named(extra, message):
    with pytest.raises(ConfigError, match=message):
        _run(flags("--mock-data", lr_warmup_iters=0) + extra.split())


def _catching(runs):
    """spawn() target: train_many, recording a ConfigError's message instead of failing."""
    from megatron_normformer.training.pretrain import train_from_argv

    out = []
    for argv in runs:
        try:
            s = train_from_argv(argv)
        except ConfigError as e:
            out.append({"error": str(e)})
            continue
        out.append({k: getattr(s, k) for k in ("losses", "lrs", "global_batches", "params_norms",
                                               "stopped_by", "iteration", "consumed_samples")})
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flags")
    prefix = make_null_dataset(str(tmp))
    real = f"--data-path {prefix} --split 100,0,0"
    docs = "--eod-mask-loss --reset-position-ids --reset-attention-mask --log-params-norm"
    dropout = "--hidden-dropout 0.1 --attention-dropout 0.1"
    ramp = flags("--mock-data --rampup-batch-size 2 2 12", train_samples=40, global_batch_size=8,
                 micro_batch_size=1)
    ck, ck2 = str(tmp / "ramp"), str(tmp / "sched")
    runs = [
        flags(real, docs, train_iters=4, global_batch_size=8, micro_batch_size=2),        # 0 DP2
        flags(real, docs, train_iters=4, global_batch_size=8, micro_batch_size=2,
              pipeline_model_parallel_size=2),                                            # 1 PP2
        flags(real, docs, train_iters=4, global_batch_size=8, micro_batch_size=2,
              tensor_model_parallel_size=2),                                              # 2 TP2
        flags(real, "--log-params-norm", train_iters=4, global_batch_size=8, micro_batch_size=2),  # 3
        flags(real, docs, train_iters=4, global_batch_size=8, micro_batch_size=2,
              zero_stage=3),                                                               # 4 ZeRO-3
        flags("--mock-data", dropout, train_iters=3, global_batch_size=4, micro_batch_size=2,
              tensor_model_parallel_size=2),                                              # 5 plain
        flags("--mock-data", dropout, train_iters=3, global_batch_size=4, micro_batch_size=2,
              tensor_model_parallel_size=2, recompute_granularity="selective"),           # 6
        flags("--mock-data", dropout, train_iters=3, global_batch_size=4, micro_batch_size=2,
              tensor_model_parallel_size=2, recompute_granularity="full",
              recompute_method="block", recompute_num_layers=1),                          # 7
        flags("--mock-data", dropout, train_iters=3, global_batch_size=4, micro_batch_size=2,
              tensor_model_parallel_size=2, recompute_granularity="full",
              recompute_method="uniform", recompute_num_layers=2),                        # 8
        ramp,                                                                             # 9
        ramp + ["--save", ck, "--exit-interval", "3"],                                    # 10
        ramp + ["--load", ck],                                                            # 11
        flags("--mock-data", train_iters=2, global_batch_size=4, load=ck, finetune=True),  # 12
        flags("--mock-data", train_iters=2, global_batch_size=4),                         # 13 fresh
        flags("--mock-data", train_iters=4, global_batch_size=4, save=ck2, exit_interval=2,
              exit_duration_in_mins=1e-9),                                                # 14
        flags("--mock-data", train_iters=4, global_batch_size=4, load=ck2, lr=1e-3),      # 15
        flags("--mock-data", train_iters=4, global_batch_size=4, load=ck2, lr=1e-3,
              override_opt_param_scheduler=True),                                         # 16
        flags("--mock-data", train_iters=4, global_batch_size=4, load=ck2, lr=1e-3,
              use_checkpoint_opt_param_scheduler=True),                                   # 17
        flags("--mock-data", train_iters=4, global_batch_size=4),                         # 18
    ]
    out = spawn(_catching, 2, runs)[0]
    if os.environ.get("FLAGS_DUMP"):
        torch.save(out, os.environ["FLAGS_DUMP"])
    return out


def test_document_flags_are_layout_invariant(two_ranks):
    """Same micro-batches in every layout: with --eod-mask-loss the loss is a mean over each
    micro-batch's kept targets (Megatron's), so the micro-batch size is part of its definition."""
    r = two_ranks
    for other in (r[1], r[2], r[4]):  # PP2 (ids travel between stages), TP2, ZeRO-3
        assert_close(other["losses"], r[0]["losses"], 1e-4)
    assert abs(r[3]["losses"][1] - r[0]["losses"][1]) > 1e-3  # the flags change the loss


def test_params_norm_is_the_same_in_every_layout(two_ranks):
    r = two_ranks
    assert sorted(r[0]["params_norms"]) == [1, 2, 3, 4]
    for other in (r[1], r[2], r[4]):  # tied embedding once in PP2, shards summed in TP2 / ZeRO-3
        assert_close(other["params_norms"], r[0]["params_norms"], 1e-5, "params norm")
    full = sum(p.detach().double().pow(2).sum() for p in GPTModel(
        _run(flags("--mock-data", train_iters=1)).model, SingleProcessState(), seed=7).parameters())
    assert r[0]["params_norms"][1] == pytest.approx(float(full.sqrt()), rel=0.05)  # one step away


def test_recompute_variants_reproduce_the_plain_run(two_ranks):
    r = two_ranks
    for variant in (r[6], r[7], r[8]):
        assert_close(variant["losses"], r[5]["losses"], 1e-5)


def test_batch_ramp_and_resume_mid_ramp(two_ranks):
    full, first, resumed = two_ranks[9], two_ranks[10], two_ranks[11]
    # As test_batch_ramp_follows_megatrons_schedule: one increment per 4 samples up to 12.
    assert list(full["global_batches"].values()) == [2, 2, 4, 6, 8, 8, 8]
    assert full["consumed_samples"] == 38
    assert first["stopped_by"] == "exit-interval" and first["iteration"] == 3
    assert_close({**first["losses"], **resumed["losses"]}, full["losses"], 1e-6)
    assert_close(resumed["lrs"], {k: full["lrs"][k] for k in resumed["lrs"]}, 1e-9, "lr")


def test_finetune_loads_weights_only(two_ranks):
    tuned, fresh = two_ranks[12], two_ranks[13]
    assert sorted(tuned["losses"]) == [1, 2] and tuned["consumed_samples"] == 8
    assert tuned["lrs"] == fresh["lrs"]  # a new schedule from step 0
    assert tuned["losses"][1] < fresh["losses"][1] - 1e-3  # from trained weights, same samples


def test_exit_duration_and_scheduler_override(two_ranks):
    stopped, default, override, keep, ref = two_ranks[14:19]
    assert stopped["stopped_by"] == "exit-duration" and stopped["iteration"] == 1
    assert "--override-opt_param-scheduler" in default["error"] and "max_lr" in default["error"]
    # Step 2 of a 4-step linear schedule with 2 warm-up steps: the peak rate.
    assert override["lrs"][2] == pytest.approx(1e-3)
    assert keep["lrs"] == {k: ref["lrs"][k] for k in keep["lrs"]}  # the checkpoint's 3e-3
    assert_close(keep["losses"], {k: ref["losses"][k] for k in keep["losses"]}, 1e-6)


# -- a Megatron-DeepSpeed script's logging, optimizer and checkpoint flags -------------------------
def _logged_runs(runs):
    """spawn() target: train each argv in turn, its stdout captured; the summary, the stdout and
    a ConfigError's message where one stops it."""
    import contextlib
    import io

    from megatron_normformer.training.pretrain import train_from_argv

    out = []
    for argv in runs:
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            s = train_from_argv(argv)
        out.append({"stdout": captured.getvalue(),
                    **{k: getattr(s, k) for k in ("losses", "lrs", "num_zeros_in_grad", "iteration")}})
    return out


def _scalars(tb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb, size_guidance={"scalars": 0, "histograms": 1}).Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


LEVEL_2_TIMERS = ("forward-backward", "forward-compute", "backward-compute", "batch-generator",
                  "optimizer")


@pytest.fixture(scope="module")
def flag_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("more_flags")
    # An untied embedding: its rows of the tokens a batch lacks have zero gradient.
    base = ["--mock-data --untie-embeddings-and-output-weights --make-vocab-size-divisible-by 64"]
    layout = dict(global_batch_size=4, micro_batch_size=2)
    logs = ["--log-num-zeros-in-grad --log-optimizer-states-to-tensorboard --log-timers-to-tensorboard"]
    sgd = ["--mock-data --optimizer sgd --lr 0.05 --lr-warmup-iters 0"]
    dirs = {k: str(tmp / k) for k in ("tb_tp2", "tb_dp2", "sgd", "bare")}
    runs = {
        # TP=2 ZeRO-1, every timer, TensorBoard every iteration, progress lines every 2.
        "tb_tp2": flags(*base, *logs, train_iters=3, **layout, tensor_model_parallel_size=2,
                        zero_stage=1, log_interval=2, tensorboard_dir=dirs["tb_tp2"],
                        tensorboard_log_interval=1, timing_log_level=2, save=dirs["tb_tp2"] + "_ck",
                        save_interval=3),
        # DP=2 ZeRO-0, level 0, TensorBoard every 2 iterations, no loss scale.
        "tb_dp2": flags(*base, *logs, "--no-log-loss-scale-to-tensorboard", train_iters=3, **layout,
                        log_interval=2, tensorboard_dir=dirs["tb_dp2"], tensorboard_log_interval=2,
                        save=dirs["tb_dp2"] + "_ck", save_interval=3),
        "sgd": flags(*sgd, train_iters=4, **layout, zero_stage=1),
        "sgd_half": flags(*sgd, train_iters=4, **layout, zero_stage=1, save=dirs["sgd"],
                          exit_interval=2),
        # Resumed in another layout: through the layout-independent state, momentum included.
        "sgd_resumed": flags(*sgd, train_iters=4, **layout, tensor_model_parallel_size=2,
                             load=dirs["sgd"]),
        "straight": flags("--mock-data", train_iters=4, **layout, zero_stage=1),
        "bare": flags("--mock-data --no-save-optim --no-save-rng", train_iters=4, **layout,
                      zero_stage=1, save=dirs["bare"], exit_interval=2),
        # Other model flags: --use-checkpoint-args takes the checkpoint's.
        "bare_resumed": flags("--mock-data --use-checkpoint-args --hidden-size 48 --num-layers 3",
                              train_iters=4, **layout, zero_stage=1, load=dirs["bare"]),
    }
    ranks = spawn(_logged_runs, 2, list(runs.values()))
    # Rank 0 prints the checkpoint lines, the last rank the progress lines.
    out = {k: {**last, "stdout": first["stdout"] + last["stdout"]}
           for k, first, last in zip(runs, *ranks)}
    out["dirs"] = dirs
    return out


def test_tensorboard_interval_loss_scale_and_timers(flag_runs):
    tp2, dp2 = _scalars(flag_runs["dirs"]["tb_tp2"]), _scalars(flag_runs["dirs"]["tb_dp2"])
    # --tensorboard-log-interval 1 with --log-interval 2: every iteration; 2: the 2nd and the last.
    assert sorted(tp2["train/lm_loss"]) == [1, 2, 3] and sorted(dp2["train/lm_loss"]) == [2, 3]
    assert tp2["train/loss_scale"] == {1: 1.0, 2: 1.0, 3: 1.0} and "train/loss_scale" not in dp2
    # --timing-log-level 2: every timer; 0: the iteration and the save only.
    assert {t for t in tp2 if t.startswith("timers/")} == {
        "timers/iteration-time", "timers/save-checkpoint", *(f"timers/{n}" for n in LEVEL_2_TIMERS)}
    assert {t for t in dp2 if t.startswith("timers/")} == {"timers/iteration-time",
                                                            "timers/save-checkpoint"}
    assert sorted(tp2["timers/save-checkpoint"]) == [3]
    for step in (1, 2, 3):  # the slowest rank's times; forward-backward holds the passes
        assert all(tp2[f"timers/{n}"][step] > 0 for n in LEVEL_2_TIMERS)
        for inner in ("forward-compute", "backward-compute", "batch-generator"):
            assert tp2[f"timers/{inner}"][step] <= tp2["timers/forward-backward"][step]
    out = flag_runs["tb_tp2"]["stdout"]
    assert out.count("(min, max) time across ranks (ms):") == 3  # iterations 2 and 3, the save
    for name in (*LEVEL_2_TIMERS, "save-checkpoint"):
        assert f"    {name} ..." in out
    level0 = flag_runs["tb_dp2"]["stdout"]
    assert level0.count("(min, max) time across ranks (ms):") == 1 and "forward-backward" not in level0
    assert "    save-checkpoint ..." in level0


def test_optimizer_states_and_zeros_are_the_same_in_every_layout(flag_runs):
    """--log-optimizer-states-to-tensorboard and --log-num-zeros-in-grad: TP=2 at ZeRO-1 and DP=2
    at ZeRO-0 (the same training) report the same norms and counts."""
    tp2, dp2 = _scalars(flag_runs["dirs"]["tb_tp2"]), _scalars(flag_runs["dirs"]["tb_dp2"])
    names = [t for t in tp2 if t.startswith("optimizer/")]
    assert sorted(names) == sorted(f"optimizer/{s}_{n}" for s in ("weight", "momentum", "variance",
                                                                   "variance_sqrt")
                                   for n in ("l2", "l1", "abs_max"))
    for name in names:
        for step in (2, 3):
            assert tp2[name][step] == pytest.approx(dp2[name][step], rel=1e-4), (name, step)
    assert tp2["optimizer/variance_sqrt_l2"][3] == pytest.approx(tp2["optimizer/variance_l1"][3] ** 0.5)
    zeros = flag_runs["tb_tp2"]["num_zeros_in_grad"]
    assert sorted(zeros) == [1, 2, 3] and zeros == {k: v for k, v in zeros.items()}
    # Mostly whole rows of the untied embedding (hidden 32): the tokens the batch (64 inputs,
    # vocabulary 128) lacks; a few entries more or less are exact zeros of the arithmetic.
    for step in (2, 3):
        assert zeros[step] == pytest.approx(flag_runs["tb_dp2"]["num_zeros_in_grad"][step], abs=8)
    assert all(z >= 32 * (128 - 64) for z in zeros.values()), zeros
    assert tp2["train/num_zeros_in_grad"] == {k: float(v) for k, v in zeros.items()}
    assert "num zeros: " in flag_runs["tb_tp2"]["stdout"]


def test_optimizer_sgd(flag_runs):
    """--optimizer sgd: SGD's momentum is the optimizer state, saved in the layout-independent
    checkpoint and resumed in another layout (TP=2 ZeRO-0 from DP=2 ZeRO-1) on the straight run's
    losses."""
    from safetensors import safe_open

    sgd, resumed = flag_runs["sgd"], flag_runs["sgd_resumed"]
    assert_close(resumed["losses"], {k: sgd["losses"][k] for k in (3, 4)}, 1e-5)
    universal = os.path.join(flag_runs["dirs"]["sgd"], "iter_0000002", "universal")
    keys = set()
    for name in os.listdir(universal):
        if name.endswith(".safetensors"):
            keys |= set(safe_open(os.path.join(universal, name), framework="pt").keys())
    assert {k.split("::")[1] for k in keys if "::" in k} == {"momentum_buffer"}


def test_no_save_optim_no_save_rng_and_use_checkpoint_args(flag_runs):
    """--no-save-optim --no-save-rng: the checkpoint holds the weights (layout-independent form)
    and no optimizer or RNG state; the resume says so, restores the weights (iteration 3's loss is
    the straight run's), starts Adam afresh (iteration 4's is not) with the schedule's rates going
    on. --use-checkpoint-args: the model is the checkpoint's, whatever the model flags say."""
    tag = os.path.join(flag_runs["dirs"]["bare"], "iter_0000002")
    files = [os.path.relpath(os.path.join(d, f), tag) for d, _, fs in os.walk(tag) for f in fs]
    assert sorted(f for f in files if not f.startswith("universal/")) == ["run.json"], files
    from safetensors import safe_open

    for f in files:
        if f.endswith(".safetensors"):
            assert not [k for k in safe_open(os.path.join(tag, f), framework="pt").keys() if "::" in k]
    straight, resumed = flag_runs["straight"], flag_runs["bare_resumed"]
    out = resumed["stdout"]
    assert "saved with --no-save-optim: the optimizer starts afresh" in out
    assert "saved with --no-save-rng: the RNG streams start from --seed" in out
    assert sorted(resumed["losses"]) == [3, 4]
    assert resumed["losses"][3] == pytest.approx(straight["losses"][3], rel=1e-6)
    assert abs(resumed["losses"][4] - straight["losses"][4]) > 1e-5
    assert resumed["lrs"] == {k: straight["lrs"][k] for k in (3, 4)}


def test_use_checkpoint_args_reads_the_model_from_the_checkpoint(tmp_path, capsys):
    from megatron_normformer.config import ModelConfig

    saved = ModelConfig(num_layers=3, hidden_size=48, num_attention_heads=4, ffn_hidden_size=96,
                        vocab_size=128, max_position_embeddings=16)
    os.makedirs(tmp_path / "iter_0000005")
    (tmp_path / "latest").write_text("iter_0000005")
    (tmp_path / "iter_0000005" / "run.json").write_text(json.dumps({"run": {"model": saved.to_dict()}}))
    argv = flags("--mock-data --use-checkpoint-args", train_iters=1, load=str(tmp_path))
    assert _run(argv).model == saved  # TINY's 2 x 32 replaced
    assert "--use-checkpoint-args: the model configuration of" in capsys.readouterr().err
    empty = tmp_path / "empty"
    os.makedirs(empty)
    assert _run(flags("--mock-data --use-checkpoint-args", train_iters=1, load=str(empty))).model.hidden_size == 32
    with pytest.raises(ConfigError, match="--use-checkpoint-args needs --load"):
        _run(flags("--mock-data --use-checkpoint-args", train_iters=1))
    with pytest.raises(ConfigError, match="--no-save-optim saves"):
        _run(flags("--mock-data --no-save-optim --no-save-universal", train_iters=1))


def test_tensorboard_flags_without_tensorboard_are_said_once():
    from megatron_normformer.training.loop import flag_notes

    run = _run(flags("--mock-data --log-timers-to-tensorboard --log-optimizer-states-to-tensorboard "
                     "--log-num-zeros-in-grad", train_iters=1))
    notes = flag_notes(run, pipeline=True)
    assert notes[0] == "--log-timers-to-tensorboard has no effect without --tensorboard-dir"
    assert notes[1].startswith("--log-optimizer-states-to-tensorboard has no effect")
    assert notes[2].startswith("--log-num-zeros-in-grad is not available with pipeline parallelism")
    assert flag_notes(_run(flags("--mock-data", train_iters=1)), pipeline=False) == []


def test_megatron_deepspeed_script_flags_reach_their_configs():
    """Each flag a Megatron-DeepSpeed script passes (they were "unrecognized arguments") lands in
    the field the run reads (their effects: the tests above)."""
    run = _run(flags("--mock-data --optimizer adam --log-loss-scale-to-tensorboard "
                     "--log-optimizer-states-to-tensorboard --tensorboard-log-interval 5 "
                     "--log-num-zeros-in-grad --timing-log-level 1 --log-timers-to-tensorboard "
                     "--no-save-optim --no-save-rng --no-check-for-nan-in-loss-and-grad",
                     train_iters=1))
    assert run.optim.optimizer == "adam" and run.log.log_loss_scale_to_tensorboard
    assert run.log.tensorboard_log_interval == 5 and run.log.timing_log_level == 1
    assert run.log.log_optimizer_states_to_tensorboard and run.log.log_num_zeros_in_grad
    assert run.log.log_timers_to_tensorboard and run.ckpt.no_save_optim and run.ckpt.no_save_rng
    assert not run.train.check_for_nan_in_loss_and_grad
    default = _run(flags("--mock-data", train_iters=1))
    assert default.train.check_for_nan_in_loss_and_grad and default.optim.optimizer == "adam"
    assert not _run(flags("--mock-data --no-log-loss-scale-to-tensorboard",
                          train_iters=1)).log.log_loss_scale_to_tensorboard
