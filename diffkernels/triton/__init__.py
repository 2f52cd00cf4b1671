"""Triton kernels. Imported lazily: set TRITON_INTERPRET=1 before the first import to run them on CPU."""
