"""The one exception root of the benchmark suite."""


class BenchError(Exception):
    """A benchmark step could not run or produced an invalid result (message says which and why)."""
