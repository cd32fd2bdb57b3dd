"""The console of a datagen run or a fit: the project's own lines and the warnings that
matter, not the libraries' INFO chatter around them. ``verbose`` brings their stock
console back. Ray's console is quieted where Ray starts (``orchestration.ray_runtime``).

What is quieted, and why each says nothing a user acts on:

- MLflow's ``INFO`` lines (``Creating initial MLflow database tables``, the system-metrics
  monitor's start and stop): the run's own lines name the MLflow run and its store;
- Lightning's ``rank_zero_info`` lines (``GPU available: False``, ``TPU available``, the
  litlogger tip, ```Trainer.fit` stopped: `max_steps` reached``): the fit's own lines say
  what it runs on and where it stopped; Lightning's warnings are untouched;
- Lightning's MLflow logger announcing that it creates the experiment;
- Lightning's ``isinstance(treespec, LeafSpec)`` deprecation warning, which is Lightning's
  own use of torch's pytree API, not the project's.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

MLFLOW_LEVEL_ENV = "MLFLOW_LOGGING_LEVEL"  # read by mlflow when it configures its loggers
RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
LIGHTNING_MLFLOW_LOGGER = "lightning.pytorch.loggers.mlflow"
LIGHTNING_MLFLOW_NOTICES = ("Experiment with name ",)
LIGHTNING_DEPRECATIONS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class _DropNotices(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


_MLFLOW_NOTICES = _DropNotices(LIGHTNING_MLFLOW_NOTICES)


def quiet_library_logs(verbose: bool = False) -> None:
    """Set the libraries' console levels for this process (and, through the environment,
    what it starts): quiet unless ``verbose``. A user's own ``MLFLOW_LOGGING_LEVEL`` is kept
    unless ``verbose``."""
    if verbose:
        os.environ[MLFLOW_LEVEL_ENV] = "INFO"
    else:
        os.environ.setdefault(MLFLOW_LEVEL_ENV, "WARNING")
    if "mlflow" in sys.modules:  # configured at import already: set the level it would have
        logging.getLogger("mlflow").setLevel(os.environ[MLFLOW_LEVEL_ENV].upper())
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    lightning_mlflow = logging.getLogger(LIGHTNING_MLFLOW_LOGGER)
    lightning_mlflow.removeFilter(_MLFLOW_NOTICES)
    if not verbose:
        lightning_mlflow.addFilter(_MLFLOW_NOTICES)
        for message in LIGHTNING_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message)
