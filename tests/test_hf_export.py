"""Hugging Face transformers export and import (``interop/hf.py``, ``convert_checkpoint.py
--output-hf``), checked in the real library.

For a grid of models (each NormFormer operation alone and all four, both HeadScale placements,
sinusoidal and learned positions with an offset, relu_squared, an untied output, fairseq's choices,
a plain GPT-2 that goes native, Llamas (rotary positions, SwiGLU, grouped-query attention, RMSNorm,
no biases; tied and untied) that go native, the same with the four NormFormer operations and other
modern mixes through the remote code, and a TP=2 x PP=2 training checkpoint) the transformers model
computes what ours computes: logits to 1e-5, the 32 greedy tokens of a left-padded batch, the loss
``evaluate_perplexity`` reports; and the tensors come back bit for bit. The tokenizers give our ids;
lm-eval's ``hf`` model gives our lm-eval adapter's numbers; the export loads in a process that cannot
import this package; bad inputs get one line.
"""
import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_normformer.arguments import add_model_args, model_config_from_args
from megatron_normformer.checkpoint.convert import from_full_state
from megatron_normformer.checkpoint.inference import build_inference_model, load_full_state
from megatron_normformer.checkpoint.release import build_model, full_state_dict, save_consolidated
from megatron_normformer.checkpoint.training import resolve_tag
from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.config.model import MODEL_SIZE_PRESETS
from megatron_normformer.data.tokenizers import build_tokenizer
from megatron_normformer.inference.generation import generate
from megatron_normformer.inference.perplexity import evaluate_perplexity
from megatron_normformer.interop import hf as hf_interop
from megatron_normformer.interop.hf_tokenizer import TokenizerFiles, write_hf_tokenizer
from megatron_normformer.model.bert import BertModel
from megatron_normformer.model.gpt import GPTModel
from megatron_normformer.parallel.state import SingleProcessState
from megatron_normformer.testing import spawn
from test_generate_loading import make_corpus_and_tokenizer
from test_lm_eval_adapter import OFFLINE, setup  # noqa: F401 - fixture reused
from test_tokenizers import CORPUS, trained_bpe  # noqa: F401 - fixture reused
from train_utils import ROOT, flags, train_many

os.environ.update(OFFLINE)
transformers = pytest.importorskip("transformers")

VOCAB, MAX_POS, NEW_TOKENS = 96, 64, 32
NORMFORMER = dict(scale_attn=True, scale_fc=True, scale_heads=True, scale_resids=True)
GRID = {
    "scale-attn": dict(scale_attn=True),
    "scale-fc": dict(scale_fc=True),
    "scale-heads": dict(scale_heads=True),
    "scale-resids": dict(scale_resids=True),
    "all-four": NORMFORMER,
    "post-proj-learned-offset-relu2-untied": dict(
        NORMFORMER, head_scale_position="post-proj", position_embedding_type="learned",
        position_embedding_offset=2, activation_fn="relu_squared",
        untie_embeddings_and_output_weights=True),
    "fairseq-choices": dict(NORMFORMER, head_scale_position="post-proj", position_embedding_offset=2,
                            final_layernorm=False, scale_embedding=False, activation_fn="relu"),
    "gpt2-native": dict(position_embedding_type="learned", scale_embedding=False),
}
LLAMA = dict(position_embedding_type="rope", swiglu=True, num_query_groups=2, normalization="RMSNorm",
             add_bias_linear=False, scale_embedding=False)
GRID.update({
    "llama-native-tied": LLAMA,
    "llama-native-untied": dict(LLAMA, untie_embeddings_and_output_weights=True),
    "llama-with-normformer": dict(LLAMA, **NORMFORMER),
    # multi-query attention, half the dims rotated, q/k norms, LayerNorm, biases, a plain activation
    "rope-half-mqa-qknorm-layernorm-bias": dict(
        NORMFORMER, position_embedding_type="rope", rotary_percent=0.5, rotary_base=500,
        num_query_groups=1, qk_layernorm=True, activation_fn="relu"),
})
NATIVE = {"gpt2-native": "GPT2LMHeadModel", "llama-native-tied": "LlamaForCausalLM",
          "llama-native-untied": "LlamaForCausalLM"}
TRAINED = "tp2-pp2-training-checkpoint"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread, and do not fight other processes for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB,
                       max_position_embeddings=MAX_POS, make_vocab_size_divisible_by=8,
                       hidden_dropout=0.0, attention_dropout=0.0, **changes)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight moved off its initial value (norm gains, HeadScale, ResScale away from 1), so
    that a tensor mapped to the wrong place changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def run_tool(name: str, *args):
    """``tools/<name>``'s main in this process, as a user runs it: (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, "tools", name))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = tool.main([str(a) for a in args]) or 0
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def convert_tool(*args):
    return run_tool("convert_checkpoint.py", *args)


def load_hf(path, masked=False):
    """The model of an export; a native one loads without trust_remote_code, which is the point."""
    auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
    remote = os.path.exists(os.path.join(path, "modeling_normformer.py"))
    return auto.from_pretrained(str(path), trust_remote_code=remote).eval()


def left_padded(prompts, pad=0):
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A training checkpoint written by a TP=2 x PP=2 run (four ranks, one iteration): every tensor
    split over two TP ranks, two pipeline stages, a separate output layer."""
    save = str(tmp_path_factory.mktemp("tp2pp2") / "ckpt")
    argv = flags("--mock-data --micro-batch-size 2 --global-batch-size 4 --train-iters 1",
                 "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --zero-stage 1",
                 "--untie-embeddings-and-output-weights --max-position-embeddings 64",
                 "--save", save, "--save-interval 1")
    spawn(train_many, 4, [argv])
    return save


@pytest.fixture(scope="module", params=[*GRID, TRAINED])
def case(request, tmp_path_factory):
    """(source checkpoint, its export, our model, the transformers model)."""
    tmp = tmp_path_factory.mktemp(request.param)
    out = tmp / "hf"
    if request.param == TRAINED:
        source = request.getfixturevalue("training_checkpoint")
        hf_interop.export_hf(*load_full_state(source), str(out))
    else:
        cfg = tiny_config(**GRID[request.param])
        model = perturbed(GPTModel(cfg, SingleProcessState(), seed=1), seed=len(request.param))
        source = str(tmp / "release")
        save_consolidated(source, full_state_dict(model, None, cfg.vocab_size), cfg)
        hf_interop.export_hf(*load_full_state(source), str(out))
    ours, _ = build_inference_model(source)
    return dict(name=request.param, source=source, out=out, ours=ours, hf=load_hf(out))


def test_native_exactly_when_the_layout_is_llamas_or_gpt2s(case):
    config = json.loads((case["out"] / "config.json").read_text())
    native = case["name"] in NATIVE
    assert type(case["hf"]).__name__ == NATIVE.get(case["name"], "NormFormerForCausalLM")
    assert ("auto_map" in config) != native
    assert (case["out"] / "modeling_normformer.py").exists() != native


def test_logits_equal_ours(case):
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = case["ours"].gather_logits(case["ours"](tokens))
        theirs = case["hf"](tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_greedy_generation_of_a_left_padded_batch_equals_ours(case):
    prompts = [[5, 17, 3, 44, 9, 60, 2], [71, 8, 30]]
    ours = generate(case["ours"], prompts, NEW_TOKENS).tokens
    ids, mask = left_padded(prompts)
    out = case["hf"].generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=0)
    assert out[:, ids.shape[1]:].tolist() == ours


def test_loss_with_labels_equals_evaluate_perplexity(case):
    batch = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(1))
    ours = evaluate_perplexity(case["ours"], [{"text": row.numpy()} for row in batch], 4)["loss"]
    with torch.no_grad():
        theirs = case["hf"](input_ids=batch, labels=batch).loss.item()
    assert theirs == pytest.approx(ours, rel=1e-6, abs=1e-6)


def test_ours_to_hf_to_ours_is_bit_identical(case):
    full, cfg = load_full_state(case["source"])
    back, cfg_back = load_full_state(str(case["out"]))  # load_full_state reads the HF directory
    assert cfg_back == cfg and back.keys() == full.keys()
    for name in full:
        assert torch.equal(back[name], full[name]), name


def test_hf_to_ours_to_hf_is_identical_through_the_tool(tmp_path):
    """--load DIR --save (TP=2) writes our format, which inference reads and exports again, same
    files."""
    cfg = tiny_config(**NORMFORMER)
    model = perturbed(GPTModel(cfg, SingleProcessState(), seed=2), seed=2)
    first = tmp_path / "first"
    hf_interop.export_hf(full_state_dict(model, None, cfg.vocab_size), cfg, str(first))
    code, out, err = convert_tool("--load", first, "--save", tmp_path / "ours", "--target-tp", 2)
    assert code == 0 and "for TP=2, PP=1 (fresh optimizer)" in out, err
    assert out.splitlines()[-1].startswith(
        f"train on with: pretrain_gpt.py --load {tmp_path / 'ours'} --finetune --vocab-size {VOCAB} "
        "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 256")
    assert sorted(os.listdir(tmp_path / "ours" / "iter_0000000" / "universal"))[-2:] == [
        "tp00_pp00.safetensors", "tp01_pp00.safetensors"]
    reloaded, _ = build_inference_model(str(tmp_path / "ours"))  # what generate / evaluate load
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(reloaded.named_parameters())[name]), name
    code, out, err = convert_tool("--load", tmp_path / "ours", "--output-hf", tmp_path / "second")
    assert code == 0, err
    assert out.splitlines() == [f"wrote {tmp_path / 'second'}: NormFormer remote code (trust_remote_code=True)",
                                "no tokenizer written (no --tokenizer-type given)"]
    for name in ("config.json", "configuration_normformer.py", "modeling_normformer.py"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("first", "second"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["post-proj-learned-offset-relu2-untied", "gpt2-native",
                                  "llama-native-untied"])
def test_a_model_fine_tuned_and_saved_by_transformers_comes_back(tmp_path, name):
    """One optimiser step in transformers, save_pretrained (its own file layout: a tied output is
    not stored), then our model from that directory computes what transformers' does."""
    cfg = tiny_config(**GRID[name])
    first = tmp_path / "export"
    hf_interop.export_hf(full_state_dict(perturbed(GPTModel(cfg, SingleProcessState(), seed=3), 3),
                                         None, VOCAB), cfg, str(first))
    model = load_hf(first).train()
    batch = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    model(input_ids=batch, labels=batch).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval().save_pretrained(str(tmp_path / "tuned"))
    full, cfg_back = load_full_state(str(tmp_path / "tuned"))
    assert cfg_back == cfg
    ours = build_model(full, cfg_back, SingleProcessState()).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, ours.gather_logits(ours(batch)), rtol=1e-5, atol=1e-5)
    from_full_state(full, cfg_back, str(tmp_path / "continue"), 2, 1)  # what --save writes


def test_a_transformers_llama_converts_to_a_training_checkpoint(tmp_path):
    """How Llama weights come in: a LlamaForCausalLM made by transformers (grouped-query, rope_theta
    500000, untied, bfloat16 on disk) -> --load DIR --save (TP=2): our model computes its logits."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False)
    torch.manual_seed(5)
    perturbed(transformers.LlamaForCausalLM(config), seed=5).to(torch.bfloat16).save_pretrained(
        str(tmp_path / "llama"))
    # read back in fp32: the bfloat16 model's rotary frequencies are bfloat16 too
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama"),
                                                               dtype=torch.float32).eval()
    code, out, err = convert_tool("--load", tmp_path / "llama", "--save", tmp_path / "ours", "--target-tp", 2)
    assert code == 0 and "for TP=2, PP=1 (fresh optimizer)" in out, err
    ours, cfg = build_inference_model(str(tmp_path / "ours"))
    # the printed command's model flags describe this model
    train_on = out.splitlines()[-1].split("--finetune --vocab-size 96 ")[1].split()
    rebuilt = model_config_from_args(add_model_args(argparse.ArgumentParser()).parse_args(train_on),
                                     vocab_size=VOCAB)
    assert ({k: v for k, v in rebuilt.to_dict().items() if not k.endswith("dropout")}
            == {k: v for k, v in cfg.to_dict().items() if not k.endswith("dropout")})
    assert (cfg.num_query_groups, cfg.rotary_base, cfg.ffn_hidden_size, cfg.hidden_dropout) == (
        2, 500000, 96, 0.0)
    assert cfg.untie_embeddings_and_output_weights and not cfg.scale_embedding
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours.gather_logits(ours(tokens)), theirs(tokens).logits,
                                   rtol=1e-5, atol=1e-5)


def test_a_fairseq_checkpoint_exports_straight_to_transformers(tmp_path):
    """fairseq -> --output-hf: transformers' logits equal fairseq's forward (the fairseq import
    test's float64 re-implementation), HeadScale after the projection, positions at offset 2, an
    untied output and no final norm carried through."""
    import test_fairseq_import as fairseq

    opts = fairseq.fairseq_model_cfg(**fairseq.CASES["untied-no-final-norm"])
    sd = fairseq.fairseq_checkpoint(tmp_path / "checkpoint_best.pt", opts, "cfg")
    code, out, err = convert_tool("--load", tmp_path / "checkpoint_best.pt", "--output-hf", tmp_path / "hf")
    assert code == 0, err
    tokens = fairseq._tokens()
    with torch.no_grad():
        logits = load_hf(tmp_path / "hf")(tokens).logits.double()
    torch.testing.assert_close(logits, fairseq.fairseq_logits(sd, opts, tokens), rtol=1e-5, atol=2e-5)


# -- the masked LM -------------------------------------------------------------------------------
@pytest.mark.parametrize("modern", [False, True], ids=["normformer", "normformer-rope-swiglu-gqa-rmsnorm"])
def test_masked_lm_exports_to_auto_model_for_masked_lm(tmp_path, modern):
    cfg = tiny_config(**NORMFORMER, **(LLAMA if modern else {}), bidirectional=True)
    ours = perturbed(BertModel(cfg, SingleProcessState(), seed=4), seed=4)
    full = full_state_dict(ours, None, VOCAB)
    hf_interop.export_hf(full, cfg, str(tmp_path / "hf"))
    theirs = load_hf(tmp_path / "hf", masked=True)
    assert type(theirs).__name__ == "NormFormerForMaskedLM"
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=g)
    padding = torch.ones_like(tokens)
    padding[1, 17:] = 0  # right padding
    loss_mask = (torch.rand(tokens.shape, generator=g) < 0.3) & padding.bool()
    labels = torch.where(loss_mask, torch.randint(0, VOCAB, tokens.shape, generator=g), -100)
    with torch.no_grad():
        ours_logits = ours.gather_logits(ours(tokens, padding))
        ours_loss = ours(tokens, padding, labels, loss_mask).mean()
        out = theirs(input_ids=tokens, attention_mask=padding, labels=labels)
    real = padding.bool()
    torch.testing.assert_close(out.logits[real], ours_logits[real], rtol=1e-5, atol=1e-5)
    assert out.loss.item() == pytest.approx(ours_loss.item(), rel=1e-6)
    back, cfg_back = load_full_state(str(tmp_path / "hf"))
    assert cfg_back == cfg and all(torch.equal(back[k], full[k]) for k in full)


# -- tokenizers ----------------------------------------------------------------------------------
SPECIAL_TEXT = ["<s> </s> <pad> <mask> <unk>", "text</s>more<|endoftext|>", "<0x41> \u2581lead",
                "  two  spaces,\ttab\nnewline  \n\n  ", "\u2581\u2581 \u2581x", "\ufb01 \u2460 \uff21 \uff76"]


def assert_same_ids(ours, hf_dir, texts):
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert type(theirs).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    for text in texts:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.encode(text, add_special_tokens=False) == ids, text
    return theirs


@pytest.fixture(scope="module")
def sentencepiece_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    corpus, bpe = make_corpus_and_tokenizer(tmp, docs=60, vocab=500)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input",
                           str(corpus), "--vocab-size", "500", "--model-type", "unigram",
                           "--output-prefix", str(tmp / "unigram")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    texts = [json.loads(line)["text"] for line in open(corpus)]
    return {"bpe": str(bpe), "unigram": str(tmp / "unigram.model")}, texts


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_exports_as_a_fast_tokenizer_with_our_ids(tmp_path, sentencepiece_models, kind):
    models, corpus = sentencepiece_models
    ours = build_tokenizer("SentencePieceTokenizer", tokenizer_model=models[kind])
    specials = write_hf_tokenizer(ours, TokenizerFiles("SentencePieceTokenizer", models[kind]),
                                  str(tmp_path), masked_lm=False, max_length=MAX_POS)
    theirs = assert_same_ids(ours, tmp_path, CORPUS + corpus + SPECIAL_TEXT)
    assert (theirs.eos_token_id, theirs.bos_token_id, theirs.pad_token_id, theirs.mask_token_id) == (
        ours.eod, ours.eod, ours.pad, ours.mask)
    assert theirs.unk_token == specials["unk_token"] == "<unk>"
    space = theirs.convert_tokens_to_ids("\u2581")  # generations that start with spaces decode alike
    for ids in [ours.encode(text) for text in CORPUS[:3] + corpus[:5]] + [
            [space] * 3, [space, space] + ours.encode("the end"), ours.encode("the end") + [space] * 2]:
        assert theirs.decode(ids) == ours.decode(ids), ids
    os.makedirs(tmp_path / "masked")
    masked = write_hf_tokenizer(ours, TokenizerFiles("SentencePieceTokenizer", models[kind]),
                                str(tmp_path / "masked"), masked_lm=True, max_length=MAX_POS)
    assert (masked["cls_token"], masked["sep_token"], masked["mask_token"]) == ("<s>", "</s>", "<mask>")


def test_gpt2_bpe_exports_as_a_fast_tokenizer_with_our_ids(tmp_path, trained_bpe):
    vocab, merges, texts = trained_bpe
    ours = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    write_hf_tokenizer(ours, TokenizerFiles("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges),
                       str(tmp_path), masked_lm=False, max_length=MAX_POS)
    theirs = assert_same_ids(ours, tmp_path, CORPUS + texts + SPECIAL_TEXT)
    assert theirs.eos_token_id == theirs.bos_token_id == ours.eod
    assert (theirs.pad_token_id, theirs.mask_token_id) == (ours.pad, ours.mask)
    assert theirs.decode(ours.encode(CORPUS[0])) == CORPUS[0]


def test_hf_tokenizer_json_is_carried_over(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<mask>": 4, "hello": 5, "world": 6}
    source = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    source.pre_tokenizer = pre_tokenizers.Whitespace()
    source.save(str(tmp_path / "source.json"))
    ours = build_tokenizer("HFTokenizer", tokenizer_model=str(tmp_path / "source.json"))
    os.makedirs(tmp_path / "hf")
    write_hf_tokenizer(ours, TokenizerFiles("HFTokenizer", str(tmp_path / "source.json")),
                       str(tmp_path / "hf"), masked_lm=False, max_length=MAX_POS)
    theirs = assert_same_ids(ours, tmp_path / "hf", ["hello world hello", "world  hello\tworld"])
    assert theirs.eos_token_id == ours.eod == 2


# -- a trained model with its tokenizer: the tools, lm-eval, and a process without this package ----
@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory):
    """The lm-eval test's trained SentencePiece model, exported by the tool with its tokenizer."""
    out = tmp_path_factory.mktemp("trained") / "hf"
    sp_model = setup["tmp"] / "sp.model"
    code, stdout, stderr = convert_tool("--load", setup["base"] + ".safetensors", "--output-hf", out,
                                        "--tokenizer-type", "SentencePieceTokenizer",
                                        "--tokenizer-model", sp_model)
    assert code == 0, stderr
    assert stdout.splitlines() == [f"wrote {out}: NormFormer remote code (trust_remote_code=True)"]
    assert sorted(os.listdir(out)) == [
        "config.json", "configuration_normformer.py", "generation_config.json", "model.safetensors",
        "modeling_normformer.py", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    return dict(out=out, sp_model=sp_model)


def test_generate_tool_and_transformers_generate_the_same_text(setup, exported):
    """tools/generate.py (reading the HF directory itself) and transformers' generate(), 32 tokens."""
    prompts = [item["context"] for item in setup["items"][:3]]
    argv = ["--load", str(exported["out"]), "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", str(exported["sp_model"]), "--greedy", "--json",
            "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    code, out, err = run_tool("generate.py", *argv)
    assert code == 0, err
    ours = [json.loads(line)["tokens"] for line in out.splitlines()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported["out"]))
    assert tokenizer.padding_side == "left"  # the export's, as generate() needs
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    generated = load_hf(exported["out"]).generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    for row, tokens in zip(generated[:, batch["input_ids"].shape[1]:].tolist(), ours):
        eod = tokenizer.eos_token_id
        assert (row[:row.index(eod)] if eod in row else row) == tokens


def test_lm_eval_hf_model_gives_our_adapters_numbers(setup, exported):
    """lm-eval's ``hf`` model on the export and our ``megatron_normformer`` model on the checkpoint:
    the same loglikelihoods, accuracy, rolling loglikelihoods and generations."""
    import lm_eval
    import lm_eval.models  # noqa: F401 - registers "hf": lm-eval imports its models only into an empty registry
    from lm_eval.tasks import TaskManager

    import megatron_normformer.inference.lm_eval  # noqa: F401 - registers ours

    os.environ["HF_DATASETS_CACHE"] = str(setup["tmp"] / "hf_cache")
    tasks = TaskManager(include_path=str(setup["tasks"]), include_defaults=False)  # ours only: fast
    hf_args = f"pretrained={exported['out']},trust_remote_code=True,dtype=float32"
    theirs, ours = (lm_eval.simple_evaluate(
        model=model, model_args=args, tasks=["nf_tiny_mc", "nf_tiny_rolling", "nf_tiny_gen"],
        task_manager=tasks, batch_size=3, device="cpu", log_samples=True)
        for model, args in (("hf", hf_args), ("megatron_normformer", setup["model_args"])))

    def samples(result, task):
        return sorted(result["samples"][task], key=lambda s: s["doc_id"])

    for task, tolerance in (("nf_tiny_mc", 1e-5), ("nf_tiny_rolling", 1e-4)):
        assert len(samples(theirs, task)) == len(samples(ours, task)) > 0
        for x, y in zip(samples(theirs, task), samples(ours, task)):
            got, want = (torch.tensor([float(v[0]) if isinstance(v, (list, tuple)) else float(v)
                                       for v in s["filtered_resps"]]) for s in (x, y))
            torch.testing.assert_close(got, want, rtol=1e-6, atol=tolerance)
    assert theirs["results"]["nf_tiny_mc"]["acc,none"] == ours["results"]["nf_tiny_mc"]["acc,none"]
    assert ([s["resps"] for s in samples(theirs, "nf_tiny_gen")]
            == [s["resps"] for s in samples(ours, "nf_tiny_gen")])


NO_PACKAGE = """
import json, sys
sys.modules["megatron_normformer"] = None  # importing it now fails: the export must not need it
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = tokenizer(sys.argv[2], return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(ids).logits[0]
with open(sys.argv[3], "w") as f:
    json.dump({"ids": ids[0].tolist(), "logits": logits.tolist()}, f)
"""


def test_export_loads_where_this_package_cannot_be_imported(setup, exported, tmp_path):
    text = setup["items"][0]["context"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", NO_PACKAGE, str(exported["out"]), text,
                           str(tmp_path / "result.json")],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    ids = setup["tok"].encode(text)
    assert result["ids"] == ids
    ours, _ = build_inference_model(setup["base"])
    with torch.no_grad():
        expected = ours.gather_logits(ours(torch.tensor([ids])))[0]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-5, atol=1e-5)


# -- bad input, and what the export must keep up with ----------------------------------------------
def test_bad_inputs_get_one_line(tmp_path):
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2",
                                                  "architectures": ["Qwen2ForCausalLM"]}))
    llama31 = tmp_path / "llama31"  # Llama 3.1's scaled rope
    llama31.mkdir()
    (llama31 / "config.json").write_text(json.dumps({
        "model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    cfg = tiny_config(**NORMFORMER)
    release = str(tmp_path / "release")
    full = full_state_dict(GPTModel(cfg, SingleProcessState()), None, VOCAB)
    save_consolidated(release, full, cfg)
    modern = str(tmp_path / "modern")
    modern_cfg = tiny_config(**dict(LLAMA, add_bias_linear=True))
    save_consolidated(modern, full_state_dict(GPTModel(modern_cfg, SingleProcessState()), None, VOCAB),
                      modern_cfg)
    partial = tmp_path / "partial"
    hf_interop.export_hf(full, cfg, str(partial))
    weights = load_file(str(partial / "model.safetensors"))
    del weights["model.layers.1.mlp.ffn_layernorm.bias"]
    save_file(weights, str(partial / "model.safetensors"))
    cases = [
        (["--load", partial, "--save", tmp_path / "t"],
         "the weights do not match config.json: missing ['layers.1.mlp.ffn_layernorm.bias'], unexpected []"),
        (["--load", qwen, "--save", tmp_path / "x"], "a transformers qwen2 model (Qwen2ForCausalLM); "
         "only NormFormer exports (--output-hf), Llama and GPT-2 convert"),
        (["--load", llama31, "--save", tmp_path / "x2"],
         "rope_type 'llama3'; only unscaled rotary positions convert"),
        (["--load", broken, "--output-hf", tmp_path / "y"], "config.json: not a transformers config"),
        (["--load", tmp_path / "nothing", "--output-hf", tmp_path / "z"], "nothing"),
        (["--load", release, "--output-hf", tmp_path / "w", "--hf-native"],
         "--hf-native: this model is no GPT-2: NormFormer operations (--scale-attn, --scale-fc, "
         "--scale-heads, --scale-resids)"),
        (["--load", modern, "--output-hf", tmp_path / "w2", "--hf-native"],
         "--hf-native: this model is no Llama: linears with biases (Llama's have none: "
         "--disable-bias-linear)"),
        (["--load", release, "--save", tmp_path / "v", "--tokenizer-type", "NullTokenizer"],
         "--tokenizer-type and --hf-native go with --output-hf"),
        (["--load", release, "--output-hf", tmp_path / "u", "--tokenizer-type", "GPT2BPETokenizer"],
         "GPT2BPETokenizer needs --vocab-file"),
    ]
    for argv, message in cases:
        code, out, err = convert_tool(*argv)
        lines = [line for line in err.splitlines() if "error" in line]
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, err)
        assert "Traceback" not in err
    # pretrain_gpt.py --load takes training checkpoints only, and says how to make one
    with pytest.raises(ConfigError, match=re.escape(f"--load {partial}: a Hugging Face directory, not a "
                                                    "training checkpoint; make one with tools/")):
        resolve_tag(str(partial))


def test_null_tokenizer_exports_without_a_tokenizer_and_says_so(tmp_path):
    cfg = tiny_config()
    release = str(tmp_path / "release")
    save_consolidated(release, full_state_dict(GPTModel(cfg, SingleProcessState()), None, VOCAB), cfg)
    code, out, err = convert_tool("--load", release, "--output-hf", tmp_path / "hf", "--tokenizer-type",
                                  "NullTokenizer")
    assert code == 0, err
    assert out.splitlines()[-1] == "no tokenizer written (a NullTokenizer's ids are the text)"
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == {
        "bos_token_id": VOCAB - 1, "eos_token_id": VOCAB - 1}


FORWARD_FIELDS = {  # ModelConfig field -> the NormFormerConfig attribute the modeling code reads
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads", "ffn_hidden_size": "intermediate_size",
    "vocab_size": "vocab_size", "max_position_embeddings": "max_position_embeddings",
    "position_embedding_type": "position_embedding_type",
    "position_embedding_offset": "position_embedding_offset", "activation_fn": "activation_fn",
    "scale_attn": "scale_attn", "scale_fc": "scale_fc", "scale_heads": "scale_heads",
    "scale_resids": "scale_resids", "head_scale_position": "head_scale_position",
    "untie_embeddings_and_output_weights": "tie_word_embeddings", "final_layernorm": "final_layernorm",
    "hidden_dropout": "hidden_dropout", "attention_dropout": "attention_dropout",
    "layernorm_epsilon": "layer_norm_eps", "scale_embedding": "scale_embedding",
    "bidirectional": "bidirectional", "rotary_base": "rotary_base", "rotary_percent": "rotary_percent",
    "swiglu": "swiglu", "num_query_groups": "num_query_groups", "normalization": "normalization",
    "add_bias_linear": "add_bias_linear", "qk_layernorm": "qk_layernorm",
}


@pytest.mark.parametrize("size", [name for name in MODEL_SIZE_PRESETS if name.startswith("llama-")])
def test_llama_presets_export_as_native_llamas(size):
    cfg = ModelConfig(vocab_size=VOCAB, **MODEL_SIZE_PRESETS[size].fields()).validate()
    assert hf_interop.llama_refusal(cfg) is None
    assert hf_interop.llama_refusal(dataclasses.replace(cfg, scale_resids=True)) == (
        "NormFormer operations (--scale-resids)")


def test_every_model_config_field_reaches_the_exported_model():
    """A field added to ModelConfig fails here until the export carries it: either the modeling
    code reads it, or it does not change what a trained model computes."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert fields == set(FORWARD_FIELDS) | set(hf_interop.TRAINING_ONLY_FIELDS)
    source = open(os.path.join(hf_interop.REMOTE_CODE_DIR, "modeling_normformer.py")).read()
    config = hf_interop.normformer_config(tiny_config())
    for field, attribute in FORWARD_FIELDS.items():
        assert attribute in config, field
        assert f"config.{attribute}" in source, attribute
