"""Triton kernels, each file in three parts: the @triton.jit kernel, the autograd.Function that
calls it, and a plain PyTorch `*_ref` function that is its spec. Nothing here touches the GPU
driver at import time, so importing works on a CPU-only machine."""
