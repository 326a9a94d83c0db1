"""Pillow helpers shared by the picture commands: labelled panels laid out on a grid with exact pixel sizes.

Grids are drawn with Pillow rather than matplotlib so that every panel has a known pixel size and position: the tests
can check a border colour at a computed coordinate, and pictures stay small PNGs.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["BACKGROUND", "GAP", "LABEL_H", "SWATCH", "font", "grid", "labelled", "legend", "save_png"]

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
GAP = 4  # pixels between panels
LABEL_H = 14  # pixels of each line of the text strip above a panel
SWATCH = 10  # pixels of a legend's colour square


@lru_cache(maxsize=1)
def font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at 11 px (its bitmap font where Pillow was built without FreeType)."""
    try:
        return ImageFont.load_default(size=11)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def labelled(panel: Image.Image, text: str | Sequence[str], color: tuple[int, int, int] = TEXT) -> Image.Image:
    """`panel` under a strip of LABEL_H pixels per line of `text` (a string is one line), each cut to the panel's
    width."""
    lines = [text] if isinstance(text, str) else list(text)
    out = Image.new("RGB", (panel.width, panel.height + LABEL_H * len(lines)), BACKGROUND)
    out.paste(panel, (0, LABEL_H * len(lines)))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        while line and draw.textlength(line, font=font()) > panel.width:
            line = line[:-1]
        draw.text((1, 1 + LABEL_H * i), line, fill=color, font=font())
    return out


def legend(items: Sequence[tuple[tuple[int, int, int], str]], width: int) -> Image.Image:
    """A key of colours: a SWATCH-pixel square and its text per item, left to right, wrapped to lines of LABEL_H
    pixels at `width` (an item wider than `width` gets a line of its own)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sizes = [SWATCH + 4 + round(draw.textlength(text, font=font())) for _, text in items]  # swatch, 4 px, text
    places, x, y = [], 0, 0
    for w in sizes:
        if x and x + w > width:
            x, y = 0, y + LABEL_H
        places.append((x, y))
        x += w + 3 * GAP
    out = Image.new("RGB", (max([width, *sizes]), y + LABEL_H), BACKGROUND)
    draw = ImageDraw.Draw(out)
    top = (LABEL_H - SWATCH) // 2
    for (color, text), (x, y) in zip(items, places):
        draw.rectangle((x, y + top, x + SWATCH - 1, y + top + SWATCH - 1), fill=color)
        draw.text((x + SWATCH + 4, y + 1), text, fill=TEXT, font=font())
    return out


def grid(rows: Sequence[Sequence[Image.Image | None]], gap: int = GAP) -> tuple[Image.Image, list[list[tuple]]]:
    """Paste rows of panels left-aligned, `gap` pixels apart; a None entry adds one more gap (a separator).

    Panels are placed one after another, so rows may differ in width (the picture is as wide as the widest row) and
    a row is as high as its tallest panel.

    Returns:
        The picture and, for each row, the (x0, y0, x1, y1) box of each pasted panel (None for the gaps).
    """
    widths = [sum(p.width if p is not None else 0 for p in row) + gap * max(len(row) - 1, 0) for row in rows]
    heights = [max((p.height for p in row if p is not None), default=0) for row in rows]
    canvas = Image.new("RGB", (max(widths, default=1), sum(heights) + gap * max(len(rows) - 1, 0)), BACKGROUND)
    boxes, y = [], 0
    for row, h in zip(rows, heights):
        x, row_boxes = 0, []
        for p in row:
            if p is None:
                row_boxes.append(None)
                x += gap
                continue
            canvas.paste(p, (x, y))
            row_boxes.append((x, y, x + p.width, y + p.height))
            x += p.width + gap
        boxes.append(row_boxes)
        y += h + gap
    return canvas, boxes


def save_png(img: Image.Image, path: str | Path) -> Path:
    """Save as a 256-colour palette PNG: about a third of the size of an RGB one, and these pictures live in git."""
    img.quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    return Path(path)
