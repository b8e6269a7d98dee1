"""Checkpoints, each concern once.

- ``training``: ``--save`` / ``--load`` of a training run: DeepSpeed's own files, per-rank RNG
  streams, ``run.json``, the ``latest`` pointer; exact resume in the same layout, the
  layout-independent state in any other.
- ``universal``: the layout-independent state (fp32 master weights and Adam moments by parameter
  name, each rank writing its own ZeRO piece) and its reader.
- ``convert``: offline conversion between layouts and to / from the release format
  (``tools/convert_checkpoint.py``).
- ``release``: the consolidated release format (one fp32 safetensors file + JSON config), and a
  model of any TP degree built from full tensors.
- ``inference``: a model for generation and evaluation from a release file or a training directory.
- ``shards``: how a parameter is cut across tensor-parallel ranks (vocabulary padding included).
- ``atomic``: a tag written under a temporary name and renamed into place, ``latest`` after it;
  what killed saves leave, removed at the next start; write errors that name their cause.
"""
