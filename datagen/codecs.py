"""Image encoding and decoding shared by the labelers (OpenCV, one thread)."""

from __future__ import annotations

import os

import cv2
import numpy as np

# One OpenCV thread per process: parallelism comes from running one stage per
# logical CPU (Ray tasks, actors), and OpenCV's own pool would add up to
# ``cores`` threads in every worker (a local Ray has twice as many logical CPUs
# as cores, a cluster node dozens of workers). It also gives the single-process
# path (``builder.run_in_process``) the per-process work of one Ray worker.
# Measured with bench/datagen_throughput.py on 2 cores: OpenCV's pool made the
# single process 0-10% faster (1.2 cores busy) and Ray no faster (0-7% slower
# with 4 workers). ONEGEN_CV2_THREADS=0 restores OpenCV's default.
CV2_THREADS = int(os.environ.get("ONEGEN_CV2_THREADS", "1"))
if CV2_THREADS > 0:
    cv2.setNumThreads(CV2_THREADS)


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def encode_png(image: np.ndarray) -> bytes:
    """PNG of a gray ``[H, W]`` (8 or 16 bit) or RGB ``[H, W, 3]`` array."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def decode_rgb(data: bytes) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` of an image the decode stage wrote (its ``jpg``)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a decodable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
