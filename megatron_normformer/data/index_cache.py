"""Build-once, memory-map-everywhere cache for dataset index arrays.

Index arrays (document order, sample positions, shuffles, blending choices) are pure functions of
their inputs. They are saved as ``.npy`` files named by the md5 of a JSON description of those
inputs, built by global rank 0 only (written to a temporary name, then renamed, so a reader never
sees half a file) and memory-mapped by every rank after a barrier.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from megatron_normformer.runtime import phases

logger = logging.getLogger(__name__)

Barrier = Callable[[], None]


def description_hash(description: dict) -> str:
    """md5 of the canonical JSON of ``description``."""
    text = json.dumps(description, sort_keys=True)
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _default_barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _save_atomic(path: str, array: np.ndarray) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def cached_arrays(cache_dir: Optional[str], name: str, description: dict, keys: Sequence[str],
                  build: Callable[[], Dict[str, np.ndarray]],
                  barrier: Optional[Barrier] = None) -> Dict[str, np.ndarray]:
    """Return ``build()``'s arrays, from ``cache_dir`` when a previous build left them there.

    ``name`` (e.g. ``GPTDataset-train``) and the hash of ``description`` name the files. Without a
    cache dir the arrays are built in memory on every rank. ``barrier`` defaults to
    ``torch.distributed.barrier`` when a process group is initialised; every rank must call this.
    """
    if cache_dir is None:
        return build()
    barrier = barrier or _default_barrier
    base = os.path.join(cache_dir, f"{description_hash(description)}-{name}")
    paths = {key: f"{base}-{key}.npy" for key in keys}
    description_path = f"{base}-description.json"
    if _is_rank_zero() and not all(os.path.isfile(p) for p in paths.values()):
        os.makedirs(cache_dir, exist_ok=True)
        logger.info("building %s index arrays into %s", name, cache_dir)
        with phases.waiting(f"building the {name} index arrays in {cache_dir}"):
            arrays = build()
            for key in keys:
                _save_atomic(paths[key], arrays[key])
            with open(description_path, "w") as f:
                json.dump(description, f, indent=2, sort_keys=True)
    if _is_rank_zero():
        wait = (f"waiting for the other ranks at the {name} index barrier",
                "a rank has not reached it yet (see that rank's output)")
    else:
        wait = (f"waiting for rank 0 to write the {name} index arrays to {cache_dir}",
                "every other rank waits here while rank 0 builds them")
    with phases.waiting(*wait):
        barrier()
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"index cache file {missing[0]} is missing after rank 0 built it: is --data-cache-path "
            f"{cache_dir} on a file system every rank can read?")
    return {key: np.load(path, mmap_mode="r", allow_pickle=False) for key, path in paths.items()}
