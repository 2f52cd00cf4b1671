"""Integrations with other libraries: :mod:`diffkernels.integrations.diffusers` and
:mod:`diffkernels.integrations.transformers`.

Importing this package imports neither library; each integration module imports its library when
it is used and raises an ImportError naming the extra to install when it is missing.
"""
