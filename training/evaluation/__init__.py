"""Evaluation: the paper's metrics (``metrics``), benchmark readers and ``onegen eval``."""
