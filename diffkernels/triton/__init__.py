"""Triton kernels, one module per kernel primitive (see diffkernels/ops/__init__.py). Imported lazily:
set TRITON_INTERPRET=1 before the first import to run them on CPU."""
