"""A labelled sample grid: a column per prompt, a band of rows per model, prompts on top.

    <run settings; the models' full names>
    a red circle on ...   a blue square on ...   ...
    baseline
    [img]                 [img]                  ...
    trained
    [img]                 [img]                  ...

Before and after sit in the same column, one above the other, so each prompt's change is a glance
down its column, and a dozen prompts still fit a screen's width. Images are upscaled with
nearest-neighbour to at least `min_cell` pixels, so 32 px samples stay visible and unblurred.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from sdflow.store.stageio import write_atomic

MARGIN = 8  # around the whole grid
GAP = 4  # between cells
BLOCK_GAP = 12  # between the models' bands
FONT_SIZE = 11
CAPTION_LINES = 4  # at most, above each column
MIN_WIDTH = 360  # room for the title when there are few prompts
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


@dataclass
class Block:
    """One model's samples: `images[i][j]` is image j of prompt i."""

    label: str
    images: Sequence[Sequence[Image.Image]]


@dataclass
class Layout:
    """Pixel geometry of a grid, computed once and used for both sizing and drawing."""

    cell: int
    prompts: int  # columns
    per_prompt: int  # rows in each model's band
    blocks: int
    line: int  # text line height
    title_lines: int
    caption_lines: int

    @property
    def captions_y(self) -> int:
        return MARGIN + self.title_lines * self.line + GAP

    @property
    def bands_y(self) -> int:
        return self.captions_y + self.caption_lines * self.line + GAP

    @property
    def band_height(self) -> int:
        return self.line + self.per_prompt * (self.cell + GAP)

    @property
    def size(self) -> tuple[int, int]:
        width = 2 * MARGIN + self.prompts * self.cell + (self.prompts - 1) * GAP
        height = self.bands_y + self.blocks * (self.band_height + BLOCK_GAP) + MARGIN
        return max(width, MIN_WIDTH), height

    def band_y(self, block: int) -> int:
        return self.bands_y + block * (self.band_height + BLOCK_GAP)

    def origin(self, block: int, prompt: int, image: int) -> tuple[int, int]:
        x = MARGIN + prompt * (self.cell + GAP)
        return x, self.band_y(block) + self.line + image * (self.cell + GAP)


def render_grid(
    prompts: Sequence[str], blocks: Sequence[Block], title: Sequence[str], min_cell: int = 96
) -> Image.Image:
    """Draw the grid; every block must hold len(prompts) rows of the same number of images.

    `title` lines (run settings, the models' full names) are wrapped to the grid's width.
    """
    if not prompts or not blocks:
        raise ValueError("a grid needs at least one prompt and one block")
    per_prompt = len(blocks[0].images[0])
    for block in blocks:
        if len(block.images) != len(prompts) or any(len(r) != per_prompt for r in block.images):
            raise ValueError(
                f"block {block.label!r} does not have {len(prompts)}x{per_prompt} images"
            )
    font = ImageFont.load_default(size=FONT_SIZE)
    side = max(blocks[0].images[0][0].size)
    cell = side * max(1, math.ceil(min_cell / side))  # whole-number scale: crisp nearest upscaling
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = _line_height(probe, font)
    captions = [wrap_text(probe, p, font, cell, max_lines=CAPTION_LINES) for p in prompts]
    caption_lines = max(len(c) for c in captions)
    shape = (cell, len(prompts), per_prompt, len(blocks), line)
    width = Layout(*shape, 0, caption_lines).size[0]
    title_lines = [
        part for text in title for part in wrap_text(probe, text, font, width - 2 * MARGIN, 3)
    ]
    layout = Layout(*shape, len(title_lines), caption_lines)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(title_lines):
        draw.text((MARGIN, MARGIN + k * line), text, fill=INK, font=font)
    for i, lines in enumerate(captions):
        x, _ = layout.origin(0, i, 0)
        for k, text in enumerate(lines):
            draw.text((x, layout.captions_y + k * line), text, fill=INK, font=font)
    for b, block in enumerate(blocks):
        _draw_block(canvas, draw, font, layout, b, block)
    return canvas


def _draw_block(canvas, draw, font, layout: Layout, b: int, block: Block) -> None:
    draw.text((MARGIN, layout.band_y(b)), block.label, fill=INK, font=font)
    for i, images in enumerate(block.images):
        for j, image in enumerate(images):
            cell_image = image.convert("RGB").resize(
                (layout.cell, layout.cell), Image.Resampling.NEAREST
            )
            canvas.paste(cell_image, layout.origin(b, i, j))


def _line_height(draw: ImageDraw.ImageDraw, font) -> int:
    left, top, right, bottom = draw.textbbox((0, 0), "Ag|y", font=font)
    return bottom - top + 3


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; the last kept line ends in an ellipsis when cut."""
    lines: list[str] = []
    current = ""
    for word in text.split() or [""]:
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    lines.append(current)
    lines = [_fit(draw, line, font, width) for line in lines]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(draw, lines[-1] + "…", font, width, force_ellipsis=True)
    return lines


def _fit(draw, text: str, font, width: int, force_ellipsis: bool = False) -> str:
    """Cut one line to `width` pixels (a single long word can be wider than a cell)."""
    if draw.textlength(text, font=font) <= width and not force_ellipsis:
        return text
    body = text.rstrip("…")
    while body and draw.textlength(body + "…", font=font) > width:
        body = body[:-1]
    return body + "…"


def save_png(image: Image.Image, path) -> None:
    """Atomic PNG write (temp + rename), as every file in a stage directory."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())
