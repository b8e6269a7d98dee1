"""Hugging Face transformers directories: export a model there, and bring one back.

An export (:func:`export_hf`) is a directory that ``transformers`` loads with nothing else
installed:

    config.json                   the architecture, ``auto_map`` naming the two files below
    configuration_normformer.py   NormFormerConfig      (interop/hf_remote/, copied)
    modeling_normformer.py        NormFormerForCausalLM / NormFormerForMaskedLM (plain torch)
    model.safetensors             the full fp32 tensors under transformers-style names
    generation_config.json        eos / bos / pad ids, when a tokenizer says what they are
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   (hf_tokenizer.py)

and loads with ``trust_remote_code=True``. A model whose layout is Llama's (:func:`llama_refusal`
says why one is not) goes out as a native ``LlamaForCausalLM`` instead, one whose layout is GPT-2's
(:func:`gpt2_refusal`) as a native ``GPT2LMHeadModel``; neither needs remote code.

The way back (:func:`load_hf_directory`) reads either kind, however it was fine-tuned and saved
since (any float dtype, one or several safetensors files, or ``pytorch_model.bin``), and any Llama
or GPT-2 checkpoint of transformers, into full fp32 tensors by this project's TP=1 names and a
``ModelConfig``: what ``checkpoint.inference.load_full_state`` returns for any checkpoint.

Tensor names: ours (``checkpoint/release.py``) with the embeddings, the final LayerNorm and the
output layer renamed (:func:`renames`); every other tensor keeps its name under ``model.``. The fused
QKV keeps our group-major rows and a SwiGLU fc1 its interleaved gate/up rows, so the round trip is a
renaming, bit for bit. The native layouts split them (row slices, bit for bit as well).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.data.tokenizers import Tokenizer
from megatron_normformer.interop.hf_tokenizer import TokenizerFiles, write_hf_tokenizer
from megatron_normformer.model.bert import BertModel
from megatron_normformer.model.gpt import GPTModel
from megatron_normformer.parallel.state import SingleProcessState

MODEL_TYPE = "normformer"
REMOTE_CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote")
REMOTE_FILES = ("configuration_normformer.py", "modeling_normformer.py")
WEIGHTS = "model.safetensors"

HF_FIELD_NAMES = {"num_layers": "num_hidden_layers", "ffn_hidden_size": "intermediate_size",
                  "layernorm_epsilon": "layer_norm_eps", "init_method_std": "initializer_range"}
"""ModelConfig fields that transformers knows under another name; the others keep theirs, and
``untie_embeddings_and_output_weights`` is the negation of ``tie_word_embeddings``."""
TRAINING_ONLY_FIELDS = ("init_scheme", "init_method_std", "make_vocab_size_divisible_by")
"""ModelConfig fields that do not change what a trained model computes."""


def renames(cfg: ModelConfig) -> List[Tuple[str, str]]:
    """(our name prefix, transformers name prefix), the first match applying."""
    if cfg.bidirectional:
        head = [("final_layernorm.", "model.final_layernorm."), ("lm_head.", "lm_head.")]
    else:
        head = [("head.final_layernorm.", "model.final_layernorm."), ("head.weight", "lm_head.weight")]
    return [("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
            ("embedding.position_embeddings", "model.embed_positions.weight"),
            ("layers.", "model.layers."), *head]


def _rename(tensors: Dict[str, torch.Tensor], pairs: List[Tuple[str, str]], what: str
            ) -> Dict[str, torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        new = next((to + name[len(frm):] for frm, to in pairs if name.startswith(frm)), None)
        if new is None:
            raise ConfigError(f"{what}: tensor {name} has no counterpart")
        out[new] = tensor
    return out


# -- the config --------------------------------------------------------------------------------
def normformer_config(cfg: ModelConfig) -> dict:
    """config.json of the remote-code export: every ModelConfig field, transformers' names first."""
    out = {}
    for field, value in cfg.to_dict().items():
        if field == "untie_embeddings_and_output_weights":
            out["tie_word_embeddings"] = not value
        else:
            out[HF_FIELD_NAMES.get(field, field)] = value
    task = "MaskedLM" if cfg.bidirectional else "CausalLM"
    out.update(model_type=MODEL_TYPE, architectures=[f"NormFormerFor{task}"], torch_dtype="float32",
               auto_map={"AutoConfig": "configuration_normformer.NormFormerConfig",
                         "AutoModel": "modeling_normformer.NormFormerModel",
                         f"AutoModelFor{task}": f"modeling_normformer.NormFormerFor{task}"})
    return out


def model_config_from_normformer(config: dict) -> ModelConfig:
    fields = {}
    for field in (f.name for f in dataclasses.fields(ModelConfig)):
        if field == "untie_embeddings_and_output_weights":
            if "tie_word_embeddings" in config:
                fields[field] = not config["tie_word_embeddings"]
        elif HF_FIELD_NAMES.get(field, field) in config:
            fields[field] = config[HF_FIELD_NAMES.get(field, field)]
    return ModelConfig(**fields).validate()


# -- native GPT-2 --------------------------------------------------------------------------------
GPT2_ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}
"""Our activation -> transformers' ACT2FN name (exact gelu; GPT-2's own default is gelu_new, the
tanh approximation, which no model here computes)."""


def gpt2_refusal(cfg: ModelConfig) -> Optional[str]:
    """Why ``cfg``'s model is not a GPT-2 (None: it is one, and exports as GPT2LMHeadModel).

    GPT-2 is the plain Pre-LN layer with learned positions from row 0, biases everywhere, a final
    LayerNorm, the output tied to the unscaled token embedding and attention scaled by
    1/sqrt(head_dim); layer count, widths, vocabulary, epsilon and dropouts may be anything."""
    common = _plain_transformer_refusal(cfg)
    if common:
        return common
    if cfg.swiglu:
        return "a gated FFN (--swiglu)"
    if cfg.query_groups != cfg.num_attention_heads:
        return "grouped-query attention (--num-query-groups)"
    if cfg.normalization != "LayerNorm":
        return f"{cfg.normalization} (GPT-2's norms are LayerNorm)"
    if not cfg.add_bias_linear:
        return "linears without biases (--disable-bias-linear)"
    if cfg.position_embedding_type != "learned":
        return f"{cfg.position_embedding_type} positions (GPT-2 learns them)"
    if cfg.activation_fn not in GPT2_ACTIVATIONS:
        return f"activation {cfg.activation_fn}"
    if cfg.untie_embeddings_and_output_weights:
        return "a separate output layer"
    return None


def _plain_transformer_refusal(cfg: ModelConfig) -> Optional[str]:
    """What GPT-2 and Llama both lack: a masked LM, the NormFormer operations, and the rest."""
    ops = [flag for flag, on in (("--scale-attn", cfg.scale_attn), ("--scale-fc", cfg.scale_fc),
                                 ("--scale-heads", cfg.scale_heads), ("--scale-resids", cfg.scale_resids))
           if on]
    if cfg.bidirectional:
        return "a masked LM"
    if ops:
        return f"NormFormer operations ({', '.join(ops)})"
    if cfg.qk_layernorm:
        return "norms on queries and keys (--qk-layernorm)"
    if cfg.scale_embedding:
        return "scaled token embeddings"
    if cfg.position_embedding_offset:
        return f"position offset {cfg.position_embedding_offset}"
    if not cfg.final_layernorm:
        return "no final norm"
    return None


def _qkv_to_gpt2(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Our [heads, (q, k, v), head_dim] rows -> GPT-2's [(q, k, v), heads, head_dim]."""
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _qkv_from_gpt2(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(3, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _gpt2_pairs(layer: int) -> List[Tuple[str, str, bool]]:
    """(our name, GPT-2's name, transposed: GPT-2's Conv1D keeps weights as [in, out])."""
    ours, theirs = f"layers.{layer}.", f"transformer.h.{layer}."
    pairs = [("input_layernorm", "ln_1", False), ("attention.qkv", "attn.c_attn", True),
             ("attention.dense", "attn.c_proj", True), ("pre_mlp_layernorm", "ln_2", False),
             ("mlp.fc1", "mlp.c_fc", True), ("mlp.fc2", "mlp.c_proj", True)]
    return [(f"{ours}{a}.{p}", f"{theirs}{b}.{p}", t and p == "weight")
            for a, b, t in pairs for p in ("weight", "bias")]


GPT2_GLOBAL = (("embedding.word_embeddings.weight", "transformer.wte.weight"),
               ("embedding.position_embeddings", "transformer.wpe.weight"),
               ("head.final_layernorm.weight", "transformer.ln_f.weight"),
               ("head.final_layernorm.bias", "transformer.ln_f.bias"))


def gpt2_config(cfg: ModelConfig) -> dict:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "torch_dtype": "float32",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_position_embeddings,
            "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_attention_heads,
            "n_inner": cfg.ffn_hidden_size, "activation_function": GPT2_ACTIVATIONS[cfg.activation_fn],
            "resid_pdrop": cfg.hidden_dropout, "embd_pdrop": cfg.hidden_dropout,
            "attn_pdrop": cfg.attention_dropout, "layer_norm_epsilon": cfg.layernorm_epsilon,
            "initializer_range": cfg.init_method_std, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True, "use_cache": True,
            # transformers keeps unknown keys: how the model was set up to train, for the way back
            "megatron_normformer": {k: getattr(cfg, k) for k in ("init_scheme",
                                                                 "make_vocab_size_divisible_by")}}


def gpt2_tensors(full: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    heads = cfg.num_attention_heads
    out = {theirs: full[ours] for ours, theirs in GPT2_GLOBAL}
    for layer in range(cfg.num_layers):
        for ours, theirs, transpose in _gpt2_pairs(layer):
            t = full[ours]
            if ".attention.qkv." in ours:
                t = _qkv_to_gpt2(t, heads)
            out[theirs] = t.t().contiguous() if transpose else t
    return out


def _model_config_from_gpt2(path: str, config: dict) -> ModelConfig:
    activation = config.get("activation_function", "gelu_new")
    ours = {v: k for k, v in GPT2_ACTIVATIONS.items()}
    problems = []
    if activation not in ours:
        problems.append(f"activation_function {activation!r} (gelu and relu convert)")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if config.get(key, ok) != ok:
            problems.append(f"{key}={config[key]}")
    if problems:
        raise ConfigError(f"{path}: this GPT-2 has no equivalent here: {', '.join(problems)}")
    d = config.get("n_embd", 768)
    kept = config.get("megatron_normformer", {})
    return ModelConfig(
        num_layers=config.get("n_layer", 12), hidden_size=d, num_attention_heads=config.get("n_head", 12),
        ffn_hidden_size=config.get("n_inner") or 4 * d, vocab_size=config.get("vocab_size", 50257),
        max_position_embeddings=config.get("n_positions", 1024), position_embedding_type="learned",
        activation_fn=ours[activation], layernorm_epsilon=config.get("layer_norm_epsilon", 1e-5),
        hidden_dropout=config.get("resid_pdrop", 0.1), attention_dropout=config.get("attn_pdrop", 0.1),
        init_method_std=config.get("initializer_range", 0.02), scale_embedding=False,
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", True),
        init_scheme=kept.get("init_scheme", "megatron"),
        make_vocab_size_divisible_by=kept.get("make_vocab_size_divisible_by", 128)).validate()


def _from_gpt2(path: str, tensors: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    # Checkpoints of the bare GPT2Model have no "transformer." prefix; the attention-mask buffers
    # older versions saved are not weights.
    tensors = {("" if k.startswith(("transformer.", "lm_head.")) else "transformer.") + k: v
               for k, v in tensors.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    full = {}
    pairs = [(o, t, False) for o, t in GPT2_GLOBAL]
    pairs += [p for layer in range(cfg.num_layers) for p in _gpt2_pairs(layer)]
    if cfg.untie_embeddings_and_output_weights:
        pairs.append(("head.weight", "lm_head.weight", False))
    for ours, theirs, transpose in pairs:
        if theirs not in tensors:
            raise ConfigError(f"{path}: GPT-2 tensor {theirs} is missing")
        t = tensors[theirs].t() if transpose else tensors[theirs]
        if ".attention.qkv." in ours:
            t = _qkv_from_gpt2(t, cfg.num_attention_heads)
        full[ours] = t.contiguous()
    return full


# -- native Llama --------------------------------------------------------------------------------
def llama_refusal(cfg: ModelConfig) -> Optional[str]:
    """Why ``cfg``'s model is not a Llama (None: it is one, and exports as LlamaForCausalLM).

    Llama is the Pre-RMSNorm layer with rotary positions over every head dim, a SwiGLU FFN, no
    biases, a final RMSNorm, an unscaled token embedding and attention scaled by 1/sqrt(head_dim);
    layer count, widths, query groups, vocabulary, epsilon, rotary base and a tied or separate
    output layer may be anything."""
    common = _plain_transformer_refusal(cfg)
    if common:
        return common
    if cfg.position_embedding_type != "rope":
        return f"{cfg.position_embedding_type} positions (Llama's are rotary)"
    if cfg.rotary_percent != 1.0:
        return f"rotary_percent {cfg.rotary_percent} (Llama rotates every dim)"
    if not cfg.swiglu:
        return f"a {cfg.activation_fn} FFN (Llama's is --swiglu)"
    if cfg.normalization != "RMSNorm":
        return f"{cfg.normalization} (Llama's norms are RMSNorm)"
    if cfg.add_bias_linear:
        return "linears with biases (Llama's have none: --disable-bias-linear)"
    return None


def _llama_pairs(layer: int) -> List[Tuple[str, str]]:
    ours, theirs = f"layers.{layer}.", f"model.layers.{layer}."
    return [(f"{ours}input_layernorm.weight", f"{theirs}input_layernorm.weight"),
            (f"{ours}attention.dense.weight", f"{theirs}self_attn.o_proj.weight"),
            (f"{ours}pre_mlp_layernorm.weight", f"{theirs}post_attention_layernorm.weight"),
            (f"{ours}mlp.fc2.weight", f"{theirs}mlp.down_proj.weight")]


LLAMA_GLOBAL = (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                ("head.final_layernorm.weight", "model.norm.weight"))
LLAMA_KEPT = ("init_scheme", "make_vocab_size_divisible_by", "hidden_dropout", "init_method_std")
"""ModelConfig fields Llama's config has no place for, kept under ``megatron_normformer``."""


def llama_config(cfg: ModelConfig) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.query_groups,
            "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_position_embeddings,
            "initializer_range": cfg.init_method_std, "rms_norm_eps": cfg.layernorm_epsilon,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
            "rope_theta": float(cfg.rotary_base),  # where transformers 4 reads it
            "attention_bias": False, "mlp_bias": False, "attention_dropout": cfg.attention_dropout,
            "pretraining_tp": 1, "use_cache": True,
            "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
            "megatron_normformer": {k: getattr(cfg, k) for k in LLAMA_KEPT}}


def _qkv_rows(cfg: ModelConfig) -> Tuple[int, int, int]:
    """(query heads per group, groups, head_dim) of our group-major fused QKV."""
    groups = cfg.query_groups
    return cfg.num_attention_heads // groups, groups, cfg.head_dim


def llama_tensors(full: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    per_group, groups, head_dim = _qkv_rows(cfg)
    out = {theirs: full[ours] for ours, theirs in LLAMA_GLOBAL}
    if cfg.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = full["head.weight"]
    for layer in range(cfg.num_layers):
        out.update({theirs: full[ours] for ours, theirs in _llama_pairs(layer)})
        prefix = f"model.layers.{layer}."
        qkv = full[f"layers.{layer}.attention.qkv.weight"].view(groups, per_group + 2, head_dim, -1)
        out[prefix + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(-1, cfg.hidden_size)
        out[prefix + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(-1, cfg.hidden_size)
        out[prefix + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(-1, cfg.hidden_size)
        fc1 = full[f"layers.{layer}.mlp.fc1.weight"]
        out[prefix + "mlp.gate_proj.weight"] = fc1[0::2]
        out[prefix + "mlp.up_proj.weight"] = fc1[1::2]
    return out


def _rope_theta(path: str, config: dict) -> float:
    """rope_theta of a transformers 5 (``rope_parameters``) or 4 (``rope_theta``, ``rope_scaling``)
    config; a scaled rope (Llama 3.1's "llama3", "linear", "yarn", ...) has no equivalent here."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"{path}: rope_type {kind!r}; only unscaled rotary positions convert")
    if params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{path}: a partial_rotary_factor; Llama rotates every dim")
    return params.get("rope_theta", config.get("rope_theta", 10000.0))


def _model_config_from_llama(path: str, config: dict) -> ModelConfig:
    problems = [f"{key}={config[key]!r}" for key, ok in (
        ("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False), ("pretraining_tp", 1))
        if config.get(key, ok) != ok]
    d, heads = config.get("hidden_size", 4096), config.get("num_attention_heads", 32)
    if config.get("head_dim") not in (None, d // heads):
        problems.append(f"head_dim={config['head_dim']} (hidden_size / num_attention_heads here)")
    if problems:
        raise ConfigError(f"{path}: this Llama has no equivalent here: {', '.join(problems)}")
    theta = _rope_theta(path, config)
    kept = config.get("megatron_normformer", {})
    return ModelConfig(
        num_layers=config.get("num_hidden_layers", 32), hidden_size=d, num_attention_heads=heads,
        num_query_groups=None if config.get("num_key_value_heads") in (None, heads)
        else config["num_key_value_heads"],
        ffn_hidden_size=config.get("intermediate_size", 11008), vocab_size=config.get("vocab_size", 32000),
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        position_embedding_type="rope", rotary_base=int(theta) if float(theta).is_integer() else theta,
        swiglu=True, normalization="RMSNorm", add_bias_linear=False,
        layernorm_epsilon=config.get("rms_norm_eps", 1e-6),
        hidden_dropout=kept.get("hidden_dropout", 0.0),  # Llama trains without it
        attention_dropout=config.get("attention_dropout", 0.0) or 0.0,
        init_method_std=kept.get("init_method_std", config.get("initializer_range", 0.02)),
        scale_embedding=False, init_scheme=kept.get("init_scheme", "megatron"),
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        make_vocab_size_divisible_by=kept.get("make_vocab_size_divisible_by", 128)).validate()


def _from_llama(path: str, tensors: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    # A bare LlamaModel's checkpoint has no "model." prefix.
    tensors = {("" if k.startswith(("model.", "lm_head.")) else "model.") + k: v
               for k, v in tensors.items() if not k.endswith(".rotary_emb.inv_freq")}

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ConfigError(f"{path}: Llama tensor {name} is missing")
        return tensors[name]

    per_group, groups, head_dim = _qkv_rows(cfg)
    full = {ours: get(theirs) for ours, theirs in LLAMA_GLOBAL}
    if cfg.untie_embeddings_and_output_weights:
        full["head.weight"] = get("lm_head.weight")
    for layer in range(cfg.num_layers):
        full.update({ours: get(theirs) for ours, theirs in _llama_pairs(layer)})
        prefix = f"model.layers.{layer}."
        q, k, v = (get(f"{prefix}self_attn.{n}_proj.weight").view(groups, -1, head_dim, cfg.hidden_size)
                   for n in "qkv")
        full[f"layers.{layer}.attention.qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(
            (per_group + 2) * groups * head_dim, cfg.hidden_size)
        gate, up = get(f"{prefix}mlp.gate_proj.weight"), get(f"{prefix}mlp.up_proj.weight")
        full[f"layers.{layer}.mlp.fc1.weight"] = torch.stack([gate, up], dim=1).flatten(0, 1)
    return {name: t.contiguous() for name, t in full.items()}


# -- writing -------------------------------------------------------------------------------------
@dataclass
class HFExport:
    """What :func:`export_hf` wrote."""

    directory: str
    native: Optional[str]
    """The native transformers class written (``LlamaForCausalLM``, ``GPT2LMHeadModel``), None
    for the NormFormer remote code."""
    special_tokens: Optional[Dict[str, str]]
    """The tokenizer's special tokens by role; None when no tokenizer was written."""


def export_hf(full: Dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str,
              tokenizer: Optional[Tokenizer] = None, tokenizer_files: Optional[TokenizerFiles] = None,
              native: Optional[bool] = None) -> HFExport:
    """Write the transformers directory of the model ``(full, cfg)`` (``load_full_state``'s form).

    ``native``: None exports as Llama or GPT-2 when the layout allows it (:func:`llama_refusal`,
    :func:`gpt2_refusal`), True insists (a ConfigError says why not), False always writes the
    NormFormer remote code."""
    llama_reason, gpt2_reason = llama_refusal(cfg), gpt2_refusal(cfg)
    if native and llama_reason and gpt2_reason:
        modern = cfg.swiglu or cfg.position_embedding_type == "rope" or cfg.normalization == "RMSNorm"
        family, reason = ("Llama", llama_reason) if modern else ("GPT-2", gpt2_reason)
        raise ConfigError(f"--hf-native: this model is no {family}: {reason}")
    kind = None
    if native is not False:
        kind = ("LlamaForCausalLM" if llama_reason is None
                else "GPT2LMHeadModel" if gpt2_reason is None else None)
    os.makedirs(out_dir, exist_ok=True)
    if kind:
        if kind == "LlamaForCausalLM":
            tensors, config = llama_tensors(full, cfg), llama_config(cfg)
        else:
            tensors, config = gpt2_tensors(full, cfg), gpt2_config(cfg)
        for name in REMOTE_FILES:  # an earlier export's code would now be wrong
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    else:
        tensors = _rename(full, renames(cfg), "--output-hf")
        config = normformer_config(cfg)
        for name in REMOTE_FILES:
            shutil.copyfile(os.path.join(REMOTE_CODE_DIR, name), os.path.join(out_dir, name))
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, os.path.join(out_dir, WEIGHTS),
              metadata={"format": "pt"})

    # Without a tokenizer no id is known (GPT-2's config would otherwise claim 50256).
    specials, ids = None, {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.cls if cfg.bidirectional else tokenizer.eod,
               "eos_token_id": tokenizer.sep if cfg.bidirectional else tokenizer.eod,
               "pad_token_id": tokenizer.pad}
        specials = write_hf_tokenizer(tokenizer, tokenizer_files, out_dir, cfg.bidirectional,
                                      cfg.max_position_embeddings)
    _write_json(os.path.join(out_dir, "config.json"), dict(config, **ids))
    generation = {k: v for k, v in ids.items() if v is not None}
    if generation and not cfg.bidirectional:
        _write_json(os.path.join(out_dir, "generation_config.json"), generation)
    return HFExport(out_dir, kind, specials)


def _write_json(path: str, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write("\n")


# -- reading -------------------------------------------------------------------------------------
def is_hf_directory(path: str) -> bool:
    """A directory with transformers' ``config.json`` (a training checkpoint has none)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _read_weights(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of an HF directory in fp32: one safetensors file, sharded ones, or a .bin."""
    index = os.path.join(path, WEIGHTS + ".index.json")
    if os.path.isfile(os.path.join(path, WEIGHTS)):
        files = [WEIGHTS]
    elif os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in state.items()}
    else:
        raise ConfigError(f"{path}: no {WEIGHTS}, sharded safetensors or pytorch_model.bin")
    tensors = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            tensors.update({k: f.get_tensor(k).float() for k in f.keys()})
    return tensors


def _check_names(path: str, full: Dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """The tensors of the model config.json describes, no more and no fewer."""
    with torch.device("meta"):
        model = (BertModel if cfg.bidirectional else GPTModel)(cfg, SingleProcessState(), device="meta")
    expected = {name for name, _ in model.named_parameters()}
    missing, unexpected = sorted(expected - set(full)), sorted(set(full) - expected)
    if missing or unexpected:
        raise ConfigError(f"{path}: the weights do not match config.json: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")


def load_hf_directory(path: str) -> Tuple[Dict[str, torch.Tensor], ModelConfig]:
    """Full fp32 tensors (our TP=1 names) and the ModelConfig of an exported NormFormer or a GPT-2
    directory; any other architecture is a ConfigError naming it."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}/config.json: not a transformers config ({error})") from None
    model_type = config.get("model_type")
    if model_type == MODEL_TYPE:
        cfg = model_config_from_normformer(config)
        back = [(theirs, ours) for ours, theirs in renames(cfg)]
        full = _rename(_read_weights(path), back, path)
        _check_names(path, full, cfg)
    elif model_type == "gpt2":
        cfg = _model_config_from_gpt2(path, config)
        full = _from_gpt2(path, _read_weights(path), cfg)
    elif model_type == "llama":
        cfg = _model_config_from_llama(path, config)
        full = _from_llama(path, _read_weights(path), cfg)
    else:
        architectures = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise ConfigError(f"{path}: a transformers {model_type or 'untyped'} model ({architectures}); "
                          "only NormFormer exports (--output-hf), Llama and GPT-2 convert")
    rows = full["embedding.word_embeddings.weight"].shape[0]
    if rows != cfg.vocab_size:
        raise ConfigError(f"{path}: the token embedding has {rows} rows, config.json says "
                          f"vocab_size {cfg.vocab_size}")
    return full, cfg
