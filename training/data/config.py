"""The shard loader's settings: the fit config's ``data`` section (``training.config`` adds
``kind`` and ``synthetic`` to it).

``ConfigError`` lives in :mod:`training.data.errors`, below every module that checks a key;
``training.config`` imports it from here (callers use ``training.config.ConfigError``: the
same class).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from training.data import skips
from training.data import tasks as T
from training.data.buckets import DEFAULT_BUCKETS, BucketTable, bucket_table
from training.data.errors import ConfigError, unknown_key


@dataclass
class DataConfig:
    """The shard loader's settings (``training.data.datamodule.OneGenDataModule``).

    ``paths``: ``{subset: dir | [dirs/URLs]}`` where each dir is a datagen output (holding
    ``<subset>/manifest.json``) or the subset folder itself; or one dir / a list of dirs,
    meaning every subset found in them.
    """

    paths: Any = None
    mix: dict[str, float] | None = None  # None: equal budget per task family
    batch_size: int = 8  # per rank
    num_workers: int = 2
    seed: int = 0
    # [[H, W], ...] for every batch, or per task family / subset / view-count range
    # (training.data.buckets)
    buckets: Any = field(default_factory=lambda: [list(b) for b in DEFAULT_BUCKETS])
    bucket_mode: str = "aspect"  # "aspect": nearest to the batch's first sample; "random"
    bucket_weights: list[float] | None = None  # for bucket_mode=random, one flat buckets list
    caption_dropout: float = 0.1
    # P(the input's own caption instead of the VLM's), for samples that have both
    source_caption_prob: float = 0.0
    reads_per_batch: int = 4  # byte-range reads (windows) per batch
    overread: float = 0.25  # read this fraction more samples than needed
    reverse_prob: float = 0.5  # map tasks: P(image -> map)
    tasks: list[str] | None = None  # restrict to these task names
    holdout: float = 0.0  # this fraction of each subset's keys is never trained on (eval)
    faceid_max_views: int = 4
    multiview_max_views: int = 4  # image views per multiview sample (twice as many views)
    # None: a batch has as many views as its first sample (up to the max); n: each batch draws
    # its view count in [n, max] (uniform), samples with fewer views sit it out
    faceid_min_views: int | None = None
    multiview_min_views: int | None = None
    camera_pose_prob: float = 0.25  # P(a multiview sample trains camera_pose, not multiview)
    # The ray views' grid and channels: the VAE's stride and latent channels, which the fit
    # fills in from the encoders (training.fit.build_datamodule).
    latent_stride: int = 8
    latent_channels: int = 16
    prefetch_factor: int = 2
    pin_memory: bool = False
    persistent_workers: bool = True
    validate: bool = True  # datagen.schema.validate_sample on every sample
    max_skipped_per_batch: int = 256  # more than this in one batch: the data is broken, raise
    max_skip_rate: float = skips.MAX_SKIP_RATE  # a subset's skipped / read over the run
    skip_rate_min_samples: int = skips.SKIP_RATE_MIN_SAMPLES
    batches_per_step: int = 1  # gradient accumulation, when no trainer says it
    rank: int | None = None  # default: trainer.global_rank / torch.distributed
    # None: the platform default (fork on Linux). Do not call cv2.setNumThreads in a forked
    # worker after the parent used OpenCV's thread pool: it deadlocks.
    multiprocessing_context: str | None = None

    @classmethod
    def from_any(cls, cfg: Any = None, **overrides: Any) -> DataConfig:
        """From a dict / DictConfig / DataConfig (keys of the fit's ``data`` node that belong
        to other readers, ``kind`` and ``synthetic``, are ignored); checked."""
        if isinstance(cfg, DataConfig):
            values = {f.name: getattr(cfg, f.name) for f in fields(DataConfig)}
        elif cfg is None:
            values = {}
        else:
            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
            values = dict(cfg)
        values.update(overrides)
        for key in ("kind", "synthetic"):
            values.pop(key, None)
        known = {f.name for f in fields(DataConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(unknown_key(f"data.{unknown[0]}", known))
        out = DataConfig(**values)
        out.check()
        return out

    def check(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"data.{key}: {why}")

        if self.paths is None:
            raise bad("paths", "required: {subset: datagen output dir(s)} or dir(s)")
        for key in ("batch_size", "reads_per_batch"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        if self.num_workers < 0:
            raise bad("num_workers", "must be >= 0")
        for key in (
            "caption_dropout",
            "source_caption_prob",
            "reverse_prob",
            "max_skip_rate",
            "camera_pose_prob",
        ):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "must be in [0, 1]")
        if not 0.0 <= self.holdout < 1.0:
            raise bad("holdout", f"a fraction in [0, 1); got {self.holdout}")
        if self.seed < 0:
            raise bad("seed", "must be >= 0")
        if self.overread < 0:
            raise bad("overread", "must be >= 0")
        if self.skip_rate_min_samples < 0:
            raise bad("skip_rate_min_samples", "must be >= 0")
        if self.bucket_mode not in ("aspect", "random"):
            raise bad("bucket_mode", f"must be aspect or random, got {self.bucket_mode!r}")
        if self.tasks is not None:
            unknown = sorted(set(self.tasks) - set(T.all_task_names()))
            if unknown:
                raise bad("tasks", f"unknown task {unknown[0]!r}; tasks: {T.all_task_names()}")
        if self.faceid_max_views < 2:
            raise bad("faceid_max_views", "must be >= 2")
        if self.multiview_max_views < 2:
            raise bad("multiview_max_views", "must be >= 2")
        for kind in ("faceid", "multiview"):
            low, high = getattr(self, f"{kind}_min_views"), getattr(self, f"{kind}_max_views")
            if low is not None and not 2 <= low <= high:
                raise bad(f"{kind}_min_views", f"must be in [2, {kind}_max_views={high}]")
        self.bucket_table()
        if self.latent_stride < 1 or self.latent_channels < 6:
            raise bad("latent_stride", "the VAE stride must be >= 1 and its channels >= 6")

    def view_limits(self, subset: str) -> tuple[int | None, int]:
        """(fewest, most) image views of a batch of a variable-view subset (faceid, multiview)."""
        return getattr(self, f"{subset}_min_views"), getattr(self, f"{subset}_max_views")

    def bucket_table(self) -> BucketTable:
        """``buckets`` checked (one line naming the key) and resolved per subset."""
        most = {s: self.view_limits(s)[1] for s in ("faceid", "multiview")}
        return bucket_table(self.buckets, self.bucket_mode, self.bucket_weights, most)
