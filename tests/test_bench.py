"""bench/: the throughput benchmark, the plain-PyTorch reference model and the small reproduction."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/ is not installed

from bench.reference_gpt import ReferenceGPT  # noqa: E402
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


def test_reproduce_small_writes_png_and_json(tmp_path):
    out = tmp_path / "out"
    argv = ["--mock-data", "--vocab-size", "256", "--num-layers", "1", "--hidden-size", "32",
            "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2",
            "--max-seconds", "0.2", "--step-ms", "10", "11", "--seeds", "1",
            "--lr-baseline", "1e-3", "3e-2", "--lr-normformer", "3e-3",
            "--evals", "2", "--eval-iters", "1", "--output-dir", str(out)]
    result = reproduce_small(argv)
    png, js = out / "reproduce_small.png", out / "reproduce_small.json"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(js.read_text())
    assert saved["iterations"] == {"preln": 20, "normformer": 18}  # 200 ms / 10 ms and / 11 ms
    s = saved["summary"]
    for v in ("preln", "normformer"):
        assert len(s[v]["final_ppl"]) == 1 and s[v]["final_ppl"][0] > 1
        assert s[v]["compute_s"][-1] == pytest.approx(saved["iterations"][v] * saved["step_ms"][v] / 1000)
        assert saved["curves"][v][0]["flops"][-1] == saved["iterations"][v] * saved["flops_per_iter"][v]
    assert s["final_ppl_diff"]["mean"] == pytest.approx(s["normformer"]["final_ppl"][0] - s["preln"]["final_ppl"][0])
    assert result["summary"] == s
    assert os.path.exists(out / "runs" / "normformer_lr0.003_seed1234.jsonl")
    # Pre-LN ran at both LRs; the comparison uses the one with the lower final perplexity.
    sweep = s["lr_sweep"]["preln"]
    assert set(sweep) == {"0.001", "0.03"} and s["lr_sweep"]["normformer"].keys() == {"0.003"}
    best = min(sweep, key=lambda lr: sweep[lr]["final_ppl_mean"])
    assert saved["lr"]["preln"] == float(best) and s["preln"]["final_ppl_mean"] == sweep[best]["final_ppl_mean"]
    # --resume reuses finished runs: their metrics files are not rewritten.
    finished = out / "runs" / "normformer_lr0.003_seed1234.jsonl"
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
