"""Model-based scorers, always from a local folder (nothing is downloaded): CLIP for
text-image agreement (CLIP score) and as the feature space of a Fréchet distance.

The folder is what ``transformers``' ``CLIPModel.save_pretrained`` plus the tokenizer's and
the image processor's ``save_pretrained`` write (as ``openai/clip-vit-large-patch14`` is
published: ``config.json``, the weights, tokenizer files, ``preprocessor_config.json``). A
folder that is not one is a one-line ConfigError naming it, before any sample is generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.safe_pt import first_line
from training.config import ConfigError
from training.evaluation.scorer_folders import clip_folder_problem

BATCH = 16


def _pooled(out: Any) -> torch.Tensor:
    """``get_*_features`` returns the projection (transformers 4) or an output whose
    ``pooler_output`` holds it (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """A local CLIP; embeddings come back L2-normalised, float64 numpy."""

    def __init__(self, path: str | Path, device: str = "cpu", flag: str = "--clip") -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
        from transformers.utils import logging as hf_logging

        folder = Path(path)
        problem = clip_folder_problem(folder, flag)
        if problem:
            raise ConfigError(problem)
        hf_logging.disable_progress_bar()  # one eval line per result, not a loading bar
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{flag} {path}: not a loadable CLIP ({first_line(exc)})") from None
        self.device = torch.device(device)
        self.model.eval().to(self.device)
        text = self.model.config.text_config
        self.max_length = min(
            int(self.tokenizer.model_max_length), int(text.max_position_embeddings)
        )

    @staticmethod
    def _unit(x: torch.Tensor) -> np.ndarray:
        x = x.double().cpu().numpy()
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    @torch.no_grad()
    def images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """[N, D] of HxWx3 uint8 images, in sub-batches of ``BATCH``."""
        out = []
        for i in range(0, len(images), BATCH):
            batch = self.processor(images=list(images[i : i + BATCH]), return_tensors="pt")
            pixels = batch["pixel_values"].to(self.device, self.model.dtype)
            out.append(self._unit(_pooled(self.model.get_image_features(pixel_values=pixels))))
        return np.concatenate(out) if out else np.zeros((0, self.model.config.projection_dim))

    @torch.no_grad()
    def texts(self, prompts: Sequence[str]) -> np.ndarray:
        """[N, D] of prompts, truncated to the text model's context (77 for CLIP)."""
        out = []
        for i in range(0, len(prompts), BATCH):
            tok = self.tokenizer(
                list(prompts[i : i + BATCH]), padding="max_length", truncation=True,
                max_length=self.max_length, return_tensors="pt",
            )  # fmt: skip
            feats = self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device),
            )
            out.append(self._unit(_pooled(feats)))
        return np.concatenate(out)


@dataclass
class Scorers:
    """The optional model-based scorers of an evaluation (None: that score is skipped)."""

    clip: ClipScorer | None = None
    lpips: Any = None  # training.evaluation.lpips.LPIPS
    face: Any = None  # training.evaluation.faces.FaceScorer

    @classmethod
    def load(cls, folders: dict[str, tuple[str | None, str]], device: str) -> Scorers:
        """``{"clip" | "lpips" | "face": (path or None, the option naming it)}``."""
        from training.evaluation.faces import FaceScorer
        from training.evaluation.lpips import load_lpips

        build = {"clip": ClipScorer, "lpips": load_lpips, "face": FaceScorer}
        return cls(**{k: build[k](p, device, flag) for k, (p, flag) in folders.items() if p})
