"""``unsplash50-id``: identity-preserving generation (the paper's Table 3: ID similarity and
CLIP-T on Unsplash-50, the 50 portraits PhotoMaker and PuLID evaluate on).

Unsplash-50 is published as a list of photos, not as a folder layout; this benchmark reads
the plainest one: ``<path>/prompts.txt`` (one prompt a line) and the subjects' reference
photos beside it (``<path>/<subject>.jpg`` / ``.png`` / ``.jpeg`` / ``.webp``, one per
subject). Every subject is generated with every prompt (case ``<subject>/<prompt index>``,
seeded per case) as the ``faceid`` task: the reference's face crop as view 1, the prompt as
view 0's caption (``[[faceid]] [[img0]] <prompt> [[img1]]``). Scores: ``id_sim``, the
ArcFace cosine of the generated face and the reference face (``faces.FaceScorer``: needs
``--face``), ``face_found``, and with ``--clip`` ``clip_t``, the CLIP score against the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from training.evaluation import metrics as M
from training.evaluation.cases import Case
from training.evaluation.errors import BenchmarkError
from training.evaluation.image_files import IMAGE_SUFFIXES, read_image

PROMPTS = "prompts.txt"
PAPER = {"id_sim": 0.283, "clip_t": 26.80}


def read_subjects(root: Path) -> tuple[list[Path], list[str]]:
    """(reference photos in name order, prompts)."""
    prompts_file = root / PROMPTS
    if not root.is_dir() or not prompts_file.is_file():
        raise BenchmarkError(
            f"--path {root}: expected {PROMPTS} (one prompt a line) and the subjects' "
            "reference photos beside it (<subject>.jpg / .png)"
        )
    prompts = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    photos = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not prompts or not photos:
        raise BenchmarkError(
            f"--path {root}: {'no prompt' if not prompts else 'no reference photo'}"
        )
    return photos, prompts


def id_cases(photos: list[Path], prompts: list[str], side: int, face: Any, clip: Any) -> list[Case]:
    from training.data.views import to_unit
    from training.inference.sample import sample_prompt

    references: dict[Path, tuple[torch.Tensor, np.ndarray]] = {}

    def reference(photo: Path) -> tuple[torch.Tensor, np.ndarray]:
        if photo not in references:
            rgb, _ = read_image(photo)
            crop = face.face(rgb)
            if crop is None:
                raise BenchmarkError(
                    f"{photo}: no face found (a reference must show the subject's face)"
                )
            square = cv2.resize(
                np.ascontiguousarray(crop), (side, side), interpolation=cv2.INTER_AREA
            )
            references[photo] = torch.from_numpy(to_unit(square)), face.embed(crop)
        return references[photo]

    def case(photo: Path, p: int) -> Case:
        def inputs() -> dict[str, Any]:
            view, _ = reference(photo)
            return {"cond_pixels": torch.stack([torch.zeros_like(view), view])[None],
                    "cond_mask": torch.tensor([[False, True]])}  # fmt: skip

        def score(out: Any, _: dict) -> dict[str, float]:
            from training.inference.images import to_uint8

            image = to_uint8(out[0, 0])
            scores = face.similarity(image, reference(photo)[1])
            if clip is not None:
                scores["clip_t"] = M.clip_score(clip.images([image]), clip.texts([prompts[p]]))
            return scores

        prompt = sample_prompt("faceid", prompts[p])
        return Case(f"{photo.stem}/{p:03d}", "faceid", prompt, inputs, score, has_target=False)

    for photo in photos:  # every reference's face found before any sample is generated
        reference(photo)
    return [case(photo, p) for photo in photos for p in range(len(prompts))]
