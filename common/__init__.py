"""Neutral helpers both halves may import (datagen, pipelines, training, orchestration, model).

Standard library, omegaconf and yaml only, and nothing from the project: the one table of
offline variables and the one override parser and closest-name hint, instead of a copy in
each half.
"""
