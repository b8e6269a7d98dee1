"""The Section 4 analysis tools: JSON numbers consistent with the models they describe, valid PNGs."""
import json

import pytest
import torch

from megatron_normformer.analysis.grad_norms import record_fc2_grad_mean_abs
from megatron_normformer.analysis.common import TokenSource, architecture_pair
from megatron_normformer.checkpoint.release import load_consolidated
from test_generate_loading import make_checkpoint, run_tool, tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--num-layers", 3, "--hidden-size", 32, "--num-attention-heads", 4, "--ffn-hidden-size", 64,
         "--seq-length", 16, "--micro-batch-size", 4, "--vocab-size", 64]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_grad_norms_json_matches_a_direct_run(tmp_path):
    done = run_tool("analyze_grad_norms.py", *SMALL, "--train-iters", 6, "--lr-warmup-iters", 3,
                    "--output-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "grad_norms.json").read_text())
    assert_png(tmp_path / "grad_norms.png")
    assert result["plotted_layers"] == [0, 1, 2]
    assert set(result["runs"]) == {"preln", "normformer"}
    # The same training in-process gives the same numbers (deterministic on CPU).
    cfg = tiny_config(64, max_positions=16, num_layers=3, make_vocab_size_divisible_by=128)
    for name, arch in architecture_pair(cfg).items():
        run = result["runs"][name]
        assert set(run["fc2_grad_mean_abs"]) == {"0", "1", "2"}
        assert all(len(s) == 6 and all(v > 0 for v in s) for s in run["fc2_grad_mean_abs"].values())
        direct = record_fc2_grad_mean_abs(arch, TokenSource(None, 64).batches(4, 16, 1234), 6, 3e-3, 3)
        for layer, series in direct["fc2_grad_mean_abs"].items():
            assert run["fc2_grad_mean_abs"][layer] == pytest.approx(series, rel=1e-5)
        assert run["loss"] == pytest.approx(direct["loss"], rel=1e-6)


def test_scales_json_describes_the_checkpoint(tmp_path):
    base, _, _ = make_checkpoint(tmp_path, steps=10)
    done = run_tool("analyze_scales.py", "--load", base, "--output-dir", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert_png(tmp_path / "out" / "scales.png")
    report = json.loads((tmp_path / "out" / "scales.json").read_text())
    full, cfg = load_consolidated(base)
    assert set(report["kinds"]) == {"ffn_ln", "post_attn_ln", "head_scale", "resid_scale"}
    sizes = {"ffn_ln": cfg.ffn_hidden_size, "post_attn_ln": cfg.hidden_size,
             "head_scale": cfg.num_attention_heads, "resid_scale": cfg.hidden_size}
    names = {"ffn_ln": "mlp.ffn_layernorm.weight", "post_attn_ln": "post_attention_layernorm.weight",
             "head_scale": "attention.head_scale", "resid_scale": "resid_scale"}
    for kind, rows in report["kinds"].items():
        assert [r["layer"] for r in rows] == list(range(cfg.num_layers))
        for r in rows:
            v = full[f"layers.{r['layer']}.{names[kind]}"].double()
            assert r["n"] == sizes[kind]
            assert r["mean"] == pytest.approx(v.mean().item(), abs=1e-9)
            assert r["min"] == pytest.approx(v.min().item()) and r["max"] == pytest.approx(v.max().item())
            assert r["min"] <= r["q05"] <= r["q25"] <= r["q50"] <= r["q75"] <= r["q95"] <= r["max"]
            assert r["q50"] == pytest.approx(v.median().item() if v.numel() % 2 else
                                             v.sort().values[v.numel() // 2 - 1: v.numel() // 2 + 1].mean().item())
        assert any(r["std"] > 0 for r in rows)  # training moved the scales away from 1


def test_scales_of_a_preln_model_is_a_clear_error(tmp_path):
    base, _, _ = make_checkpoint(tmp_path, steps=1, normformer=False)
    done = run_tool("analyze_scales.py", "--load", base, "--output-dir", tmp_path / "out")
    assert done.returncode == 2 and "--load" in done.stderr and "Traceback" not in done.stderr


def test_lr_stability_reports_peak_lr_and_failing_operation(tmp_path):
    done = run_tool("lr_stability_test.py", *SMALL, "--lr-step", 0.5, "--max-steps", 200,
                    "--dtype", "fp16", "--device", "cpu", "--output-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    assert_png(tmp_path / "lr_stability.png")
    result = json.loads((tmp_path / "lr_stability.json").read_text())
    assert result["dtype"] == "fp16" and set(result["runs"]) == {"preln", "normformer"}
    ops = {"embedding", "input LN", "qkv projection", "q@k", "output projection", "post-attn LN",
           "pre-MLP LN", "fc1", "FFN LN", "fc2", "final LN", "loss", "gradient"}
    for name, run in result["runs"].items():
        assert run["diverged"] and run["failed_op"] in ops and run["failed_module"]
        assert run["failed_step"] == run["last_step"] + 1 < 200
        assert run["peak_lr"] == pytest.approx(run["last_step"] * 0.5)
        assert len(run["lrs"]) == len(run["losses"]) == run["last_step"]
        assert all(torch.isfinite(torch.tensor(run["losses"])))
        assert run["lrs"] == pytest.approx([0.5 * (i + 1) for i in range(run["last_step"])])
        if run["failed_op"] not in ("embedding", "final LN", "loss") and "layers." in run["failed_module"]:
            assert run["failed_layer"] == int(run["failed_module"].split(".")[1])
        assert name in done.stdout and f"{run['peak_lr']:.6g}" in done.stdout


def test_lr_stability_without_divergence_reports_the_last_lr(tmp_path):
    done = run_tool("lr_stability_test.py", *SMALL, "--lr-step", 1e-5, "--max-steps", 4,
                    "--dtype", "fp32", "--device", "cpu", "--output-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    for run in json.loads((tmp_path / "lr_stability.json").read_text())["runs"].values():
        assert not run["diverged"] and run["failed_op"] is None
        assert run["last_step"] == 4 and run["peak_lr"] == pytest.approx(4e-5)
