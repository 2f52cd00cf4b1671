"""The op layer: ``torch.library`` custom ops (validation of what the kernels assume, fake kernels,
autograd) and dispatch through the backend table (``_kernels``).

Every op follows one pipeline and one naming rule. The public API lives in the method package
(diffkernels/sparse/ for sparse supervision, diffkernels/mdm/ for masked diffusion LMs,
diffkernels/optimal_loss/): it checks the user's arguments and calls the op layer. Each kernel
primitive has one name across every layer:

* ``ops/<name>.py``: the custom op ``<op>_op`` (``torch.ops.diffkernels.<op>``, what torch.compile,
  export and fake tensors see), its fake kernel and autograd, and the entry point ``<op>`` that
  the public function calls where the op has an eager fast path (the kernels directly, without
  the custom op's Python dispatcher, in plain eager mode);
* ``ops/_kernels.py``: the table of which implementation each backend runs for each primitive;
* ``triton/<name>.py``: the Triton kernels;
* ``csrc/<name>.cpp``, ``csrc/<name>_cuda.cu``: the C++ (CPU) and CUDA kernels;
* ``reference/<name>.py``: the plain-PyTorch oracle and the ``torch`` backend;
* ``tests/test_<name>.py`` and ``benchmarks/bench_<name>.py``.

The names: ``sparse_mse`` (the sparse-supervision loss and its keep-mask), ``mask_tokens`` (token
masks for masked diffusion LMs), ``masked_ce`` (cross-entropy at masked tokens only; no C++/CUDA
kernel) and ``scale_rows`` (the in-place rescale that the backward of sparse_mse and masked_ce
share; its C++/CUDA kernels are in csrc/sparse_mse.cpp and csrc/sparse_mse_cuda.cu).
"""
