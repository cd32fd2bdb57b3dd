"""The task names the held-out evaluation scores (``task_metrics`` holds their scorers), in
a module light enough for the config check (no torch)."""

PAIR_TASKS: tuple[str, ...] = (
    "canny2image",
    "hed2img",
    "depth2image",
    "semanticmap2image",
    "boundingbox2image",
    "pose2image",
    "deblurring",
    "image_inpainting",
    "image2canny",
    "image2hed",
    "image2depth",
    "image2semanticmap",
    "image2boundingbox",
    "image2pose",
)
VIEW_TASKS: tuple[str, ...] = ("multiview", "camera_pose")
SCORED_TASKS: tuple[str, ...] = (*PAIR_TASKS, *VIEW_TASKS)
