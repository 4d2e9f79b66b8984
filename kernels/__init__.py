"""Triton kernels of dino_fast, installed as `dino_fast.kernels`.

One op per module: the kernel, its host launcher and its `torch.autograd.Function` together.
Import these modules only after deciding on `TRITON_INTERPRET` (see dino_fast.backend): Triton
reads that variable when a kernel is defined.
"""

from dino_fast.backend import interpreter_enabled

if interpreter_enabled():
    def _fix_interpreter_loop_bounds() -> None:
        """The Triton interpreter keeps a scalar as a 1-element numpy array and, before triton
        3.7, turns it into the int a `range(n)` over a runtime argument needs with int(array),
        which numpy >= 2.5 refuses ("only 0-dimensional arrays can be converted to Python
        scalars"). Triton 3.7 converts the squeezed array; this applies the same conversion to
        older interpreters, for every kernel launch. The compiled kernels are not affected."""
        import warnings

        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter

        patch_lang = getattr(interpreter, "_patch_lang", None)
        if patch_lang is None or getattr(patch_lang, "_dino_fast_index", False):
            return
        probe = np.array([3], dtype=np.int32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy 2.0-2.4 only warn here
            try:  # numpy still converts 1-element arrays: nothing to do
                int(probe)
                return
            except TypeError:
                pass

        def patched(fn):
            scope = patch_lang(fn)
            scope.set_attr(tl.core.tensor, "__index__",
                           lambda self: int(self.handle.data.reshape(())))
            return scope

        patched._dino_fast_index = True
        interpreter._patch_lang = patched

    _fix_interpreter_loop_bounds()
