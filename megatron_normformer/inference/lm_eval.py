"""lm-evaluation-harness model type ``megatron_normformer``: zero-shot evaluation of our checkpoints.

    python -m megatron_normformer.inference.lm_eval --model megatron_normformer \\
        --model_args checkpoint=ckpt/release,tokenizer_type=SentencePieceTokenizer,tokenizer_model=sp.model \\
        --tasks hellaswag,piqa --batch_size 8

Why ``python -m`` and not the plain ``lm_eval`` command: lm-eval 0.4.x finds models only in its own
registry, filled by ``lm_eval.models`` (a fixed table of its modules) and by ``@register_model`` in
modules that something has imported. Its CLI reads no entry-point group and has no flag that imports
a user module, so an installed package cannot add a model type to ``lm_eval`` without a ``.pth``
start-up hook. This module registers the model and then runs lm-eval's own CLI, so every lm-eval
flag works unchanged. From Python, ``import megatron_normformer.inference.lm_eval`` before
``lm_eval.simple_evaluate(model="megatron_normformer", ...)`` (or pass a ``MegatronLM`` instance).

Model arguments (``--model_args key=value,...``): ``checkpoint`` (consolidated ``.safetensors`` or
training checkpoint dir; ``tag`` picks an iteration), the tokenizer flags of preprocessing
(``tokenizer_type``, ``tokenizer_model``, ``vocab_file``, ``merge_file``, ``vocab_size``),
``max_length`` (default: the model's ``max_position_embeddings``, which bounds it unless the
positions are rotary), ``max_gen_toks`` (256),
``rolling_stride`` (loglikelihood_rolling window stride; default ``max_length``, disjoint windows),
``dtype`` (float32 / bfloat16 / float16). ``--device`` and ``--batch_size`` are lm-eval's flags.
Under ``torchrun`` with N processes the model is split N-way by tensor parallelism; every rank runs
the same requests.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("the lm-eval adapter needs lm-evaluation-harness: "
                      "pip install 'megatron_normformer[eval]'") from error

from megatron_normformer.checkpoint.inference import build_inference_model
from megatron_normformer.config import ConfigError
from megatron_normformer.data.tokenizers import build_tokenizer
from megatron_normformer.inference.cli import check_tokenizer, parallel_state_from_env, resolve_device
from megatron_normformer.inference.generation import generate
from megatron_normformer.inference.sampling import SamplingConfig
from megatron_normformer.inference.scoring import rolling_loglikelihood, score_continuations

MODEL_NAME = "megatron_normformer"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _int_or_none(value) -> Optional[int]:
    return None if value in (None, "", "None") else int(value)


@register_model(MODEL_NAME, "megatron-normformer")
class MegatronLM(LM):
    """A causal NormFormer / Pre-LN checkpoint behind lm-eval's three request types."""

    def __init__(self, checkpoint: str, tokenizer_type: str, tokenizer_model: Optional[str] = None,
                 vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                 vocab_size=None, batch_size=1, max_batch_size=None, device: Optional[str] = None,
                 max_length=None, max_gen_toks=256, rolling_stride=None, dtype: str = "float32",
                 tag: Optional[str] = None, seed=1234, **unused):
        super().__init__()

        if str(batch_size).startswith("auto"):
            raise ConfigError("--batch_size auto is not supported by megatron_normformer; give a number")
        if dtype not in DTYPES:
            raise ConfigError(f"model_args dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.pstate = parallel_state_from_env()
        self._device = resolve_device(device)
        self.model, self.cfg = build_inference_model(checkpoint, self.pstate, self._device,
                                                     DTYPES[dtype], tag=tag)
        self.tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, vocab_file, merge_file,
                                         _int_or_none(vocab_size))
        check_tokenizer(self.tokenizer, self.cfg, "model_args tokenizer_type")
        if self.tokenizer.eod is None:
            raise ConfigError(f"model_args tokenizer_type {tokenizer_type}: the tokenizer has no "
                              "end-of-document token to condition empty contexts on")
        self.batch_size = int(batch_size)
        self.max_length = _int_or_none(max_length) or self.cfg.max_position_embeddings
        if (self.max_length > self.cfg.max_position_embeddings
                and self.cfg.position_embedding_type != "rope"):  # rotary positions have no table
            raise ConfigError(f"model_args max_length ({self.max_length}) exceeds the checkpoint's "
                              f"max_position_embeddings ({self.cfg.max_position_embeddings})")
        self.max_gen_toks = int(max_gen_toks)
        self.rolling_stride = _int_or_none(rolling_stride)
        self.seed = int(seed)
        self.checkpoint = checkpoint

    # -- lm-eval properties ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def tokenizer_name(self) -> str:
        return f"{type(self.tokenizer).__name__}:{self.checkpoint}"

    # -- tokenisation --------------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """Token ids of (context, continuation) as one text would tokenise them.

        Trailing whitespace of the context moves to the continuation (word-piece tokenisers attach
        the space to the next word); the continuation's ids are the tail of the joint encoding."""
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        context = stripped
        ctx = self.tokenizer.encode(context) if context else []
        whole = self.tokenizer.encode(context + continuation)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self.tokenizer.encode(continuation)
        return (ctx or [self.eot_token_id]), cont

    # -- request types ----------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        results = score_continuations(self.model, pairs, self.max_length, self.batch_size)
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        documents = [self.tokenizer.encode(req.args[0]) for req in requests]
        results = rolling_loglikelihood(self.model, documents, self.eot_token_id, self.max_length,
                                        self.batch_size, self.rolling_stride)
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        outputs: List[Optional[str]] = [None] * len(requests)
        groups: Dict[str, List[int]] = {}
        for index, req in enumerate(requests):
            key = json.dumps(req.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampling = self._sampling(kwargs)
            budget = self.max_length - max_new
            if budget < 1:
                raise ConfigError(f"max_gen_toks ({max_new}) leaves no room for a context in "
                                  f"max_length ({self.max_length})")
            contexts = {i: (self.tokenizer.encode(requests[i].args[0]) or [self.eot_token_id])[-budget:]
                        for i in indices}
            order = sorted(indices, key=lambda i: -len(contexts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                texts = self._generate_batch([contexts[i] for i in chunk], max_new, sampling, until)
                for i, text in zip(chunk, texts):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs

    def _sampling(self, kwargs: dict) -> SamplingConfig:
        if not kwargs.get("do_sample", False) or float(kwargs.get("temperature", 0.0) or 0.0) == 0.0:
            return SamplingConfig(greedy=True)
        return SamplingConfig(temperature=float(kwargs.get("temperature", 1.0)),
                              top_k=int(kwargs.get("top_k", 0) or 0),
                              top_p=float(kwargs.get("top_p", 1.0) or 1.0))

    def _generate_batch(self, contexts: Sequence[List[int]], max_new: int, sampling: SamplingConfig,
                        until: Sequence[str]) -> List[str]:
        decode = self.tokenizer.decode

        def stop(_row: int, new_tokens: List[int]) -> bool:
            text = decode(new_tokens)
            return any(s and s in text for s in until)

        result = generate(self.model, contexts, max_new, sampling, eod=self.eot_token_id,
                          seed=self.seed, stop=stop if until else None)
        texts = []
        for tokens in result.tokens:
            text = decode(tokens)
            cut = min((text.index(s) for s in until if s and s in text), default=len(text))
            texts.append(text[:cut])
        return texts


def main() -> None:
    """lm-eval's CLI with the ``megatron_normformer`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
