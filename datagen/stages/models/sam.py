"""SAM (the ``segment_anything`` package) for the segment labeler: boxes -> masks, each
image encoded once and all its boxes decoded together. Imported only in
``SegmentStage.setup()`` on a worker.

Weights: an official ``.pth`` state dict (``sam_vit_{b,l,h}_*.pth``) read with
``torch.load(weights_only=True)`` on CPU (or a ``.safetensors`` file of the same keys).
The architecture is inferred from the state dict's shapes, so every SAM v1 size, and the
tiny test model, loads through one path, and the package's builders (which unpickle
without ``weights_only``) never open a file (the architecture and its builder are
:mod:`datagen.stages.models.sam_arch`). ``random-tiny``: a tiny SAM with seeded random
weights whose masks are MEANINGLESS, from :mod:`datagen.stages.models.tiny.sam`.
SAM pads every image to its square input anyway, so its encoder batches freely.
"""

from __future__ import annotations

# Sets the offline variables before transformers, ultralytics or segment-anything is
# imported below (they read them at import).
from datagen.stages.models import offline  # noqa: F401

# isort: split

import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.safe_pt import weights_only_load
from datagen.stages.models.common import (
    RANDOM_TINY,
    TINY_SEED,
    CheckpointError,
    chunks,
    pick_device,
    pick_dtype,
    weights_id,
)
from datagen.stages.models.sam_arch import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    build_sam,
    infer_sam_arch,
)

MAX_BOXES_PER_CALL = 64  # SAM decodes an image's boxes in calls of at most this many


def _few(names: Sequence[str], n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _reason(exc: BaseException) -> str:
    """The informative line of a (multi-line) loader error: torch's weights_only message
    wraps it in boilerplate, including advice to retry with weights_only=False."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(boiler)]
    return ((useful or lines or [type(exc).__name__])[0])[:200]


def read_sam_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A SAM state dict from a ``.pth`` (``torch.load`` with ``weights_only=True`` on CPU:
    no code from the file runs) or a ``.safetensors`` file; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM weights {str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - any parse failure is one line
            raise CheckpointError(f"SAM weights {str(path)!r}: unreadable safetensors") from exc
    else:
        try:
            state = weights_only_load(path)
        except pickle.UnpicklingError as exc:
            kind = "a torch.save file" if zipfile.is_zipfile(path) else "not a torch.save file"
            raise CheckpointError(
                f"SAM weights {str(path)!r}: refused by weights_only loading ({kind}; nothing "
                f"from it was run; only a state dict of tensors loads): {_reason(exc)}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - truncated zips, foreign formats
            raise CheckpointError(
                f"SAM weights {str(path)!r}: not a torch.save state dict "
                f"({type(exc).__name__}: {_reason(exc)})"
            ) from None
    if isinstance(state, dict) and set(state) in ({"model"}, {"state_dict"}):
        state = next(iter(state.values()))  # a training checkpoint's wrapped state dict
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"SAM weights {str(path)!r}: not a state dict of tensors")
    return state


def sam_from_state_dict(state: dict[str, torch.Tensor], what: str = "SAM weights") -> Any:
    """A Sam of the inferred architecture holding ``state`` (built on the meta device, so no
    time goes into initialising weights that are overwritten). Missing, unexpected or
    mis-shaped keys: a one-line error naming a few."""
    arch = infer_sam_arch(state)
    with torch.device("meta"):
        sam = build_sam(arch)
    expected = {k: tuple(v.shape) for k, v in sam.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        parts = [
            f"{label} {_few(keys)}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("mis-shaped", wrong),
            )
            if keys
        ]
        shape = f"width {arch.embed_dim}, depth {arch.depth}, input {arch.img_size}"
        raise CheckpointError(f"{what} do not fit a SAM ({shape}): {'; '.join(parts)}")
    sam.load_state_dict(state, strict=True, assign=True)
    # the non-persistent buffers were left on the meta device
    sam.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1), False)
    sam.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1), False)
    return sam.float().eval()


class Segmenter:
    """SAM on one device: RGB images and their xyxy boxes in, one bool mask per box out.

    The image encoder (the heavy part) runs in ``dtype``; the prompt encoder and mask
    decoder (a few M parameters) stay float32, as segment_anything's prompt encoder casts
    coordinates to float32 itself and would not mix with bf16 weights.
    """

    def __init__(self, sam: Any, device: Any, dtype: Any, model_id: str):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.sam = sam.to(device).float().eval()
        self.sam.image_encoder.to(dtype)
        self.device, self.dtype = device, dtype
        self.model_id = model_id
        self.img_size = int(sam.image_encoder.img_size)
        self.transform = ResizeLongestSide(self.img_size)

    @classmethod
    def load(
        cls, weights: str, *, device: str = "auto", dtype: str = "auto", seed: int = TINY_SEED
    ) -> Segmenter:
        """``weights``: a SAM v1 ``.pth`` state dict (``weights_only`` on CPU; any of vit_b /
        vit_l / vit_h, inferred) or ``.safetensors``, or ``random-tiny``."""
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        if weights == RANDOM_TINY:
            from datagen.stages.models.tiny.sam import TINY_SAM, random_sam

            return cls(random_sam(TINY_SAM, seed), dev, dt, RANDOM_TINY)
        what = f"SAM weights {weights!r}"
        sam = sam_from_state_dict(read_sam_state_dict(weights), what)
        return cls(sam, dev, dt, weights_id(weights))

    def _input(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """SamPredictor.set_image's transform: resize the long side to ``img_size`` (PIL,
        as released), normalise, pad to the square input. -> [3, S, S] float32, (h, w)."""
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).float()
        return self.sam.preprocess(x), (resized.shape[0], resized.shape[1])

    @torch.inference_mode()
    def segment(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], *, micro_batch: int
    ) -> list[np.ndarray]:
        """Bool masks ``[K, H, W]`` per RGB uint8 ``[H, W, 3]`` image, one per xyxy pixel box
        of ``boxes[i]`` ([K, 4]), at the image's own size.

        Each image is encoded once (``micro_batch`` images per encoder pass; images without
        boxes are not encoded), then its boxes are decoded together
        (``multimask_output=False``), upscaled by ``Sam.postprocess_masks`` and thresholded
        at ``Sam.mask_threshold``.
        """
        if len(images) != len(boxes):
            raise ValueError(f"segment: {len(images)} images but {len(boxes)} box arrays")
        prompts: list[np.ndarray] = []
        for i, b in enumerate(boxes):
            arr = np.asarray(b, np.float32)
            if arr.size == 0:
                arr = arr.reshape(0, 4)
            if arr.ndim != 2 or arr.shape[1] != 4 or not np.isfinite(arr).all():
                raise ValueError(f"segment: boxes[{i}] must be finite [K, 4] xyxy, got {arr.shape}")
            prompts.append(arr)
        out: list[np.ndarray] = [
            np.zeros((0, *im.shape[:2]), bool) for im in images
        ]  # K = 0 stays empty
        todo = [i for i, p in enumerate(prompts) if len(p)]
        for part in chunks(todo, micro_batch):
            inputs = [self._input(images[i]) for i in part]
            x = torch.stack([t for t, _ in inputs]).to(self.dtype)
            embeddings = self.sam.image_encoder(x).float()
            for j, i in enumerate(part):
                out[i] = self._decode(embeddings[j], inputs[j][1], images[i].shape[:2], prompts[i])
        return out

    def _decode(
        self,
        embedding: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        boxes: np.ndarray,
    ) -> np.ndarray:
        """All of one image's boxes through the prompt encoder and mask decoder (calls of
        at most :data:`MAX_BOXES_PER_CALL` boxes: each box is decoded independently, this
        only bounds memory)."""
        sam = self.sam
        masks: list[np.ndarray] = []
        for start in range(0, len(boxes), MAX_BOXES_PER_CALL):
            b = torch.as_tensor(boxes[start : start + MAX_BOXES_PER_CALL], device=self.device)
            b = self.transform.apply_boxes_torch(b, original_size)
            sparse, dense = sam.prompt_encoder(points=None, boxes=b, masks=None)
            low_res, _ = sam.mask_decoder(
                image_embeddings=embedding[None],
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            logits = sam.postprocess_masks(low_res, input_size, tuple(original_size))
            masks.append((logits[:, 0] > sam.mask_threshold).cpu().numpy())
        return np.concatenate(masks, axis=0)
