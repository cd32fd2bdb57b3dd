"""The task names the held-out evaluation scores (``task_metrics`` holds their scorers), in
a module light enough for the config check (no torch)."""

# Tasks whose target is a photo: LPIPS (eval.lpips_path) scores them beside PSNR / SSIM.
PHOTO_TASKS: tuple[str, ...] = (
    "canny2image",
    "hed2img",
    "depth2image",
    "semanticmap2image",
    "boundingbox2image",
    "pose2image",
    "deblurring",
    "image_inpainting",
)
PAIR_TASKS: tuple[str, ...] = (
    *PHOTO_TASKS,
    "image2canny",
    "image2hed",
    "image2depth",
    "image2semanticmap",
    "image2boundingbox",
    "image2pose",
)
VIEW_TASKS: tuple[str, ...] = ("multiview", "camera_pose")
SCORED_TASKS: tuple[str, ...] = (*PAIR_TASKS, *VIEW_TASKS)
CLIP_TASKS: tuple[str, ...] = ("text2image",)  # scored only with a CLIP (eval.clip_path)
FACE_TASKS: tuple[str, ...] = ("faceid",)  # scored only with face weights (eval.face_path)


def scorable_tasks(clip: str | None, face: str | None) -> tuple[str, ...]:
    """The tasks that have a metric, given which optional scorers are there."""
    return (*SCORED_TASKS, *(CLIP_TASKS if clip else ()), *(FACE_TASKS if face else ()))
