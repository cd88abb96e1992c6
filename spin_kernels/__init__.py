"""Triton kernels, each file in three parts: the @jit kernels, the autograd.Function that calls them,
and a plain PyTorch `*_ref` function that is their spec. This file holds what both files share:

- Triton is optional: without it (macOS, CPU-only installs) `triton` and `tl` are None, `jit` leaves
  functions as they are and `triton_runs_on` is False, so every caller takes the PyTorch path.
- One mode per process. triton.jit decides when it wraps a function whether it compiles for the GPU or
  runs in the interpreter, and triton.language's own helpers (tl.sum, tl.max) were wrapped when triton
  was first imported, with TRITON_INTERPRET as it was then; a kernel can only call helpers of its own
  mode. `jit` wraps ours in that same mode when the kernel files are imported.
- TRITON_INTERPRET is read at call time: set, CPU tensors go to the interpreter. `launch` runs a kernel
  only in the mode asked for now, else it raises a KernelError saying how to fix the order.
- The kernels import nothing of nanospin's above them: bad inputs raise their own KernelError, one line that
  says what to fix; model.py shows it to people as a UserError.
- Nothing touches the GPU driver at import time, so importing works on a CPU-only machine.
"""

from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: the PyTorch paths still work
    triton = tl = None


class KernelError(ValueError):
    """A kernel's inputs or Triton mode are wrong; the message says what to change."""


def interpret_requested() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter now (read the way Triton reads it)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def triton_interprets() -> bool:
    """Whether triton was first imported in interpreter mode: the only mode its kernels can run in."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.sum, InterpretedFunction)


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether Triton kernels take tensors on t's device now: CUDA, or the CPU when interpreting."""
    if triton is None:
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpret_requested())


def jit(fn: Callable) -> Callable:
    """triton.jit(fn) in the mode triton.language's own helpers were built in (fn itself without triton)."""
    if triton is None:
        return fn
    with triton.knobs.runtime.scope():  # restores the knob and TRITON_INTERPRET afterwards
        triton.knobs.runtime.interpret = triton_interprets()
        return triton.jit(fn)


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """kernel[grid](*args, **meta) for a kernel made by `jit`, in the mode TRITON_INTERPRET asks for now."""
    requested, interprets = interpret_requested(), triton_interprets()
    if requested != interprets:  # the error names the kernel; built only then, not on every launch
        where = f"{kernel.fn.__module__.replace('.', '/')}.py:{kernel.__name__}"
        if requested:
            raise KernelError(f"TRITON_INTERPRET=1 was set after triton was first imported, so the interpreter cannot "
                             f"run {where}; set it before anything imports triton (the shell, or the top of the script "
                             f"or conftest.py)")
        raise KernelError(f"triton was first imported with TRITON_INTERPRET=1, so {where} can only be interpreted, not "
                         f"compiled for the GPU; run it in a process that imports triton with TRITON_INTERPRET unset")
    kernel[grid](*args, **meta)
