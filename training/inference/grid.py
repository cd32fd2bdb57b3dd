"""Sample grids a reviewer can read: one row per sample, labelled panels, a header per row.

A grid is rendered per task (``SampleGrid`` logs one image per task and step). Each row is

    +--------------------------------------------------------------+
    | canny2image                                          step 40 |  header band: task (+ step)
    | a photo of a red bicycle leaning on a wall, evening light... |  and the prompt, wrapped
    +--------------------------------------------------------------+
    |   condition    |   generated    |     target     |            captions
    |   [cell x cell]|   [cell x cell]|   [cell x cell]|            panels
    +--------------------------------------------------------------+

``text2image`` rows hold the generated image only, one row per configured prompt;
``camera_pose`` rows the given images, then each estimated camera as its ray directions in RGB
(``ray_pixels``), then the true ones. Panels are
scaled to fit a ``cell`` x ``cell`` box keeping their aspect, nearest-neighbour when enlarged
(the pixels of a 32 px sample stay visible), Lanczos when reduced. Text uses PIL's built-in
font (``ImageFont.load_default``, scalable with FreeType, the fixed bitmap font without it).
The layout is a function of ``cell`` and the number of rows and columns only (``Layout``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from training.inference.images import to_uint8

BACKGROUND = (255, 255, 255)
BAND = (228, 230, 236)  # header band behind the task name and prompt
BOX = (244, 244, 244)  # a panel's cell, visible where the panel is not square
TEXT = (16, 16, 16)
CAPTION = (70, 70, 70)
PROMPT_LINES = 3  # prompt lines in a header band; longer prompts end in "..."
ELLIPSIS = "..."


@dataclass(frozen=True)
class Panel:
    pixels: torch.Tensor  # [3, H, W] in [-1, 1]
    caption: str


@dataclass(frozen=True)
class Row:
    task: str
    prompt: str
    panels: Sequence[Panel]


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@functools.lru_cache(maxsize=16)
def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _line_height(font: Font) -> int:
    return int(font.getbbox("Ag|y")[3]) + 2


@dataclass(frozen=True)
class Layout:
    """Where everything goes for a given ``cell``: pure arithmetic, shared with the tests."""

    cell: int

    @property
    def pad(self) -> int:
        return max(2, self.cell // 48)

    @property
    def title_font(self) -> Font:
        return _font(max(11, round(self.cell * 0.08)))

    @property
    def prompt_font(self) -> Font:
        return _font(max(10, round(self.cell * 0.07)))

    @property
    def caption_font(self) -> Font:
        return _font(max(9, round(self.cell * 0.065)))

    @property
    def header_height(self) -> int:
        lines = _line_height(self.title_font) + PROMPT_LINES * _line_height(self.prompt_font)
        return lines + 2 * self.pad

    @property
    def caption_height(self) -> int:
        return _line_height(self.caption_font) + self.pad

    @property
    def row_height(self) -> int:
        return self.header_height + self.caption_height + self.cell + self.pad

    def width(self, n_cols: int) -> int:
        # At least two cells wide, so a one-panel row still has room for its prompt.
        return max(n_cols, 2) * (self.cell + self.pad) + self.pad

    def size(self, n_rows: int, n_cols: int) -> tuple[int, int]:
        """(width, height) of a grid of ``n_rows`` rows of at most ``n_cols`` panels."""
        return self.width(n_cols), self.pad + n_rows * (self.row_height + self.pad)

    def row_top(self, i: int) -> int:
        return self.pad + i * (self.row_height + self.pad)

    def panel_box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the cell of panel ``j`` of row ``i``."""
        x = self.pad + j * (self.cell + self.pad)
        y = self.row_top(i) + self.header_height + self.caption_height
        return x, y, x + self.cell, y + self.cell

    def header_box(self, i: int, n_cols: int) -> tuple[int, int, int, int]:
        y = self.row_top(i)
        return self.pad, y, self.width(n_cols) - self.pad, y + self.header_height


# --------------------------------------------------------------------------- rows


_TASK_TOKEN = re.compile(r"^\s*\[\[[^\]]*\]\]\s*")


def display_prompt(prompt: str) -> str:
    """The prompt without its leading task token (the header names the task already)."""
    return _TASK_TOKEN.sub("", str(prompt), count=1).strip()


def _numbered(name: str, n: int) -> list[str]:
    return [name] if n == 1 else [f"{name} {k + 1}" for k in range(n)]


def text2image_rows(prompts: Sequence[str], generated: Sequence[torch.Tensor]) -> list[Row]:
    """One row per prompt: the generated image [3, H, W]."""
    return [
        Row("text2image", display_prompt(p), [Panel(img, "generated")])
        for p, img in zip(prompts, generated, strict=True)
    ]


def conditional_row(
    task: str,
    prompt: str,
    pixels: torch.Tensor,
    cond_mask: torch.Tensor,
    generated: torch.Tensor,
    *,
    targets: bool = True,
) -> Row:
    """condition view(s) | generated view(s) | target view(s) of one sample: ``pixels`` and
    ``generated`` [V, 3, H, W], ``cond_mask`` [V] (True = condition). ``targets`` False:
    no ground truth to show (``onegen sample``)."""
    cond = [v for v in range(pixels.shape[0]) if bool(cond_mask[v])]
    gen = [v for v in range(pixels.shape[0]) if not bool(cond_mask[v])]
    panels: list[Panel] = []
    for name, source, views in (
        ("condition", pixels, cond),
        ("generated", generated, gen),
        ("target", pixels, gen if targets else []),
    ):
        for v, caption in zip(views, _numbered(name, len(views)), strict=True):
            panels.append(Panel(source[v], caption))
    return Row(task, display_prompt(prompt), panels)


def ray_pixels(rays: torch.Tensor) -> torch.Tensor:
    """A ray view [C >= 3, h, w] (Plücker ``[d, o x d]`` tiled every 6 channels, the latent
    form) -> [3, h, w] in [-1, 1]: the unit ray direction as RGB, so a reviewer sees at a
    glance where each camera looks (a uniform hue) and how wide (the spread across it)."""
    r = rays.detach().float().cpu()
    d = torch.stack([r[k::6].mean(0) for k in range(3)])
    return d / d.norm(dim=0, keepdim=True).clamp_min(1e-8)


def camera_pose_row(
    task: str,
    prompt: str,
    images: torch.Tensor,
    rays: torch.Tensor,
    target_rays: torch.Tensor | None = None,
) -> Row:
    """The given images [V, 3, H, W], then each estimated camera v >= 1 as its ray
    directions (``rays`` [V, C, h, w]; ray 0 is the given camera 0, ``CAMERA0``), then the true
    ones when ``target_rays`` are known."""
    panels = [Panel(images[v], f"image {v}") for v in range(images.shape[0])]
    panels += [Panel(ray_pixels(rays[v]), f"rays {v}") for v in range(1, rays.shape[0])]
    if target_rays is not None:
        panels += [
            Panel(ray_pixels(target_rays[v]), f"true rays {v}")
            for v in range(1, target_rays.shape[0])
        ]
    return Row(task, display_prompt(prompt), panels)


# --------------------------------------------------------------------------- drawing


def _fit_panel(pixels: torch.Tensor, cell: int) -> Image.Image:
    img = Image.fromarray(to_uint8(pixels))
    w, h = img.size
    scale = cell / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == img.size:
        return img
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return img.resize(size, resample)


def _wrap(text: str, font: Font, width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word wider than a line is broken between
    characters); past ``max_lines`` the last line ends in "..."."""

    def fits(s: str) -> bool:
        return font.getlength(s) <= width

    pieces: list[str] = []
    for word in text[:2000].split():
        while word and not fits(word):
            i = 1
            while i < len(word) and fits(word[: i + 1]):
                i += 1
            pieces.append(word[:i])
            word = word[i:]
        if word:
            pieces.append(word)
    lines: list[str] = []
    for piece in pieces:
        if lines and fits(f"{lines[-1]} {piece}"):
            lines[-1] = f"{lines[-1]} {piece}"
        elif len(lines) < max_lines + 1:
            lines.append(piece)
        else:
            break
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and not fits(last + ELLIPSIS):
            last = last[:-1]
        lines[-1] = last.rstrip() + ELLIPSIS
    return lines or [""]


def render_grid(rows: Sequence[Row], cell: int = 192, step: int | None = None) -> Image.Image:
    """The grid of ``rows`` as an RGB image of ``Layout(cell).size(len(rows), max panels)``."""
    if not rows:
        raise ValueError("a sample grid needs at least one row")
    lay = Layout(int(cell))
    n_cols = max(len(r.panels) for r in rows)
    canvas = Image.new("RGB", lay.size(len(rows), n_cols), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    title_h = _line_height(lay.title_font)
    prompt_h = _line_height(lay.prompt_font)
    for i, row in enumerate(rows):
        left, top, right, bottom = lay.header_box(i, n_cols)
        draw.rectangle((left, top, right - 1, bottom - 1), fill=BAND)
        text_w = right - left - 2 * lay.pad
        x, y = left + lay.pad, top + lay.pad
        title = row.task
        if step is not None:
            mark = f"step {step}"
            mark_w = lay.title_font.getlength(mark)
            draw.text((right - lay.pad - mark_w, y), mark, fill=CAPTION, font=lay.title_font)
            title = _wrap(title, lay.title_font, int(text_w - mark_w - 2 * lay.pad), 1)[0]
        else:
            title = _wrap(title, lay.title_font, text_w, 1)[0]
        draw.text((x, y), title, fill=TEXT, font=lay.title_font)
        for k, line in enumerate(
            _wrap(row.prompt or "(no prompt)", lay.prompt_font, text_w, PROMPT_LINES)
        ):
            draw.text((x, y + title_h + k * prompt_h), line, fill=TEXT, font=lay.prompt_font)
        for j, panel in enumerate(row.panels):
            pl, pt, pr, pb = lay.panel_box(i, j)
            caption = _wrap(panel.caption, lay.caption_font, lay.cell, 1)[0]
            cw = lay.caption_font.getlength(caption)
            draw.text(
                (pl + (lay.cell - cw) / 2, pt - lay.caption_height),
                caption,
                fill=CAPTION,
                font=lay.caption_font,
            )
            draw.rectangle((pl, pt, pr - 1, pb - 1), fill=BOX)
            img = _fit_panel(panel.pixels, lay.cell)
            canvas.paste(img, (pl + (lay.cell - img.width) // 2, pt + (lay.cell - img.height) // 2))
    return canvas


def save_grid_image(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
