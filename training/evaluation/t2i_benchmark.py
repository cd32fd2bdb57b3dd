"""``t2i``: text-to-image on a prompt file, written in GenEval's layout and scored by CLIP.

Prompt files: plain text (one prompt a line, blank lines skipped) or JSON lines with a
``prompt`` key each, as GenEval's ``prompts/evaluation_metadata.jsonl`` (its ``tag``,
``include`` ... are kept as the sample's metadata). Prompt ``i`` is generated once, seeded
``--seed + i``, and saved as ``<out>/images/<i:05d>/samples/00000.png`` beside
``<out>/images/<i:05d>/metadata.jsonl``: the folder GenEval's ``evaluate_images.py`` reads
(it needs its own detector; the paper's GenEval overall is 0.65, Table 1).

With ``--clip <folder>`` (a local CLIP, :class:`training.evaluation.scorers.ClipScorer`)
each image gets its CLIP score against its prompt (Hessel et al. 2021: 100 x max(cos, 0)),
and with ``--reference <folder>`` as well the run gets the Fréchet distance between CLIP
image features of the generated and the reference images (``fd_clip``: FID's formula in
CLIP's feature space, Kynkäänniemi et al. 2023; Inception FID needs pytorch-fid's Inception
weights, which nothing here loads). The reference features are cached in
``<out>/reference_features.npz``, keyed by the files' names, sizes and times.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluation import metrics as M
from training.evaluation.cases import Case
from training.evaluation.errors import BenchmarkError
from training.evaluation.image_files import image_files, read_image

IMAGES = "images"
MAX_PROMPT_FILE_BYTES = 16 << 20
MIN_FD_IMAGES = 2


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """The prompt file as metadata records, each with its ``prompt``."""
    if not path.is_file():
        raise BenchmarkError(
            f"--path {path}: not a prompt file (one prompt a line, or GenEval's "
            "evaluation_metadata.jsonl)"
        )
    if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise BenchmarkError(f"--path {path}: over {MAX_PROMPT_FILE_BYTES >> 20} MiB")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BenchmarkError(f"--path {path}: not UTF-8 text ({exc.reason})") from None
    records = []
    jsonl = path.suffix == ".jsonl"
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            records.append({"prompt": line.strip()})
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise BenchmarkError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise BenchmarkError(f'{path}:{n}: expected an object with a "prompt" string')
        records.append(record)
    if not records:
        raise BenchmarkError(f"--path {path}: no prompt")
    return records


def sample_png(out: Path, index: int) -> Path:
    return out / IMAGES / f"{index:05d}" / "samples" / "00000.png"


def t2i_cases(records: Sequence[dict], side: int, out: Path, clip: Any) -> list[Case]:
    from training.inference.sample import sample_prompt

    def case(i: int, record: dict) -> Any:
        def score(result: Any, _: dict) -> dict[str, float]:
            from PIL import Image

            from training.inference.images import to_uint8
            from training.run.folders import write_text_atomic

            image = to_uint8(result[0, 0])
            png = sample_png(out, i)
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(png)
            write_text_atomic(png.parent.parent / "metadata.jsonl", json.dumps(record) + "\n")
            if clip is None:
                return {}
            embeds = clip.images([image]), clip.texts([record["prompt"]])
            return {"clip_score": M.clip_score(*embeds)}

        return Case(f"{i:05d}", "text2image", sample_prompt("text2image", record["prompt"]),
                    lambda: {"size": (side, side)}, score, has_target=False)  # fmt: skip

    return [case(i, r) for i, r in enumerate(records)]


def _reference_features(clip: Any, folder: Path, out: Path) -> np.ndarray:
    files = image_files(folder)
    if len(files) < MIN_FD_IMAGES:
        raise BenchmarkError(f"--reference {folder}: fewer than {MIN_FD_IMAGES} images")
    key = hashlib.blake2b(digest_size=16)
    for f in files:
        st = f.stat()
        key.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cache = out / "reference_features.npz"
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["key"]) == key.hexdigest():
                return z["features"]
    feats = np.concatenate([clip.images([read_image(f)[0]]) for f in files])
    out.mkdir(parents=True, exist_ok=True)
    np.savez(cache, key=key.hexdigest(), features=feats)
    return feats


def fd_clip(clip: Any, reference: Path, out: Path, count: int) -> dict[str, dict[str, float]]:
    """``{"text2image": {"fd_clip": d, "fd_images": n}}`` over the generated images so far."""
    done = [sample_png(out, i) for i in range(count) if sample_png(out, i).is_file()]
    if len(done) < MIN_FD_IMAGES:
        return {}
    generated = np.concatenate([clip.images([read_image(p)[0]]) for p in done])
    d = M.fid(generated, _reference_features(clip, reference, out))
    return {"text2image": {"fd_clip": d, "fd_images": float(len(done))}}
