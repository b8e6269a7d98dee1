"""Using trained models: loading any checkpoint, KV-cached generation, scoring and perplexity.

- ``loading``: ``build_inference_model(path, pstate, device)`` from a consolidated ``.safetensors``
  file or a training checkpoint directory.
- ``kv_cache``: ``KVCache`` for incremental decoding (``GPTModel.forward(..., kv_cache=)``).
- ``sampling`` / ``generation``: ``SamplingConfig`` and ``generate(model, prompts, ...)``.
- ``scoring``: log-likelihoods of continuations and rolling-window document scores.
- ``perplexity``: validation loss and perplexity on a preprocessed dataset.
- ``lm_eval_adapter``: the ``megatron_normformer`` model type for lm-evaluation-harness.
"""
