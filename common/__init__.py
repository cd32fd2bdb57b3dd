"""Neutral helpers both halves may import (datagen, pipelines, training, orchestration, model).

Standard library, omegaconf and yaml only (torch lazily, inside ``safe_pt``), and nothing
from the project: the one table of offline variables (``offline``), the one override parser,
closest-name hint and flat MLflow params (``overrides``), and the one restricted pickle
reader (``safe_pt``) for labeler ``.pt`` files and training's checkpoints, instead of a copy
in each half.
"""
