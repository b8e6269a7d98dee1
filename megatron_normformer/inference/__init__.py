"""Using trained models: loading any checkpoint, KV-cached generation, scoring and perplexity.

- ``cli``: the inference tools' shared flags, device and tokenizer checks. Models are loaded by
  ``checkpoint.inference.build_inference_model(path, pstate, device)`` from a consolidated
  ``.safetensors`` file or a training checkpoint directory.
- ``kv_cache``: ``KVCache`` for incremental decoding (``GPTModel.forward(..., kv_cache=)``).
- ``sampling`` / ``generation``: ``SamplingConfig`` and ``generate(model, prompts, ...)``.
- ``scoring``: log-likelihoods of continuations and rolling-window document scores.
- ``perplexity``: validation loss and perplexity on a preprocessed dataset.
- ``lm_eval``: the ``megatron_normformer`` model type for lm-evaluation-harness.
"""
