"""Megatron's end-of-document handling of GPT samples: ``--eod-mask-loss``, ``--reset-position-ids``
and ``--reset-attention-mask``.

A sample of ``seq_length + 1`` tokens runs across document boundaries (``gpt_dataset.py``). Over
its inputs (the first ``seq_length`` tokens) an end-of-document token belongs to the document it
ends; the next position starts a new document, so

- ``loss_mask`` is 0 for the target that follows an input end-of-document token (predicting the
  first token of an unrelated document) and 1 elsewhere (``--eod-mask-loss``);
- ``position_ids`` restart at 0 after every end-of-document token (``--reset-position-ids``);
- ``segment_ids`` number the documents of the row (0, 1, ...) for the block-diagonal causal mask
  of ``model.attention.document_causal_mask`` (``--reset-attention-mask``): a token attends only to
  earlier tokens of its own document.

With all three, each document is computed exactly as if it stood alone at the start of a row.
The fields are computed in the DataLoader workers (``collate``), next to the batch they belong to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np
import torch

from .samplers import collate_samples


@dataclass(frozen=True)
class DocumentMasking:
    eod: int
    """End-of-document token id (the tokenizer's)."""
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False

    @property
    def active(self) -> bool:
        return self.eod_mask_loss or self.reset_position_ids or self.reset_attention_mask

    def fields(self, inputs: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The batch fields the flags ask for, from the input tokens [batch, seq]."""
        is_eod = inputs == self.eod
        out = {}
        if self.eod_mask_loss:
            out["loss_mask"] = (~is_eod).to(torch.float32)
        if self.reset_position_ids or self.reset_attention_mask:
            # Documents seen before each position: an end-of-document token still counts to its own.
            segments = torch.cumsum(is_eod.to(torch.int64), dim=1) - is_eod.to(torch.int64)
            if self.reset_attention_mask:
                out["segment_ids"] = segments
            if self.reset_position_ids:
                positions = torch.arange(inputs.size(1), dtype=torch.int64).expand_as(inputs)
                # A document starts after each end-of-document token: at i + 1 for an EOD at i.
                after_eod = torch.where(is_eod, positions + 1, torch.zeros_like(positions))
                after_eod = torch.nn.functional.pad(after_eod[:, :-1], (1, 0))
                out["position_ids"] = positions - torch.cummax(after_eod, dim=1).values
        return out

    def collate(self, samples: Sequence[Dict[str, np.ndarray]]) -> Dict[str, torch.Tensor]:
        """``collate_samples`` plus the fields, for the DataLoader (picklable: a bound method of a
        frozen dataclass)."""
        batch = collate_samples(samples)
        batch.update(self.fields(batch["text"][:, :-1]))
        return batch

