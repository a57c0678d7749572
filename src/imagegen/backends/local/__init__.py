"""The local diffusers backends (`sd`, `flux-local`) and everything they share: the torch side.

Only modules of this package import torch, diffusers or transformers, and only inside functions that
load or run a pipeline: importing the package itself stays cheap. It needs the `local` extra.
"""
