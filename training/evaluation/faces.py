"""Face identity, for ``unsplash50-id``: the face check's detector (datagen's one-class YOLO,
loaded safely as the face stage loads it) finds each image's best face, its square crop
(``FACE_MARGIN`` x the box's long side) goes to ArcFace at 112 px, and the ID similarity of
two images is the cosine of their embeddings, 0 when the generated image shows no face, as
PhotoMaker, InstantID and PuLID score Unsplash-50 (they align by five landmarks first; no
landmark model is loaded here, so the crop is the box's).

A face weights folder holds ``backbone.pth`` (an arcface_torch IResNet) and ``detector.pt``
(an ultralytics one-class face YOLO, as the face check takes).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from training.config import ConfigError
from training.evaluation.scorer_folders import FACE_BACKBONE, FACE_DETECTOR, face_folder_problem

FACE_MARGIN = 1.2
CONF = 0.5
IMGSZ = 640


def square_crop(image: np.ndarray, box: np.ndarray, margin: float = FACE_MARGIN) -> np.ndarray:
    """The square around ``box`` (xyxy), ``margin`` x its long side, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    half = max(x1 - x0, y1 - y0) * margin / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    h, w = image.shape[:2]
    a, b = int(max(0, round(cx - half))), int(min(w, round(cx + half)))
    c, d = int(max(0, round(cy - half))), int(min(h, round(cy + half)))
    return image[c : max(d, c + 1), a : max(b, a + 1)]


class FaceScorer:
    def __init__(self, folder: str | Path, device: str = "cpu", flag: str = "--face") -> None:
        from datagen.stages.models.face import load_face_detector
        from training.evaluation.arcface import load_arcface

        problem = face_folder_problem(folder, flag)
        if problem:
            raise ConfigError(problem)
        root = Path(folder)
        self.device = torch.device(device)
        self.net = load_arcface(root / FACE_BACKBONE, device, flag)
        try:
            self.detector = load_face_detector(
                str(root / FACE_DETECTOR), self.device, False, IMGSZ, 0.5
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{flag} {root / FACE_DETECTOR}: {exc}") from None

    def face(self, image: np.ndarray) -> np.ndarray | None:
        """The best face's square crop of an RGB uint8 image, None without one."""
        found = self.detector([image], CONF, 1)[0]
        return square_crop(image, found.boxes[0]) if len(found.boxes) else None

    @torch.no_grad()
    def embed(self, crop: np.ndarray) -> np.ndarray:
        x = cv2.resize(np.ascontiguousarray(crop), (112, 112), interpolation=cv2.INTER_AREA)
        t = torch.from_numpy(x).permute(2, 0, 1)[None].float().div(255).sub(0.5).div(0.5)
        e = self.net(t.to(self.device))[0].double().cpu().numpy()
        return e / np.linalg.norm(e)

    def similarity(self, generated: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        """``id_sim`` (0 without a face in ``generated``, an RGB uint8 image) against the
        identity's embedding ``reference`` (:meth:`embed`), and ``face_found`` (0 / 1)."""
        face = self.face(generated)
        if face is None:
            return {"id_sim": 0.0, "face_found": 0.0}
        return {"id_sim": float(self.embed(face) @ reference), "face_found": 1.0}
