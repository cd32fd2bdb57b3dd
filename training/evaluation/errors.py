"""``BenchmarkError``: a benchmark folder, split file or request that cannot be evaluated
(one line naming the file and what was expected; ``onegen eval`` exits 2)."""

from training.data.errors import ConfigError


class BenchmarkError(ConfigError):
    pass
