"""The transformers code an export carries (``interop/hf.py`` copies these files next to the weights).

They import torch and transformers only, and each other relatively, as transformers' remote code
loader requires; this package is what ships them (and lets the tests import them directly).
"""
