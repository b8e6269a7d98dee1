"""Data pipeline: Megatron-compatible indexed datasets, tokenizers, GPT / masked-LM samples.

Entry points for the training code:

- ``build_train_valid_test_datasets(data_path, split, seq_length, seed, num_samples, ...)``
- ``build_masked_lm_datasets(...)``: the same splits as masked-LM samples
- ``MegatronPretrainingSampler`` and ``collate_samples`` for the DataLoader
- ``build_tokenizer(tokenizer_type, ...)``

Names are imported lazily so that the tools (which do not need torch) start fast.
"""
import importlib
from typing import Any

_EXPORTS = {
    "blended_dataset": ["BlendedDataset", "build_blending_indices", "parse_data_path"],
    "builder": ["build_masked_lm_datasets", "build_train_valid_test_datasets"],
    "gpt_dataset": ["GPTDataset", "MockGPTDataset", "build_gpt_indices", "split_ranges"],
    "indexed_dataset": ["IndexedDataset", "IndexedDatasetBuilder", "IndexedDatasetError",
                        "optimal_dtype"],
    "masked_lm_dataset": ["IGNORE_INDEX", "MaskedLMDataset", "MockMaskedLMDataset", "SpecialTokens"],
    "samplers": ["MegatronPretrainingSampler", "collate_samples"],
    "tokenizers": ["GPT2BPETokenizer", "HFTokenizer", "NullTokenizer", "SentencePieceTokenizer",
                   "Tokenizer", "TokenizerError", "build_tokenizer"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
