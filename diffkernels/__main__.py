"""``python -m diffkernels <command>``: the same command line as ``diffkernels``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
