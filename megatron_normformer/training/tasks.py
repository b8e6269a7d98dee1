"""Pretraining objectives: what differs between GPT and masked-LM training, and nothing else.

The loop, engine, checkpoints and logging are shared; an entry point picks a task:

- ``gpt`` (``pretrain_gpt.py``): next-token prediction, the loss averaged over every token of the
  micro-batch. Any layout, pipeline parallelism included.
- ``bert`` (``pretrain_bert.py``): RoBERTa masked LM on the bidirectional NormFormer encoder. The
  loss is the mean over the masked tokens of the micro-batch, as Megatron's BERT computes it: each
  micro-batch weighs the same in the gradient whatever its number of masked tokens. The masked-token
  accuracy is averaged the same way. Any layout, pipeline parallelism included.

A task's ``loss(model, batch)`` returns ``(loss, extra)``: the scalar to backpropagate and a dict of
scalar tensors (already reduced over the micro-batch) that the loop averages over micro-batches and
data-parallel ranks and logs next to the loss.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Protocol, Tuple, Union

import torch
import torch.distributed as dist

from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.config.data import MASKING_PROB
from megatron_normformer.data import (
    SpecialTokens,
    build_masked_lm_datasets,
    build_tokenizer,
    build_train_valid_test_datasets,
    collate_samples,
)
from megatron_normformer.data.document_masks import DocumentMasking
from megatron_normformer.model.attention import document_causal_mask
from megatron_normformer.model.bert import MaskedLMModel, build_bert_pipeline
from megatron_normformer.model.gpt import GPTModel, build_gpt_pipeline
from megatron_normformer.parallel.cross_entropy import masked_mean
from megatron_normformer.training.metrics import flops_per_iteration

Batch = Dict[str, torch.Tensor]


class Task(Protocol):
    """What a pretraining objective supplies to the shared engine, loop and checkpoints."""

    name: str
    """``gpt`` or ``bert``: the summary and the ``--dry-run`` output name it."""
    bidirectional: bool
    """Whether the model attends both ways (the masked-LM encoder)."""
    description: str
    """The entry point's ``--help`` description."""

    def validate(self, run) -> None:
        """Raise ConfigError naming the flag for a setting this objective cannot train with."""

    def build_model(self, cfg: ModelConfig, pstate, seed: int, device) -> torch.nn.Module:
        """The model of this rank's tensor-parallel slice, on ``device``."""

    def external_parameters(self, model) -> List[torch.nn.Parameter]:
        """Weights read outside their own module's forward (ZeRO-3 must gather them)."""

    def build_datasets(self, run, num_samples: List[int], vocab_size: int):
        """The train, validation and test datasets of ``num_samples`` samples each."""

    def collate(self, run) -> Callable:
        """The DataLoader's collate function."""

    def loss(self, model, batch: Batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The micro-batch's loss to backpropagate and its extra metrics (scalar tensors)."""

    def build_pipeline(self, cfg: ModelConfig, pstate, seed: int, activation_checkpoint_interval: int,
                       run=None):
        """This stage's PipelineModule for DeepSpeed's pipeline engine."""

    def pipeline_batch(self, batch: Batch):
        """The micro-batch as (inputs, labels), the form DeepSpeed's pipeline engine reads."""

    def pipeline_extra(self, module, pstate) -> Dict[str, torch.Tensor]:
        """The extra metrics of the micro-batches pipelined since the last call, on every rank."""

    def dummy_batch(self, run) -> Batch:
        """A micro-batch of zeros of the right shapes (the optimizer-state warm-up step)."""

    def flops(self, cfg: ModelConfig, global_batch: int, seq: int, padded_vocab: int,
              recompute: bool) -> float:
        """Floating-point operations of one iteration of ``global_batch`` sequences."""


def _to_device(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.cuda(non_blocking=True) if torch.cuda.is_available() else tensor


def _cuda(batch: Batch) -> Batch:
    return {k: _to_device(v) for k, v in batch.items()}


class GPTTask:
    """Causal LM on ``{"text": int64[b, s + 1]}`` samples."""

    name = "gpt"
    bidirectional = False
    description = "NormFormer GPT pretraining on DeepSpeed"

    def validate(self, run) -> None:
        """Checks specific to the objective; ConfigError naming the flag."""
        self.document_masking(run)  # a tokenizer without an end-of-document id is refused here

    def build_model(self, cfg: ModelConfig, pstate, seed: int, device) -> torch.nn.Module:
        return GPTModel(cfg, pstate, seed=seed, device=device)

    def external_parameters(self, model) -> List[torch.nn.Parameter]:
        """Weights read outside their own module's forward (ZeRO-3 must gather them)."""
        params = [model.embedding.word_embeddings.weight]
        if model.head.weight is not None:
            params.append(model.head.weight)
        return params

    def build_datasets(self, run, num_samples: List[int], vocab_size: int):
        d = run.data
        try:
            return build_train_valid_test_datasets(
                d.data_path, d.split, run.train.seq_length, run.train.seed, num_samples,
                cache_path=d.data_cache_path, mock=d.mock_data, vocab_size=vocab_size,
                per_split_paths=d.per_split_paths())
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None

    @staticmethod
    def document_masking(run):
        """Megatron's end-of-document flags with the tokenizer's end-of-document id, or None when
        none is given (``data/document_masks.py``)."""
        t, d = run.train, run.data
        if not (t.eod_mask_loss or t.reset_position_ids or t.reset_attention_mask):
            return None
        if d.tokenizer_type in (None, "NullTokenizer"):
            eod = run.model.vocab_size - 1  # the NullTokenizer's (Megatron's convention)
        else:
            eod = build_tokenizer(d.tokenizer_type, d.tokenizer_model, d.vocab_file, d.merge_file,
                                  run.model.vocab_size).eod
            if eod is None:
                raise ConfigError(f"--eod-mask-loss / --reset-position-ids / --reset-attention-mask: "
                                  f"--tokenizer-type {d.tokenizer_type} has no end-of-document token")
        return DocumentMasking(eod, t.eod_mask_loss, t.reset_position_ids, t.reset_attention_mask)

    def collate(self, run):
        """The DataLoader's collate function: the end-of-document fields join the batch there."""
        masking = self.document_masking(run)
        return collate_samples if masking is None else masking.collate

    @staticmethod
    def inputs_and_labels(batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = _to_device(batch["text"])
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def loss(self, model, batch: Batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        tokens, labels = self.inputs_and_labels(batch)
        b = _cuda({k: v for k, v in batch.items() if k != "text"})
        mask = document_causal_mask(b["segment_ids"]) if "segment_ids" in b else None
        per_token = model(tokens, labels, position_ids=b.get("position_ids"), attention_mask=mask)
        if "loss_mask" in b:
            return masked_mean(per_token, b["loss_mask"]), {}
        # Every token is a target: the mean over the micro-batch's tokens.
        return per_token.mean(), {}

    def build_pipeline(self, cfg: ModelConfig, pstate, seed: int, activation_checkpoint_interval: int,
                       run=None):
        t = run.train if run is not None else None
        return build_gpt_pipeline(cfg, pstate, seed, activation_checkpoint_interval,
                                  reset_position_ids=bool(t and t.reset_position_ids),
                                  reset_attention_mask=bool(t and t.reset_attention_mask))

    def pipeline_batch(self, batch: Batch):
        """(inputs, labels) as DeepSpeed's pipeline engine reads them: the first stage takes the
        inputs (with the position and segment ids when asked for), the last the labels (with the
        loss mask when asked for); ``model/gpt.py`` builds the stages to match."""
        tokens, labels = self.inputs_and_labels(batch)
        inputs = tuple(_to_device(batch[k]) for k in ("position_ids", "segment_ids") if k in batch)
        if "loss_mask" in batch:
            labels = (labels, _to_device(batch["loss_mask"]))
        return ((tokens, *inputs) if inputs else tokens), labels

    def pipeline_extra(self, module, pstate) -> Dict[str, torch.Tensor]:
        """The extra metrics of the micro-batches the pipeline ran since the last call, on every
        rank (each a scalar tensor, not yet averaged over data-parallel ranks)."""
        return {}

    def dummy_batch(self, run) -> Batch:
        """A batch of zeros of the right shapes (optimizer-state warm-up before a resume)."""
        t = run.train
        return {"text": torch.zeros(t.micro_batch_size, t.seq_length + 1, dtype=torch.long)}

    def flops(self, cfg: ModelConfig, global_batch: int, seq: int, padded_vocab: int,
              recompute: bool) -> float:
        return flops_per_iteration(cfg, global_batch, seq, padded_vocab, recompute)


class MaskedLMTask:
    """RoBERTa masked LM on ``MaskedLMDataset`` samples (text, labels, loss_mask, padding_mask)."""

    name = "bert"
    bidirectional = True
    description = "NormFormer masked-LM (RoBERTa-style) pretraining on DeepSpeed"
    masking_prob = MASKING_PROB  # the FLOP count expects this fraction of positions in the head

    def validate(self, run) -> None:
        if not run.model.bidirectional:
            raise ConfigError("masked-LM pretraining needs the bidirectional encoder")
        t = run.train
        for flag, on in (("--eod-mask-loss", t.eod_mask_loss), ("--reset-position-ids", t.reset_position_ids),
                         ("--reset-attention-mask", t.reset_attention_mask)):
            if on:
                raise ConfigError(f"{flag} applies to GPT pretraining; masked-LM samples are packed "
                                  "by document already")

    def collate(self, run):
        return collate_samples

    def build_model(self, cfg: ModelConfig, pstate, seed: int, device) -> torch.nn.Module:
        return MaskedLMModel(cfg, pstate, seed=seed, device=device)

    def external_parameters(self, model) -> List[torch.nn.Parameter]:
        return [model.embedding.word_embeddings.weight]  # tied into the LM head's projection

    def build_datasets(self, run, num_samples: List[int], vocab_size: int):
        d = run.data
        special = None
        try:
            if not d.mock_data:
                if d.tokenizer_type in (None, "NullTokenizer"):
                    raise ValueError("masked-LM data needs --tokenizer-type with <mask>, <cls>, <sep> "
                                     "and <pad> tokens (SentencePieceTokenizer, GPT2BPETokenizer, "
                                     "HFTokenizer)")
                tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model, d.vocab_file,
                                            d.merge_file, run.model.vocab_size)
                special = SpecialTokens.from_tokenizer(tokenizer)
            return build_masked_lm_datasets(
                d.data_path, d.split, run.train.seq_length, run.train.seed, num_samples, special,
                cache_path=d.data_cache_path, mock=d.mock_data, vocab_size=vocab_size,
                per_split_paths=d.per_split_paths())
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ConfigError(str(e)) from None

    def loss(self, model, batch: Batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        b = _cuda(batch)
        per_token, correct = model(b["text"], b["padding_mask"], b["labels"], b["loss_mask"])
        # A micro-batch without masked tokens (possible for tiny samples) contributes zero, not NaN.
        count = b["loss_mask"].sum().clamp(min=1).to(per_token.dtype)
        return per_token.sum() / count, {"mlm_accuracy": correct.sum().to(count.dtype) / count}

    def build_pipeline(self, cfg: ModelConfig, pstate, seed: int, activation_checkpoint_interval: int,
                       run=None):
        return build_bert_pipeline(cfg, pstate, seed, activation_checkpoint_interval)

    def pipeline_batch(self, batch: Batch):
        """The masks travel with the hidden states (``model/bert.py``); the last stage also
        gets the loss mask with the labels."""
        return ((batch["text"], batch["padding_mask"], batch["loss_mask"]),
                (batch["labels"], batch["loss_mask"]))

    def pipeline_extra(self, module, pstate) -> Dict[str, torch.Tensor]:
        """The mean masked-token accuracy the last stage's loss kept, sent to the other stages."""
        accuracy = torch.zeros(1, dtype=torch.float64)
        if pstate.is_last_stage:
            accuracy[0] = torch.stack(module.loss_fn.take_accuracies()).mean().cpu()
        dist.broadcast(accuracy, src=pstate.pp_ranks[-1], group=pstate.pp_group)
        return {"mlm_accuracy": accuracy[0]}

    def dummy_batch(self, run) -> Batch:
        t = run.train
        shape = (t.micro_batch_size, t.seq_length)
        # Every position a target, so every head parameter gets a gradient (and Adam state).
        return {"text": torch.zeros(shape, dtype=torch.long),
                "labels": torch.zeros(shape, dtype=torch.long),
                "loss_mask": torch.ones(shape, dtype=torch.long),
                "padding_mask": torch.ones(shape, dtype=torch.long)}

    def flops(self, cfg: ModelConfig, global_batch: int, seq: int, padded_vocab: int,
              recompute: bool) -> float:
        # The head (dense h x h and the vocabulary projection) runs on the masked positions only.
        return flops_per_iteration(cfg, global_batch, seq, padded_vocab, recompute,
                                   head_fraction=self.masking_prob, head_dense=True)


TASKS: Dict[str, Task] = {"gpt": GPTTask(), "bert": MaskedLMTask()}


def get_task(task: Union[None, str, Task]) -> Task:
    """For the entry points: a task from its name (``gpt``, ``bert``) or itself; GPT when None.
    Everything below them takes the resolved task."""
    if task is None:
        return TASKS["gpt"]
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
        return TASKS[task]
    return task
