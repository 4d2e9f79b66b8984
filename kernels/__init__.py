"""Triton kernels of dino_fast, installed as `dino_fast.kernels`.

One op per module: the kernel, its host launcher and its `torch.autograd.Function` together.
Import these modules only after deciding on `TRITON_INTERPRET` (see dino_fast.backend): Triton
reads that variable when a kernel is defined.
"""
