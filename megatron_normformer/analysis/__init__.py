"""The paper's Section 4 analyses, as functions the ``tools/analyze_*.py`` scripts wrap.

- ``grad_norms``: average L1 norm of the fc2 weight gradient per layer early in training, Pre-LN vs
  NormFormer (Fig. 3).
- ``scales``: distributions of the learned FFN-LN, post-attention-LN, HeadScale and ResScale
  parameters per layer of a checkpoint (Fig. 4).
- ``lr_stability``: the learning rate climbs by a fixed step per iteration until training breaks;
  which operation in which layer produced the first non-finite value (Table 4).
- ``common``: tiny single-process training pieces the analyses share (data, schedule, plots).
"""
