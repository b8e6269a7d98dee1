"""Models in and out of this project: Hugging Face transformers directories (``hf.py``, both ways)
and fairseq ``transformer_lm`` checkpoints (``fairseq.py``, in). Each reads into, or writes from,
the full fp32 tensors by TP=1 name plus a ``ModelConfig`` that ``checkpoint.inference
.load_full_state`` returns for any checkpoint (docs/interop.md)."""
