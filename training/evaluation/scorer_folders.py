"""What a scorer's local weights folder must hold, checked without torch (the config check
runs it before any work starts; loading is ``scorers`` / ``lpips``). The checks return the
problem as one line (None: fine); the caller raises it as its error."""

from __future__ import annotations

from pathlib import Path

CLIP_CONFIG = "config.json"
# LPIPS variant -> (the lpips package's v0.1 linear layers, torchvision's backbone checkpoint);
# VGG first: used when a folder holds both.
FACE_BACKBONE = "backbone.pth"  # arcface_torch's IResNet
FACE_DETECTOR = "detector.pt"  # a one-class ultralytics face YOLO
LPIPS_FILES = {
    "vgg": ("vgg.pth", "vgg16-397923af.pth"),
    "alex": ("alex.pth", "alexnet-owt-7be5be79.pth"),
}


def lpips_net(folder: str | Path) -> str | None:
    """The LPIPS variant whose two files ``folder`` holds."""
    root = Path(folder)
    return next((n for n, fs in LPIPS_FILES.items() if all((root / f).is_file() for f in fs)), None)


def clip_folder_problem(path: str | Path, flag: str) -> str | None:
    if (Path(path) / CLIP_CONFIG).is_file():
        return None
    return (
        f"{flag} {path}: not a CLIP folder (expected config.json, the weights, the tokenizer "
        "and preprocessor_config.json, as CLIPModel.save_pretrained and its processor write them)"
    )


def lpips_folder_problem(path: str | Path, flag: str) -> str | None:
    if lpips_net(path) is not None:
        return None
    (vl, vb), (al, ab) = LPIPS_FILES["vgg"], LPIPS_FILES["alex"]
    return (
        f"{flag} {path}: expected {vl} + {vb} (or {al} + {ab}): the lpips package's v0.1 "
        "linear layers and torchvision's backbone checkpoint"
    )


def face_folder_problem(path: str | Path, flag: str) -> str | None:
    missing = [f for f in (FACE_BACKBONE, FACE_DETECTOR) if not (Path(path) / f).is_file()]
    if not missing:
        return None
    return (
        f"{flag} {path}: no {' or '.join(missing)} (expected {FACE_BACKBONE}, an arcface_torch "
        f"IResNet, and {FACE_DETECTOR}, a one-class ultralytics face YOLO)"
    )


PROBLEMS = {"clip": clip_folder_problem, "lpips": lpips_folder_problem, "face": face_folder_problem}


def scorer_folders_problem(folders: dict[str, tuple[str | None, str]]) -> str | None:
    """The first problem of the given folders: ``{"clip" | "lpips" | "face": (path, flag)}``
    (a None path: not asked for)."""
    for kind, (path, flag) in folders.items():
        if path is not None and (problem := PROBLEMS[kind](path, flag)):
            return problem
    return None
