"""Masked-LM pretraining (pretrain_bert.py) on the shared training stack: TP=2, DP=2 ZeRO-3 and PP=2
give the TP=1 losses (and accuracies), resume is exact at TP=2 (dropout on), TP=2 and PP=2
checkpoints continue the curve at TP=1, the loss sees masked positions only and never padding, and
the TP-split accuracy is the argmax accuracy."""
import os

import pytest
import torch

from megatron_normformer.config import ConfigError
from megatron_normformer.testing import spawn
from train_utils import flags

DROPOUT = "--hidden-dropout 0.1 --attention-dropout 0.1"


def _argv(*extra, **kw):
    kw.setdefault("global_batch_size", 4)
    kw.setdefault("micro_batch_size", 2)
    return flags("--mock-data", *extra, **kw)


def _train(argv):
    from megatron_normformer.training.pretrain import train_from_argv

    s = train_from_argv(argv, task="bert")
    return dict(losses=s.losses, acc={k: v["mlm_accuracy"] for k, v in s.extra.items()},
                val=s.val, val_extra=s.val_extra)


def _accuracy_matches_argmax():
    """The TP-split 'target has the top logit' equals argmax over the gathered vocabulary."""
    import torch.distributed as dist

    from megatron_normformer.parallel.state import ParallelState
    from megatron_normformer.parallel.cross_entropy import vocab_parallel_correct

    pstate = ParallelState(2, 1)
    vocab, padded = 13, 16  # columns 13..15 are padding and must never win
    g = torch.Generator().manual_seed(0)
    full = torch.randn(50, padded, generator=g)
    full[:5, 14] = 100.0  # a padding column with the largest logit
    target = torch.randint(0, vocab, (50,), generator=g)
    full[5:25, :vocab] = full[5:25, :vocab].scatter(1, target[5:25, None], 50.0)  # surely right
    start = 8 * pstate.tp_rank
    got = vocab_parallel_correct(full[:, start:start + 8], target, start, vocab, pstate.tp_group)
    want = (full[:, :vocab].argmax(-1) == target).float()
    dist.barrier()
    return got.tolist(), want.tolist()


def _runs(tmp):
    out = {"tp1": _train(_argv(train_iters=6, eval_iters=1, eval_interval=3)),
           "tp2_first": _train(_argv(train_iters=6, tensor_model_parallel_size=2, exit_interval=3,
                                     save=os.path.join(tmp, "plain"), eval_iters=1,
                                     eval_interval=3)),
           "zero3": _train(_argv(train_iters=3, zero_stage=3))}
    # TP=2 checkpoint -> TP=1 (DP=2): the layout-independent state continues the TP=1 curve.
    out["tp1_from_tp2"] = _train(_argv(train_iters=6, load=os.path.join(tmp, "plain")))
    # Exact resume at TP=2 with dropout: 3 + save + resume 3 == 6 straight.
    save = os.path.join(tmp, "dropout")
    tp2 = dict(tensor_model_parallel_size=2, train_iters=6)
    out["straight"] = _train(_argv(DROPOUT, **tp2))
    out["first"] = _train(_argv(DROPOUT, exit_interval=3, save=save, **tp2))
    out["second"] = _train(_argv(DROPOUT, save=save, load=save, **tp2))
    out["accuracy"] = _accuracy_matches_argmax()
    # Pipeline (PP=2): the TP=1 curve and accuracies; its checkpoint continues at TP=1 (DP=2).
    out["pp2"] = _train(_argv(train_iters=6, pipeline_model_parallel_size=2, eval_iters=1, eval_interval=3))
    out["pp2_first"] = _train(_argv(train_iters=6, pipeline_model_parallel_size=2, exit_interval=3,
                                    save=os.path.join(tmp, "pipe")))
    out["tp1_from_pp2"] = _train(_argv(train_iters=6, load=os.path.join(tmp, "pipe")))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return spawn(_runs, 2, str(tmp_path_factory.mktemp("bert")))[0]


def _close(a, b, rel):
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    for k in a:
        assert abs(a[k] - b[k]) <= rel * abs(b[k]), (k, a[k], b[k])


def test_tensor_parallel_and_zero3_match_tp1(runs):
    tp1 = runs["tp1"]
    assert sorted(tp1["losses"]) == [1, 2, 3, 4, 5, 6]
    # Random tokens: the loss starts near ln(vocab) = ln(128) = 4.85.
    assert abs(tp1["losses"][1] - 4.85) < 0.3
    first3 = {k: tp1["losses"][k] for k in (1, 2, 3)}
    _close(runs["tp2_first"]["losses"], first3, 1e-4)
    _close(runs["zero3"]["losses"], first3, 1e-4)
    _close(runs["tp2_first"]["val"], {3: tp1["val"][3]}, 1e-4)
    # Accuracy is logged per iteration and per evaluation, a fraction in [0, 1].
    assert sorted(tp1["acc"]) == [1, 2, 3, 4, 5, 6]
    assert all(0.0 <= a <= 1.0 for a in tp1["acc"].values())
    assert 0.0 <= tp1["val_extra"][3]["mlm_accuracy"] <= 1.0
    for k in (1, 2, 3):
        assert abs(runs["tp2_first"]["acc"][k] - tp1["acc"][k]) <= 1e-6


def test_tp2_checkpoint_continues_at_tp1(runs):
    resumed = runs["tp1_from_tp2"]["losses"]
    assert sorted(resumed) == [4, 5, 6]
    _close(resumed, {k: runs["tp1"]["losses"][k] for k in (4, 5, 6)}, 1e-4)


def test_resume_is_exact_at_tp2(runs):
    first, second = runs["first"]["losses"], runs["second"]["losses"]
    assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]
    _close({**first, **second}, runs["straight"]["losses"], 1e-6)
    # Dropout is on: the curve differs from the dropout-free one.
    assert max(abs(runs["straight"]["losses"][k] - runs["tp2_first"]["losses"][k])
               for k in (1, 2, 3)) > 1e-3


def test_pipeline_matches_tp1_and_its_checkpoint_continues_at_tp1(runs):
    tp1, pipe = runs["tp1"], runs["pp2"]
    _close(pipe["losses"], tp1["losses"], 1e-4)
    _close(pipe["val"], tp1["val"], 1e-4)
    # The accuracy kept by the last stage's loss reaches every rank's log as without pipelining
    # (random tokens: mostly 0, but not at every step).
    assert sorted(pipe["acc"]) == [1, 2, 3, 4, 5, 6] and max(tp1["acc"].values()) > 0
    for k in tp1["acc"]:
        assert abs(pipe["acc"][k] - tp1["acc"][k]) <= 1e-6, k
    for k in tp1["val_extra"]:
        assert abs(pipe["val_extra"][k]["mlm_accuracy"] - tp1["val_extra"][k]["mlm_accuracy"]) <= 1e-6
    _close(runs["pp2_first"]["losses"], {k: tp1["losses"][k] for k in (1, 2, 3)}, 1e-4)
    resumed = runs["tp1_from_pp2"]["losses"]
    assert sorted(resumed) == [4, 5, 6]
    _close(resumed, {k: tp1["losses"][k] for k in (4, 5, 6)}, 1e-4)


def test_tp_split_accuracy_is_argmax_accuracy(runs):
    got, want = runs["accuracy"]
    assert got == want
    assert sum(want[5:25]) == 20.0


# -- the loss sees masked positions only, and never padding (one process, plain model) ---------

def _loss_views():
    from megatron_normformer.arguments import build_pretrain_parser, run_config_from_args
    from megatron_normformer.data import IGNORE_INDEX, MockMaskedLMDataset, collate_samples
    from megatron_normformer.parallel.state import ParallelState
    from megatron_normformer.training.tasks import get_task

    task = get_task("bert")
    args = build_pretrain_parser().parse_args(_argv(train_iters=1))
    run = run_config_from_args(args, bidirectional=True)
    model = task.build_model(run.model, ParallelState(1, 1), seed=3, device=None)
    data = MockMaskedLMDataset(8, 16, 128, seed=5)
    a, b = data[0], data[1]
    assert a["loss_mask"].sum() > 0 and a["padding_mask"].sum() < 16  # masked tokens and padding

    def loss_and_grads(*samples):
        model.zero_grad()
        loss, extra = task.loss(model, collate_samples(list(samples)))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()], extra["mlm_accuracy"].item()

    unmasked = dict(b, loss_mask=0 * b["loss_mask"], labels=0 * b["labels"] + IGNORE_INDEX)
    other = dict(data[2], loss_mask=0 * b["loss_mask"], labels=0 * b["labels"] + IGNORE_INDEX)
    relabelled = dict(a, labels=a["labels"].copy())
    relabelled["labels"][a["loss_mask"] == 0] = 7  # labels outside the loss mask are never read
    padded = dict(a, text=a["text"].copy())
    padded["text"][a["padding_mask"] == 0] = 99  # whatever sits in the padding

    alone = loss_and_grads(a)
    views = {name: loss_and_grads(*s) for name, s in (
        ("with_unmasked", (a, unmasked)), ("with_other_unmasked", (a, other)),
        ("relabelled", (relabelled,)), ("padding_changed", (padded,)))}
    nothing = loss_and_grads(unmasked)
    return alone, views, nothing, int(a["loss_mask"].sum())


def test_loss_is_over_masked_positions_only_and_ignores_padding():
    alone, views, nothing, n_masked = spawn(_loss_views, 1)[0]
    assert n_masked >= 1 and alone[0] > 1.0
    for name, (loss, grads, acc) in views.items():
        assert abs(loss - alone[0]) <= 1e-6 * alone[0], name
        assert acc == alone[2], name
        for g, g0 in zip(grads, alone[1]):
            assert torch.allclose(g, g0, rtol=1e-5, atol=1e-7), name
    # A micro-batch with no masked token contributes a zero loss (not NaN) and no gradient.
    assert nothing[0] == 0.0 and all(float(g.abs().max()) == 0.0 for g in nothing[1])


def test_bert_flags_build_the_bidirectional_encoder():
    from megatron_normformer.arguments import build_pretrain_parser
    from megatron_normformer.training.pretrain import resolve

    # DeepSpeed's pipeline engine takes ZeRO 0-1 only, for the masked LM as for GPT.
    with pytest.raises(ConfigError, match="supports ZeRO stages 0 and 1 only"):
        resolve(build_pretrain_parser(), _argv(train_iters=2, pipeline_model_parallel_size=2,
                                               zero_stage=2), task="bert")
    _, run, _, _ = resolve(build_pretrain_parser(), _argv(train_iters=2), task="bert")
    assert run.model.bidirectional and run.model.position_embedding_type == "learned"
    _, gpt, _, _ = resolve(build_pretrain_parser(), _argv(train_iters=2,
                                                           pipeline_model_parallel_size=2))
    assert not gpt.model.bidirectional
