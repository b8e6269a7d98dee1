"""bench/: the throughput benchmark, the plain-PyTorch reference model and the small reproduction."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/ is not installed

from bench.reference_gpt import ReferenceGPT  # noqa: E402
import bench.reproduce_small as rs  # noqa: E402
from bench.reproduce_small import green_star  # noqa: E402
from bench.reproduce_small import run as reproduce_small  # noqa: E402
from bench.throughput import run as throughput  # noqa: E402
from bench.throughput import time_interleaved  # noqa: E402
from megatron_normformer.config import ModelConfig  # noqa: E402
from megatron_normformer.model.gpt import GPTModel  # noqa: E402
from megatron_normformer.parallel.state import SingleProcessState  # noqa: E402

TINY = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
        "--micro-batch-size", "2", "--vocab-size", "300", "--threads", "1"]


def test_throughput_json_is_sane(capsys):
    out = throughput(TINY + ["--iters", "2", "--repeats", "2", "--warmup-iters", "1", "--json", "--clock", "cpu"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(out))
    assert set(out["results"]) == {"ours-preln", "ours-normformer", "ref-preln", "ref-normformer"}
    for r in out["results"].values():
        assert r["ms_per_iter"] > 0 and r["tokens_per_sec"] > 0 and r["tflops_per_device"] > 0
        assert r["steps"] == 2 and r["mfu"] is None  # no known peak on CPU
        assert r["tokens_per_sec"] == pytest.approx(2 * 16 / (r["ms_per_iter"] / 1000))
    assert isinstance(out["overhead_pct"], float) and isinstance(out["overhead_pct_reference"], float)
    assert isinstance(out["overhead_pct_best"], float)
    for kind in ("preln", "normformer"):
        assert out["ratio_vs_reference"][kind]["median"] > 0 and out["ratio_vs_reference"][kind]["best"] > 0
    # Same architecture, same parameter count.
    assert out["results"]["ours-normformer"]["params"] == out["results"]["ref-normformer"]["params"]
    assert out["results"]["ours-normformer"]["params"] > out["results"]["ours-preln"]["params"]
    assert out["threads"] == 1 and out["clock"] == "cpu" and out["flops_per_iter"]["normformer"] > out["flops_per_iter"]["preln"]


def test_cpu_clock_does_not_count_time_the_process_is_not_running():
    """--clock cpu: a step that only waits (as when other jobs hold the cores) costs ~0 ms."""
    import time

    steps = {"wait": lambda: time.sleep(0.05)}
    wall = time_interleaved(steps, 2, 0, 1, torch.device("cpu"), "wall")["wait"][0]
    cpu = time_interleaved(steps, 2, 0, 1, torch.device("cpu"), "cpu")["wait"][0]
    assert min(wall) >= 50 and max(cpu) < 10


@pytest.mark.parametrize("normformer,extra", [
    (False, {}),
    (True, {}),
    (True, dict(head_scale_position="post-proj", activation_fn="relu_squared",
                position_embedding_type="learned", untie_embeddings_and_output_weights=True,
                scale_embedding=True)),
])
def test_reference_is_the_same_model(normformer, extra):
    # vocab 1000 is padded to 1024: the padded rows count in both, and never change the loss.
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1000,
                      max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
                      scale_attn=normformer, scale_fc=normformer, scale_heads=normformer,
                      scale_resids=normformer, **extra)
    ours, ref = GPTModel(cfg, SingleProcessState(), seed=7), ReferenceGPT(cfg)
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in ours.parameters())
    ref.load_state_dict(ours.state_dict())
    with torch.no_grad():  # non-trivial NormFormer scales, so every operation is exercised
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    ref.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (2, 32), generator=gen)
    labels = torch.randint(0, 1000, (2, 32), generator=gen)
    a, b = ours(tokens, labels), ref(tokens, labels)
    assert a.shape == b.shape == (2, 32)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    a.mean().backward()
    b.mean().backward()
    ours_params = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(p.grad, ours_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_green_star_is_the_first_point_at_or_below_the_baseline_best():
    base_x, base_y = [10, 20, 30, 40, 50], [100.0, 60.0, 45.0, 40.0, 38.0]
    nf_x, nf_y = [9, 18, 27, 36, 45], [90.0, 50.0, 38.5, 37.9, 35.0]
    star = green_star(base_x, base_y, nf_x, nf_y)
    assert star["compute"] == 36 and star["ppl"] == 37.9
    assert star["baseline_best_ppl"] == 38.0 and star["baseline_best_compute"] == 50
    assert star["savings"] == pytest.approx(1 - 36 / 50) and star["fraction_of_baseline_run"] == pytest.approx(36 / 50)
    assert green_star(base_x, base_y, nf_x, [90.0, 50.0, 45.0, 40.0, 38.5]) is None
    # Equal counts as matched; the baseline's best need not be its last point.
    late = green_star([1, 2, 3], [5.0, 3.0, 4.0], [1, 2], [4.0, 3.0])
    assert late["compute"] == 2 and late["savings"] == 0.0 and late["fraction_of_baseline_run"] == pytest.approx(2 / 3)


def _run(variant, lr, seed, final, curve=None, state=None, ms=100.0):
    """A made-up run result, as bench/reproduce_small.py's run_result returns it."""
    diverged = final is None
    curve = curve or ([6.0, 8.0] if diverged else [final + 1.0, final + 0.5, final])
    return dict(variant=variant, lr=lr, seed=seed, state=state or ("diverged" if diverged else "ok"),
                reason="lm loss is nan" if diverged else "", elapsed_s=1.0, final_loss=final,
                iterations=[10, 20, 30][:len(curve)], val_loss=curve, median_ms_per_iter=ms)


def test_t_quantile_and_paired_interval():
    # Student-t two-sided 95 % critical values from the standard tables.
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert rs.t_quantile(0.975, df) == pytest.approx(t, abs=1e-3)
    d = rs.paired([5.0, 5.2, 4.9], [5.3, 5.4, 5.3])
    assert d["per_seed"] == pytest.approx([-0.3, -0.2, -0.4])
    assert d["mean"] == pytest.approx(-0.3) and d["std"] == pytest.approx(0.1)
    half = 4.303 * 0.1 / 3 ** 0.5
    assert d["interval"] == pytest.approx([-0.3 - half, -0.3 + half], abs=1e-4)
    assert rs.paired([1.0], [2.0])["interval"] is None  # one pair: no interval


def test_classify_a_run():
    ok = [{"iteration": 30, "lm_loss": 4.0}, {"iteration": 30, "val_loss": 4.1}]
    assert rs.classify(0, "", ok, 30, 256)["state"] == "ok"
    nan_exit = rs.classify(1, "...\nerror: iteration 7: lm loss is nan; stopping (lower --lr)\n", [], 30, 256)
    assert nan_exit == {"state": "diverged", "reason": "error: iteration 7: lm loss is nan; stopping (lower --lr)"}
    assert rs.classify(1, "error: non-finite loss at iteration 3\n", [], 30, 256)["state"] == "diverged"
    nan_metrics = [{"iteration": 20, "val_loss": float("nan")}, {"iteration": 30, "val_loss": 4.0}]
    assert rs.classify(0, "", nan_metrics, 30, 256)["state"] == "diverged"
    blown = [{"iteration": 30, "val_loss": 2000.0}]  # finite but far above ln(256) = 5.5
    assert rs.classify(0, "", blown, 30, 256)["state"] == "diverged"
    # Other failures are failures, not divergence: the sweep stops on them.
    assert rs.classify(2, "error: --data-path x: no x.idx\n", [], 30, 256) == {
        "state": "failed", "reason": "error: --data-path x: no x.idx"}
    assert rs.classify(0, "", [{"iteration": 20, "val_loss": 4.0}], 30, 256)["state"] == "failed"


def test_summary_best_lr_paired_differences_and_diverged_points():
    """Each model at its own best LR among its most-seeded LRs; a diverged seed makes an LR rank
    last; differences pair seed with seed; the green star on the mean curves."""
    runs = [_run("preln", 1e-3, 1, 5.0), _run("preln", 3e-3, 1, 4.6), _run("preln", 1e-2, 1, 4.7),
            _run("preln", 4e-2, 1, None),
            _run("preln", 3e-3, 2, 4.8), _run("preln", 1e-2, 2, 4.5),  # means 4.7 vs 4.6
            _run("preln", 3e-3, 3, 4.7), _run("preln", 1e-2, 3, 4.6),
            _run("normformer", 1e-3, 1, 4.9), _run("normformer", 1e-2, 1, 4.3),
            _run("normformer", 4e-2, 1, 4.4),
            _run("normformer", 1e-2, 2, 4.4), _run("normformer", 4e-2, 2, None),  # 4e-2: one diverged
            _run("normformer", 1e-2, 3, 4.2, curve=[5.0, 4.5, 4.2]), _run("normformer", 4e-2, 3, 4.1)]
    s = rs.summarize(runs, {"preln": 30, "normformer": 30}, {"preln": 100.0, "normformer": 110.0}, 2)
    assert s["best_lr"] == {"preln": 1e-2, "normformer": 1e-2}
    assert s["top_lrs"]["normformer"] == [1e-2, 4e-2]
    assert s["lr_sweep_reaches_past_best"] == {"preln": True, "normformer": True}
    assert s["preln"]["final_loss"] == [4.7, 4.5, 4.6] and s["preln"]["final_loss_mean"] == pytest.approx(4.6)
    assert s["normformer"]["final_loss_mean"] == pytest.approx(4.3)
    assert s["diff_loss"]["per_seed"] == pytest.approx([-0.4, -0.1, -0.4]) and s["paired_seeds"] == [1, 2, 3]
    half = rs.t_quantile(0.975, 2) * s["diff_loss"]["std"] / 3 ** 0.5  # std 0.173: the interval holds 0
    assert s["diff_loss"]["interval"] == pytest.approx([-0.3 - half, -0.3 + half]) and half > 0.3
    sweep = {p["lr"]: p for p in s["lr_sweep"]["normformer"]}
    assert sweep[4e-2]["final_loss"] == [4.4, None, 4.1] and sweep[4e-2]["mean"] is None
    assert {p["lr"]: p["mean"] for p in s["lr_sweep"]["preln"]}[4e-2] is None
    # Mean curves at 1e-2: Pre-LN 5.6, 5.1, 4.6 at 1, 2, 3 s; NormFormer 5.23, 4.73, 4.3 at 1.1, 2.2,
    # 3.3 s (110 ms steps): its first point at or below Pre-LN's best 4.6 is the last.
    star = s["green_star"]
    assert star["compute"] == pytest.approx(3.3) and star["baseline_best_ppl"] == pytest.approx(4.6)
    assert star["fraction_of_baseline_run"] == pytest.approx(1.1)
    # With one seed everywhere the best LR is the sweep's best; the optimum at the grid's edge is said.
    one = rs.summarize([_run(v, lr, 1, f) for v in ("preln", "normformer")
                        for lr, f in ((1e-3, 5.0), (3e-3, 4.9))], {"preln": 30, "normformer": 30}, None, 2)
    assert one["best_lr"] == {"preln": 3e-3, "normformer": 3e-3}
    assert one["lr_sweep_reaches_past_best"] == {"preln": False, "normformer": False}
    assert one["step_ms"] == {"preln": 100.0, "normformer": 100.0} and one["diff_loss"]["interval"] is None


def test_reproduce_small_quick_sweep_with_diverged_runs(tmp_path):
    """--quick on tiny real runs: LR 1000 ends in a NaN (the trainer exits non-zero), which is a
    diverged point on the figure, not a crash; the sweep picks the other LR, runs the second seed
    there, and --resume reruns nothing."""
    out = tmp_path / "out"
    argv = ["--quick", "--mock-data", "--vocab-size", "256", "--lrs", "1e-2", "1000",
            "--output-dir", str(out)]
    result = reproduce_small(argv)
    s = result["summary"]
    saved = json.loads((out / "reproduce_small.json").read_text())
    png = out / "reproduce_small.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert saved["summary"]["best_lr"] == s["best_lr"] == {"preln": 1e-2, "normformer": 1e-2}
    assert result["runs"] == 6  # 2 LRs x 2 models, then the second seed at each model's best
    for v in ("preln", "normformer"):
        sweep = {p["lr"]: p for p in s["lr_sweep"][v]}
        assert sweep[1000]["states"] == ["diverged"] and sweep[1000]["final_loss"] == [None]
        assert sweep[1e-2]["seeds"] == [1234, 1235] and all(0 < x < 7 for x in sweep[1e-2]["final_loss"])
        assert s[v]["final_loss_mean"] == pytest.approx(sum(sweep[1e-2]["final_loss"]) / 2)
        assert s[v]["compute_s"][-1] == pytest.approx(12 * {"preln": 10, "normformer": 11}[v] / 1000)
    assert s["diff_loss"]["per_seed"] == pytest.approx(
        [n - b for n, b in zip(s["normformer"]["final_loss"], s["preln"]["final_loss"])])
    status = json.loads((out / "runs" / "preln_lr1000_seed1234.status.json").read_text())
    assert status["exit"] != 0 and "nan" in status["reason"].lower()
    finished = out / "runs" / "normformer_lr0.01_seed1235.jsonl"
    stamp = finished.stat().st_mtime_ns
    again = reproduce_small(argv + ["--resume"])
    assert finished.stat().st_mtime_ns == stamp and again["summary"] == s


def test_quality_plain_loop_matches_the_framework_from_the_same_init(tmp_path):
    """bench/quality.py: our Pre-LN trained by pretrain_gpt.py and the same model and initial
    weights trained by a plain PyTorch loop end at the same held-out loss; the nanoGPT-style
    reference is scored on the same tokens."""
    from bench.quality import run as quality
    from train_utils import make_null_dataset

    prefix = make_null_dataset(str(tmp_path), vocab=128, docs=200)
    out = quality(["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
                   "--split", "90,10,0", "--num-layers", "1", "--hidden-size", "32",
                   "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "4",
                   "--iters", "12", "--lr-warmup-iters", "2", "--lr", "3e-3",
                   "--variants", "reference,plain,preln", "--output-dir", str(tmp_path / "q")])
    loss = out["valid_loss"]
    assert loss["plain"] == pytest.approx(loss["preln"], rel=1e-4)
    assert abs(loss["reference"] - loss["preln"]) > 1e-3  # a different model, really trained
    saved = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert saved["minus_reference"]["preln"] == pytest.approx(loss["preln"] - loss["reference"])


def test_full_width_script_compares_layouts(tmp_path, capsys):
    """bench/full_width.py's machinery at reduced width (the full 2.7B width runs in the bench):
    two layouts, their losses equal, the table and the JSON written."""
    from bench.full_width import run as full_width

    out = full_width(["--hidden-size", "64", "--num-attention-heads", "4", "--iters", "2",
                      "--layouts", "tp1", "tp2_sp", "--output", str(tmp_path / "fw.json")])
    assert set(out["results"]) == {"tp1", "tp2_sp"} and out["max_rel_diff"] <= 1e-4
    assert sorted(out["results"]["tp2_sp"]["losses"]) == [1, 2]
    assert json.loads((tmp_path / "fw.json").read_text())["max_rel_diff"] == out["max_rel_diff"]
    assert "within 1e-4" in capsys.readouterr().out


def test_quality_llama_pair_sweeps_lrs(tmp_path, capsys):
    """bench/quality.py --lrs: the Llama-style pair through the real trainer at two LRs, at most one
    training at a time; each variant's loss per LR, its best LR and the difference at the best."""
    from bench.quality import llama_flags, build_parser
    from bench.quality import run as quality
    from train_utils import make_null_dataset

    prefix = make_null_dataset(str(tmp_path), vocab=128, docs=200)
    out = quality(["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
                   "--split", "90,10,0", "--num-layers", "1", "--hidden-size", "32",
                   "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "4",
                   "--iters", "4", "--lr-warmup-iters", "1", "--lrs", "1e-3,3e-3", "--jobs", "1",
                   "--variants", "llama,llama_normformer", "--output-dir", str(tmp_path / "q")])
    assert set(out["valid_loss"]) == {f"{v}_lr{lr}" for v in ("llama", "llama_normformer")
                                      for lr in ("0.001", "0.003")}
    for v in ("llama", "llama_normformer"):
        losses = out["valid_loss_by_lr"][v]
        assert set(losses) == {"0.001", "0.003"} and all(0 < x < 10 for x in losses.values())
        assert out["best"][v]["loss"] == min(losses.values())
    d = out["normformer_minus_baseline_at_best"]["llama_normformer"]
    assert d == pytest.approx(out["best"]["llama_normformer"]["loss"] - out["best"]["llama"]["loss"])
    assert "--num-query-groups 2" in " ".join(llama_flags(build_parser().parse_args(["--num-attention-heads", "4"])))
    log = (tmp_path / "q" / "llama_normformer_lr0.003.log").read_text()
    assert "error" not in log.lower()
    assert "llama_normformer - llama at their best LRs" in capsys.readouterr().out
