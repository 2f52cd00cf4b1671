"""``diffkernels demo``: train a tiny EDM diffusion model on scikit-learn's digits with the sparse loss.

The loss is :func:`diffkernels.sparse_mse_loss`: each step supervises only a random
``1 - mask_ratio`` of the pixels, with a fresh counter-RNG mask per step (``fold_seed(seed, step)``);
the network still sees the whole noisy image. Everything else is plain EDM (Karras et al., 2022,
:mod:`diffkernels.edm`): log-normal noise levels, preconditioning with sigma_data = 0.5, the
lambda(sigma) loss weight and the deterministic Heun sampler. The network (:mod:`.model`) is the
demo's own and used by nothing else; the example scripts have theirs.

Needs the optional ``examples`` extras (scikit-learn for the bundled digits, matplotlib for the
figures); nothing is downloaded. Runs on CUDA when available, else on the CPU; the loss runs on the
default backend of the device (``diffkernels.backends()``: the CUDA kernels where they are built,
else Triton, on a GPU; the C++ kernels on the CPU). On the CPU the whole default run takes about 20 s
with one thread on an idle machine.
"""

from .run import backend_label, check_demo_args, demo_device, run_demo

__all__ = ["run_demo", "check_demo_args", "demo_device", "backend_label"]
