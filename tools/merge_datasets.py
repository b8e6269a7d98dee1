#!/usr/bin/env python
"""Concatenate MMIDIDX datasets into one, in the order given (a directory: sorted by name).

Example::

    python tools/merge_datasets.py --input data/shards --output-prefix data/all_text_document
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_normformer.data.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    dataset_exists,
)


def find_prefixes(inputs) -> list:
    """Prefixes from a directory (every ``X.idx``, sorted; each needs its ``X.bin``, as in
    Megatron-LM) or a list of them."""
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        directory = inputs[0]
        names = sorted(f[: -len(".idx")] for f in os.listdir(directory) if f.endswith(".idx"))
        prefixes = [os.path.join(directory, n) for n in names]
        for prefix in prefixes:  # a shard without its tokens would vanish from the output
            if not os.path.isfile(prefix + ".bin"):
                raise IndexedDatasetError(f"--input {directory}: {prefix}.idx has no {prefix}.bin")
        if not prefixes:
            raise IndexedDatasetError(f"--input {directory}: no .bin/.idx pairs found")
        return prefixes
    for prefix in inputs:
        if not dataset_exists(prefix):
            raise IndexedDatasetError(f"--input {prefix}: {prefix}.bin or {prefix}.idx not found")
    return list(inputs)


def merge(prefixes, output_prefix: str) -> None:
    """Write the concatenation of ``prefixes`` to ``output_prefix`` (temporary names, then rename)."""
    dtype = IndexedDataset(prefixes[0]).dtype
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp = f"{output_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype)
    try:
        for prefix in prefixes:
            IndexedDataset(prefix)  # validates the pair before copying it
            builder.add_index(prefix)
        builder.finalize(tmp + ".idx")
    except BaseException:
        builder._data.close()
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
        raise
    os.replace(tmp + ".bin", output_prefix + ".bin")
    os.replace(tmp + ".idx", output_prefix + ".idx")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="a directory of .bin/.idx pairs, or a list of prefixes")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    try:
        prefixes = find_prefixes(args.input)
        merge(prefixes, args.output_prefix)
    except IndexedDatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    merged = IndexedDataset(args.output_prefix)
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}: "
          f"{merged.num_documents} documents, {len(merged)} sequences", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
