"""milbench: a benchmarking suite for multiple-instance-learning survival models on WSI patch features."""

__version__ = "0.1.0"


class MilbenchError(Exception):
    """A user-facing error: bad input, named file or case, and the fix. The CLI prints it on one line, exit 2."""
