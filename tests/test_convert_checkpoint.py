"""Checkpoints change layout: resume (TP=2, PP=2) into (TP=1, PP=1) and (TP=4, PP=1), convert to and
from the consolidated release format, re-shard offline."""
import os
import subprocess
import sys

import pytest
import torch

from megatron_normformer.testing import spawn
from train_utils import ROOT, flags, train_many

BASE = flags("--mock-data --micro-batch-size 2 --global-batch-size 8 --train-iters 6")
SOURCE = ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2", "--zero-stage", "1"]


def _losses(world, argv):
    return spawn(train_many, world, [argv])[0][0]["losses"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    src, ref_dir = str(root / "tp2pp2"), str(root / "tp1")
    straight = _losses(1, BASE + ["--save", ref_dir, "--save-interval", "3"])
    first = _losses(4, BASE + SOURCE + ["--save", src, "--exit-interval", "3"])
    return dict(root=root, src=src, ref_dir=ref_dir, straight=straight, first=first)


def _assert_continues(losses, straight, rel=1e-5):
    for it, loss in losses.items():
        assert abs(loss - straight[it]) <= rel * abs(straight[it]), (it, loss, straight[it])


def test_first_part_matches_single_process(runs):
    _assert_continues(runs["first"], runs["straight"], rel=1e-4)


@pytest.mark.parametrize("target", [["--tensor-model-parallel-size", "1"],
                                    ["--tensor-model-parallel-size", "4", "--zero-stage", "3"]],
                         ids=["tp1", "tp4-zero3"])
def test_resume_in_another_layout_continues_the_curve(runs, target):
    resumed = _losses(int(target[1]), BASE + target + ["--load", runs["src"]])
    assert sorted(resumed) == [4, 5, 6]
    _assert_continues(resumed, runs["straight"])


def _tool(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *args],
                          capture_output=True, text=True)


def test_consolidated_export_is_layout_invariant(runs):
    from megatron_normformer.checkpoint.release import load_consolidated

    out = []
    for name in ("src", "ref_dir"):
        path = str(runs["root"] / f"{name}_release")
        # The TP=1 run saved at iterations 3 and 6: read iteration 3 to compare like with like.
        tag = ["--tag", "iter_0000003"] if name == "ref_dir" else []
        done = _tool("--load", runs[name], *tag, "--output-consolidated", path)
        assert done.returncode == 0, done.stderr
        assert os.path.isfile(path + ".json")
        out.append(load_consolidated(path))
    (a, cfg_a), (b, cfg_b) = out
    assert cfg_a == cfg_b and a.keys() == b.keys()
    assert a["embedding.word_embeddings.weight"].shape[0] == cfg_a.vocab_size  # unpadded
    heads = cfg_a.num_attention_heads
    for name in a:
        x, y = a[name], b[name]
        if name.endswith("qkv.bias"):
            # The key bias adds the same q.b_k to every score of a row: softmax ignores it, its true
            # gradient is 0 and Adam turns round-off noise into lr-sized steps. Compare q and v.
            x, y = (t.view(heads, 3, -1)[:, [0, 2]] for t in (x, y))
        rel = ((x - y).norm() / y.norm().clamp_min(1e-12)).item()
        assert rel < 1e-5, (name, rel)


def test_offline_reshard_then_resume(runs):
    dst = str(runs["root"] / "resharded_tp1")
    done = _tool("--load", runs["src"], "--save", dst, "--target-tp", "1", "--target-pp", "1")
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(os.path.join(dst, "iter_0000003", "universal"))) == [
        "meta.json", "tp00_pp00.safetensors"]
    _assert_continues(_losses(1, BASE + ["--load", dst]), runs["straight"])


def test_consolidated_to_checkpoint_and_inference_from_training_dir(runs):
    from megatron_normformer.checkpoint.release import load_consolidated
    from megatron_normformer.checkpoint.inference import build_inference_model

    release = str(runs["root"] / "src_release")
    if not os.path.isfile(release + ".safetensors"):
        assert _tool("--load", runs["src"], "--output-consolidated", release).returncode == 0
    init = str(runs["root"] / "from_release")
    done = _tool("--load", release + ".safetensors", "--save", init,
                 "--target-tensor-parallel-size", "2")  # Megatron-LM's name for --target-tp
    assert done.returncode == 0, done.stderr
    assert "for TP=2, PP=1" in done.stdout
    assert sorted(os.listdir(os.path.join(init, "iter_0000000", "universal")))[-2:] == [
        "tp00_pp00.safetensors", "tp01_pp00.safetensors"]
    full, _ = load_consolidated(release)
    model, _ = build_inference_model(init)  # a training-checkpoint directory, any layout
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), full[name], rtol=0, atol=0)


def test_bad_inputs_are_named(tmp_path):
    done = _tool("--load", str(tmp_path / "nope"), "--output-consolidated", str(tmp_path / "x"))
    assert done.returncode == 2 and "nope" in done.stderr and "Traceback" not in done.stderr
    done = _tool("--load", str(tmp_path), "--save", str(tmp_path / "y"))
    assert done.returncode == 2 and "latest" in done.stderr


def test_megatron_and_short_target_flags_are_the_same_option():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_tool", os.path.join(ROOT, "tools", "convert_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    parser = tool.build_parser()
    long = parser.parse_args(["--load", "a", "--save", "b", "--target-tensor-parallel-size", "4",
                              "--target-pipeline-parallel-size", "2"])
    short = parser.parse_args(["--load", "a", "--save", "b", "--target-tp", "4", "--target-pp", "2"])
    assert vars(long) == vars(short) and (long.target_tp, long.target_pp) == (4, 2)


# -- the modern architecture (issue 24) ------------------------------------------------------------
MODERN = BASE + ["--position-embedding-type", "rope", "--swiglu", "--group-query-attention",
                 "--num-query-groups", "2", "--normalization", "RMSNorm", "--disable-bias-linear"]


def test_modern_checkpoint_converts_across_layouts(tmp_path):
    """Rotary positions, SwiGLU, two query groups, RMSNorm, no biases and the four NormFormer
    operations, trained at TP=2 (groups and the interleaved fc1 cut over two ranks) for six
    iterations; its iteration-3 checkpoint converted to (TP=1, PP=1) and (TP=1, PP=2) holds the same
    tensors bit for bit, and training resumed from it at PP=2 continues the TP=2 curve."""
    from megatron_normformer.checkpoint.convert import load_training_checkpoint, reshard

    src = str(tmp_path / "tp2")
    first = _losses(2, MODERN + ["--tensor-model-parallel-size", "2", "--save", src, "--save-interval", "3"])
    full, cfg = load_training_checkpoint(src, "iter_0000003")
    assert cfg.swiglu and cfg.num_query_groups == 2 and cfg.position_embedding_type == "rope"
    for pp in (1, 2):
        reshard(src, str(tmp_path / f"pp{pp}"), 1, pp, "iter_0000003")
        again, cfg_again = load_training_checkpoint(str(tmp_path / f"pp{pp}"))
        assert cfg_again == cfg and again.keys() == full.keys()
        assert all(torch.equal(again[k], full[k]) for k in full)
    resumed = _losses(2, MODERN + ["--pipeline-model-parallel-size", "2", "--load", str(tmp_path / "pp2")])
    assert sorted(resumed) == [4, 5, 6]
    _assert_continues(resumed, first)


def test_target_layout_the_model_cannot_run_is_refused(tmp_path):
    """A multi-query model (one K/V group) cannot be cut over two TP ranks: the conversion stops
    naming the groups before it writes anything (it used to check the heads only)."""
    from megatron_normformer.checkpoint.convert import _write_checkpoint
    from megatron_normformer.config import ModelConfig
    from megatron_normformer.config.base import ConfigError

    cfg = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=1,
                      vocab_size=100)
    with pytest.raises(ConfigError, match=r"--target-tp 2: --num-query-groups \(1\)"):
        _write_checkpoint(str(tmp_path / "out"), "iter_0000001", {}, {}, cfg, 2, 1, 1, {"run": {}})
    assert not os.path.exists(tmp_path / "out")
