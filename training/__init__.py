"""The training half: a Lightning module and fit over One-Gen shards (``data/``), sampling
from checkpoints (``inference/``) and run folders, clusters and tracking (``run/``)."""
