"""Vision-language captioning through transformers: offline loading, batched greedy
generation, and a per-family cap on image tokens.

Model code lives here, apart from the stage (``caption.py``), and is imported only on a
worker: the driver validates a DAG without importing torch or transformers.

Any image-text-to-text model transformers knows natively runs through one generic path
(``AutoModelForImageTextToText`` + ``AutoProcessor``, the processor's chat template,
greedy decoding). Two ways to get one:

- a local folder in the ``save_pretrained`` format (``config.json``, safetensors
  weights, the processor and tokenizer files), loaded offline (``local_files_only``,
  ``use_safetensors``; no ``trust_remote_code``: no code and no pickle from a weights
  folder);
- ``random-tiny``: a tiny LLaVA-NeXT with seeded random weights and MEANINGLESS captions,
  built by :mod:`datagen.stages.models.tiny.caption` (which also writes tiny builds of
  every family, and a mid-size one for benches, in the real format).

``max_image_tokens`` caps the image tokens each image puts into the prompt, per family
(image tokens are most of a captioning prompt: they set its prefill time and KV-cache
memory, hence the batch that fits); ``None`` keeps the processor's own default:

- ``llava_next``: anyres tiling is restricted to the grid pinpoints whose worst case
  (base tile + grid tiles + one newline per token row) fits the cap, in the processor and
  the model config alike (the model re-derives each image's tile count from them). When
  no released grid fits, a 1x1 grid (base + one tile, about twice a tile's tokens) is
  used; a cap below that is a ValueError: LLaVA-NeXT always adds at least one tile.
- ``qwen2_5_vl`` / ``qwen2_vl``: the image processor's ``max_pixels`` becomes
  ``cap * (patch * merge)**2``, so the dynamic resize keeps at most ``cap`` merged tokens.
- ``idefics3`` / ``smolvlm``: the splitting resolution becomes the largest ``k x k`` tile
  grid with ``(k*k + 1) * image_seq_len <= cap``; below two tiles' worth, splitting is
  off (one ``image_seq_len`` global image); below one, a ValueError.
- ``florence2``: the grid is fixed (577 tokens at the released 768 px): a cap it already
  meets is accepted, a smaller one is a ValueError.
- any other family: a ValueError whenever a cap is set (``None`` works everywhere). A
  cap silently ignored would make the recorded run parameters lie.
"""

from __future__ import annotations

# Sets the offline variables before transformers, ultralytics or segment-anything is
# imported below (they read them at import).
from datagen.stages.models import offline  # noqa: F401

# isort: split

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from datagen.stages.models.common import (
    PROCESSOR_FILES,
    RANDOM_TINY,
    TINY_SEED,
    check_pretrained_folder,
    chunks,
    pick_device,
    pick_dtype,
    weights_id,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# ------------------------------------------------------------------ image-token caps


def _cap_llava_next(model: Any, processor: Any, cap: int) -> None:
    """Keep the anyres grids whose worst case fits ``cap`` (processor and model config
    alike: the model re-derives each image's tile count from its own copy)."""
    ip = processor.image_processor
    crop = int(ip.crop_size["height"] if ip.crop_size else ip.size["shortest_edge"])
    side = crop // int(processor.patch_size)  # tokens along a tile's side
    per_tile = side * side

    def worst(pin: Sequence[int]) -> int:  # base + grid tiles + a newline per token row
        rows, cols = pin[0] // crop, pin[1] // crop
        return per_tile * (1 + rows * cols) + rows * side

    kept = [list(p) for p in ip.image_grid_pinpoints if worst(p) <= cap]
    if not kept:
        if worst((crop, crop)) > cap:
            raise ValueError(
                f"max_image_tokens={cap} is below LLaVA-NeXT's minimum here "
                f"({worst((crop, crop))}: base + one {per_tile}-token tile + newlines)"
            )
        kept = [[crop, crop]]
    ip.image_grid_pinpoints = kept
    model.config.image_grid_pinpoints = kept  # shared with the inner LlavaNextModel


def _cap_qwen_vl(processor: Any, cap: int) -> None:
    ip = processor.image_processor
    unit = int(ip.patch_size) * int(ip.merge_size)  # pixels along one merged token
    max_pixels = cap * unit * unit
    size = dict(ip.size)
    size["longest_edge"] = min(int(size["longest_edge"]), max_pixels)
    size["shortest_edge"] = min(int(size["shortest_edge"]), size["longest_edge"])
    ip.size = size  # smart_resize floors to multiples of ``unit`` within max_pixels


def _cap_idefics3(processor: Any, cap: int) -> None:
    ip = processor.image_processor
    per = int(processor.image_seq_len)
    tile = int(ip.max_image_size["longest_edge"])
    if cap < per:
        raise ValueError(f"max_image_tokens={cap} is below one {per}-token image (Idefics3)")
    default_k = math.ceil(int(ip.size["longest_edge"]) / tile) if ip.do_image_splitting else 1
    k = min(default_k, math.isqrt(max(cap // per - 1, 0)))  # (k*k + 1) * per <= cap
    if k >= 2:
        ip.size = {"longest_edge": k * tile}
    else:  # one tile's worth or less: the global image only
        ip.do_image_splitting = False
        ip.size = {"longest_edge": tile}


def _fixed_image_tokens(processor: Any) -> int | None:
    """Image tokens of a family with a fixed grid (Florence-2), else None (unknown)."""
    n = getattr(processor, "num_image_tokens", None)
    return int(n) if isinstance(n, int) else None


def cap_image_tokens(family: str, model: Any, processor: Any, cap: int | None) -> None:
    """Apply ``max_image_tokens`` (see the module docstring for what each family does)."""
    if cap is None:
        return
    if cap < 1:
        raise ValueError(f"max_image_tokens must be >= 1 or None, not {cap}")
    if family == "llava_next":
        _cap_llava_next(model, processor, cap)
    elif family in ("qwen2_5_vl", "qwen2_vl"):
        _cap_qwen_vl(processor, cap)
    elif family in ("idefics3", "smolvlm"):
        _cap_idefics3(processor, cap)
    else:
        fixed = _fixed_image_tokens(processor)
        if fixed is None or fixed > cap:
            have = "" if fixed is None else f" (it always uses {fixed})"
            raise ValueError(
                f"max_image_tokens={cap} cannot be honoured by a {family!r} model{have}: "
                "set it to None for this family"
            )


# ---------------------------------------------------------------------------- loading


def _user_turn(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


class CaptionModel:
    """A vision-language model and its processor on one device: RGB images + one
    instruction in, one greedy caption per image out."""

    def __init__(self, model: Any, processor: Any, device: Any, dtype: Any, model_id: str):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device, self.dtype = device, dtype
        self.model_id = model_id
        self.family: str = str(model.config.model_type)
        tok = processor.tokenizer
        # Decoder-only: left padding, so generation continues at the right edge of every
        # row. Encoder-decoder (Florence-2): the prompt only feeds the encoder, whose
        # learned positions expect text from position 0: right padding.
        tok.padding_side = "right" if model.config.is_encoder_decoder else "left"
        if tok.pad_token_id is None:  # Llama-style tokenizers ship without one
            tok.pad_token = tok.eos_token
        self.pad_token_id: int = int(tok.pad_token_id)
        self.image_token_id: int | None = getattr(processor, "image_token_id", None)

    @classmethod
    def load(
        cls,
        weights: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_image_tokens: int | None = None,
        seed: int = TINY_SEED,
    ) -> CaptionModel:
        """``weights``: a local ``save_pretrained`` folder (offline, safetensors only, no
        remote code) or ``random-tiny`` (a tiny LLaVA-NeXT, meaningless captions; ``seed``
        picks its random weights). ``max_image_tokens`` caps the image tokens an image
        puts into the prompt (module docstring: what each family does; None = default)."""
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        if weights == RANDOM_TINY:
            from datagen.stages.models.tiny.caption import random_model, tiny_parts

            config, processor = tiny_parts("llava_next")
            model = random_model(config, seed, processor.tokenizer)
        else:
            path = Path(weights)
            check_pretrained_folder(path, "caption", (*PROCESSOR_FILES, *TOKENIZER_FILES))
            # processor first: it fails fast (a missing optional dependency) and cheaply
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(
                path, local_files_only=True, use_safetensors=True, dtype=dt
            )
        cap_image_tokens(str(model.config.model_type), model, processor, max_image_tokens)
        return cls(model, processor, dev, dt, weights_id(weights))

    def _texts(self, prompt: str, n: int) -> list[str]:
        """The chat-formatted prompt (processor's template, else the tokenizer's, as older
        checkpoints keep it there); without any template the prompt goes as is (Florence-2:
        a task token such as ``<MORE_DETAILED_CAPTION>``, or plain text)."""
        template = getattr(self.processor, "chat_template", None) or getattr(
            self.processor.tokenizer, "chat_template", None
        )
        if not template:
            return [prompt] * n
        text = self.processor.apply_chat_template(
            _user_turn(prompt), chat_template=template, add_generation_prompt=True, tokenize=False
        )
        return [text] * n

    def encode(self, images: Sequence[np.ndarray], prompt: str) -> Any:
        """The processor's batch (token ids, attention mask, pixels) for ``images``, padded
        (left for decoder-only models), on the model's device and dtype. Images go as a
        nested list, one per prompt: what Idefics3 / SmolVLM require and the others accept;
        as PIL images, so no processor has to guess the channel axis of a small array."""
        from PIL import Image

        pil = [[Image.fromarray(np.ascontiguousarray(im)).convert("RGB")] for im in images]
        batch = self.processor(
            text=self._texts(prompt, len(images)), images=pil, padding=True, return_tensors="pt"
        )
        return batch.to(self.device, dtype=self.dtype)

    @torch.inference_mode()
    def generate(
        self,
        images: Sequence[np.ndarray],
        prompt: str,
        *,
        max_new_tokens: int,
        micro_batch: int,
        repetition_penalty: float = 1.0,
    ) -> list[str]:
        """One caption per RGB uint8 ``[H, W, 3]`` image: greedy (reruns reproduce), at most
        ``max_new_tokens`` tokens, only the new text (special tokens skipped, stripped).
        Images run ``micro_batch`` per ``generate`` call; left padding + the attention mask
        make a caption independent of its batch neighbours."""
        out: list[str] = []
        for part in chunks(list(images), micro_batch):
            batch = self.encode(part, prompt)
            ids = self.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                repetition_penalty=repetition_penalty,
                pad_token_id=self.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            if not self.model.config.is_encoder_decoder:  # drop the prompt
                ids = ids[:, batch["input_ids"].shape[1] :]
            texts = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
            out.extend(t.strip() for t in texts)
        return out
