"""Flags and set-up shared by the inference tools (``tools/generate.py``, ``tools/evaluate_ppl.py``)."""
from __future__ import annotations

import argparse
import os
from typing import Optional

import torch

from megatron_normformer.checkpoint.inference import build_inference_model
from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.data.tokenizers import (  # noqa: F401 - the tools take them from here
    add_tokenizer_args,
    tokenizer_from_args,
)
from megatron_normformer.parallel.state import (
    ParallelState,
    SingleProcessState,
    initialize_distributed,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoint")
    g.add_argument("--load", required=True,
                   help="Consolidated checkpoint (PATH.safetensors or its base PATH) or a training "
                        "checkpoint directory (any TP/PP/ZeRO layout).")
    g.add_argument("--ckpt-tag", default=None,
                   help="Iteration tag inside a training checkpoint directory (default: latest).")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N.")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="Inference precision.")


def parallel_state_from_env():
    """One process: no torch.distributed. Under torchrun: one TP group over all processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SingleProcessState()
    launch = initialize_distributed()
    return ParallelState(tensor_model_parallel_size=launch.world_size)


def resolve_device(device: Optional[str] = None) -> torch.device:
    """``cuda`` when available, else ``cpu``; an explicit ``device`` wins."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return torch.device(device)


def check_tokenizer(tokenizer, cfg: ModelConfig, flag: str = "--tokenizer-type") -> None:
    """A tokenizer whose ids the model cannot embed is a user error, reported before any work."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"{flag}: the tokenizer has {tokenizer.vocab_size} ids but the checkpoint's "
                          f"vocabulary has {cfg.vocab_size}; is it the tokenizer the model was trained with?")


def load_model_from_args(args, pstate):
    """(model, cfg) on the requested device and dtype, for ``pstate``'s TP rank."""
    device = resolve_device(args.device)
    if device.type == "cuda" and pstate.world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    return build_inference_model(args.load, pstate, device, DTYPES[args.dtype], tag=args.ckpt_tag)
