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
"""
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
        out.append({k: s[k] for k in ("losses", "lrs", "global_batches", "params_norms",
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
