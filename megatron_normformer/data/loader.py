"""The training DataLoader: this rank's micro-batches, in Megatron's sample order, checked.

Samples come in the order of ``MegatronPretrainingSampler`` (resumable at any consumed-sample
count, split over data-parallel ranks), are collated by the objective's function (the GPT
end-of-document fields are computed in the workers), and every batch is checked against the model's
vocabulary before it reaches the embedding.

The worker processes stop when the batches do: exhausted, or closed by the caller (the training
loop closes its batches however it ends). Stopping them cannot be left to the DataLoader's own
finalizer: an exception's traceback keeps the iterator alive until the interpreter exits, where
that finalizer does nothing and multiprocessing ends its children with SIGTERM, which these
workers ignore (``runtime/workers.quiet_worker_init``), then waits for them forever.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from megatron_normformer.data.samplers import MegatronPretrainingSampler
from megatron_normformer.runtime import workers


class DataError(RuntimeError):
    """A batch the model cannot take; only the rank that read it knows, so that rank reports it."""

    every_rank_knows = False


def micro_batches(dataset, consumed: int, total: int, micro_batch_size: int, pstate,
                  collate: Callable, num_workers: int, seed: int, vocab_size: int,
                  data_flags: str) -> Iterator:
    """This rank's micro-batches from sample ``consumed`` to ``total``: a generator whose
    ``close()`` stops the DataLoader's workers at once (none start before the first batch)."""
    sampler = MegatronPretrainingSampler(total, consumed, micro_batch_size, pstate.dp_rank,
                                         pstate.dp_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                         persistent_workers=False,
                                         # its own generator: creating the iterator must not draw
                                         # from the global RNG, or a resumed run's dropout shifts
                                         generator=torch.Generator().manual_seed(seed),
                                         # SIGTERM to the process group must not kill the workers:
                                         # the trainer stops them after its last step
                                         worker_init_fn=workers.quiet_worker_init if num_workers else None)
    batches = workers.quiet_workers_iter(loader)
    try:
        yield from within_vocabulary(batches, vocab_size, data_flags)
    finally:
        stop_workers(batches)


def stop_workers(batches) -> None:
    """Stop the worker processes of a DataLoader iterator now, as its finalizer would: the done
    event set, each worker told to exit and joined (torch terminates one that does not exit
    within its status-check interval, 5 s). Nothing to do without workers."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator
    if shutdown is not None:
        shutdown()


def within_vocabulary(batches, vocab_size: int, data_flags: str):
    """Pass the batches through, stopping with a message at a token id the model has no row for
    (data tokenized with another tokenizer than the run's), which would otherwise fail deep in the
    embedding (a device-side assert on GPU)."""
    for batch in batches:
        top = int(batch["text"].max())
        if top >= vocab_size:
            raise DataError(
                f"token id {top} in a batch is outside the model's vocabulary of "
                f"{vocab_size} tokens (the tokenizer's, or --vocab-size): {data_flags} "
                "was tokenized with another tokenizer; preprocess it "
                "with this run's tokenizer, or give the tokenizer it was made with")
        yield batch
