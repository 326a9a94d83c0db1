"""Drawing of the synthetic demo people and cameras: appearance, scenes, rendering of one crop.

Every random choice comes from the generator passed in, so the same generator state draws the same pixels; the
layout, naming and streams of :mod:`dino_recog.data.demo` decide which generator draws what. A change to what is
drawn here changes the generated files: bump :data:`dino_recog.data.demo.DEMO_VERSION` with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Colour = tuple[int, int, int]

_RENDER_W, _RENDER_H = 128, 256  # drawn at 2x the Market crop and downsampled, which anti-aliases the shapes
MARKET_SIZE = (64, 128)
"""(W, H) of every labelled crop, as in Market-1501; blur is scaled relative to its height."""

# A small shared palette: many identities wear the same colours, so identity lies in the combination of parts.
_PALETTE: dict[str, Colour] = {
    "black": (28, 28, 32),
    "white": (232, 232, 226),
    "grey": (125, 125, 128),
    "navy": (32, 42, 92),
    "blue": (52, 100, 188),
    "red": (178, 36, 42),
    "green": (42, 118, 62),
    "yellow": (222, 192, 52),
    "brown": (108, 70, 42),
    "beige": (198, 178, 138),
    "pink": (224, 140, 168),
}
_TOP_W = {
    "black": 15,
    "white": 14,
    "grey": 12,
    "navy": 10,
    "blue": 12,
    "red": 8,
    "green": 7,
    "yellow": 5,
    "brown": 5,
    "beige": 6,
    "pink": 6,
}
_BOTTOM_W = {"black": 34, "blue": 24, "navy": 10, "grey": 12, "beige": 8, "brown": 6, "white": 3, "green": 3}
_SHOE_W = {"black": 40, "white": 30, "grey": 10, "brown": 12, "red": 4, "blue": 4}
_ACCESSORY_W = {
    "black": 30,
    "grey": 10,
    "navy": 10,
    "blue": 8,
    "red": 8,
    "brown": 10,
    "green": 6,
    "pink": 6,
    "yellow": 4,
    "beige": 8,
}
_SKIN: list[Colour] = [(242, 208, 180), (224, 180, 145), (196, 145, 105), (150, 100, 70), (100, 66, 46)]
_HAIR: dict[Colour, int] = {
    (20, 18, 18): 40,
    (62, 40, 26): 25,
    (120, 80, 45): 12,
    (205, 170, 100): 10,
    (160, 160, 160): 7,
    (150, 70, 35): 6,
}
_PATTERNS = {"plain": 40, "stripes": 15, "checks": 12, "logo": 18, "two_tone": 15}


def _pick(rng: np.random.Generator, weights: dict) -> object:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], np.float64)
    return keys[rng.choice(len(keys), p=p / p.sum())]


def _colour(rng: np.random.Generator, weights: dict[str, int], jitter: int = 10) -> Colour:
    # Real "blue" jackets differ in shade; a small per-identity jitter keeps that without widening the palette.
    base = np.array(_PALETTE[str(_pick(rng, weights))]) + rng.integers(-jitter, jitter + 1, 3)
    return tuple(int(v) for v in np.clip(base, 0, 255))  # type: ignore[return-value]


def _maybe(rng: np.random.Generator, p: float, weights: dict[str, int]) -> Colour | None:
    return _colour(rng, weights) if rng.random() < p else None


@dataclass(frozen=True)
class Person:
    """Fixed appearance of one identity; sizes are fractions of the person's height."""

    height: float
    shoulder: float
    hip: float
    head: float
    legs: float
    skin: Colour
    hair: Colour
    hair_style: str
    hat: str
    hat_colour: Colour
    top: Colour
    top2: Colour
    pattern: str
    period: float
    logo: str
    long_sleeves: bool
    bottom_kind: str
    bottom: Colour
    shoes: Colour
    backpack: Colour | None
    bag: Colour | None
    bag_side: int
    scarf: Colour | None


def make_person(rng: np.random.Generator) -> Person:
    """Draws the fixed appearance of one new identity from ``rng``."""
    top = _colour(rng, _TOP_W)
    top2 = top
    while max(abs(a - b) for a, b in zip(top, top2, strict=True)) < 60:  # a pattern must be visible
        top2 = _colour(rng, _TOP_W)
    return Person(
        height=rng.uniform(0.88, 1.0),
        shoulder=rng.uniform(0.13, 0.18),
        hip=rng.uniform(0.75, 0.95),
        head=rng.uniform(0.055, 0.072),
        legs=rng.uniform(0.44, 0.52),
        skin=_SKIN[rng.integers(len(_SKIN))],
        hair=_pick(rng, _HAIR),
        hair_style=str(_pick(rng, {"short": 45, "long": 25, "ponytail": 12, "bald": 8})),
        hat=str(_pick(rng, {"none": 75, "cap": 15, "beanie": 10})),
        hat_colour=_colour(rng, _ACCESSORY_W),
        top=top,
        top2=top2,
        pattern=str(_pick(rng, _PATTERNS)),
        period=rng.uniform(0.035, 0.055),
        logo=str(_pick(rng, {"circle": 1, "square": 1, "triangle": 1})),
        long_sleeves=bool(rng.random() < 0.5),
        bottom_kind=str(_pick(rng, {"trousers": 60, "shorts": 20, "skirt": 20})),
        bottom=_colour(rng, _BOTTOM_W),
        shoes=_colour(rng, _SHOE_W),
        backpack=_maybe(rng, 0.3, _ACCESSORY_W),
        bag=_maybe(rng, 0.25, _ACCESSORY_W),
        bag_side=int(rng.choice([-1, 1])),
        scarf=_maybe(rng, 0.15, _TOP_W),
    )


@dataclass(frozen=True)
class Camera:
    """One camera's scene and imaging conditions."""

    scene: np.ndarray  # background larger than the render canvas; each image crops a random window
    clutter: list[Colour]
    gain: np.ndarray  # per-channel colour cast
    brightness: float
    scale: float
    x_jitter: float
    blur: float
    noise: float
    occlusion: float
    back_prob: float  # cameras look along walkways, so most people pass them facing one way


def _muted(rng: np.random.Generator) -> Colour:
    return tuple(int(v) for v in rng.integers(80, 180) + rng.integers(-15, 16, 3))  # type: ignore[return-value]


def make_camera(rng: np.random.Generator) -> Camera:
    """Draws one camera from ``rng``: a street scene wider than a crop, its clutter colours and imaging response."""
    w, h = 8 * _RENDER_W, _RENDER_H + _RENDER_H // 4
    # Scene clutter also uses clothing colours, so background pixels pollute colour statistics as in real footage.
    clutter = [_muted(rng) for _ in range(6)] + [_colour(rng, _TOP_W, 25) for _ in range(4)]
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    # A camera sees several facades along its street, so crops of one camera do not all share one background.
    edges = np.sort(rng.uniform(0, w, int(rng.integers(3, 6)))).tolist()
    for x0, x1 in zip([0.0, *edges], [*edges, w], strict=True):
        horizon = h * rng.uniform(0.5, 0.75)
        draw.rectangle([x0, 0, x1, horizon], fill=_muted(rng))
        draw.rectangle([x0, horizon, x1, h], fill=_muted(rng))
    for _ in range(rng.integers(100, 160)):  # shop fronts, doors, posters, bins
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        colour = clutter[rng.integers(len(clutter))] if rng.random() < 0.3 else _muted(rng)
        draw.rectangle([x0, y0, x0 + rng.uniform(6, 60), y0 + rng.uniform(6, 100)], fill=colour)
    for _ in range(rng.integers(2, 6)):  # railings, kerbs, lane markings
        y0 = rng.uniform(0, h)
        draw.line(
            [(0, y0), (w, y0 + rng.uniform(-40, 40))],
            fill=clutter[rng.integers(len(clutter))],
            width=int(rng.integers(2, 7)),
        )
    # Casts stay mild: at +-20% per channel a colour histogram matches images by camera, not by person (rank-1 ~3%),
    # while at these strengths it reaches roughly 30-50% and a small CNN over 85%.
    return Camera(
        scene=np.asarray(img),
        clutter=clutter,
        gain=rng.uniform(0.97, 1.03, 3).astype(np.float32),
        brightness=rng.uniform(0.92, 1.06),
        scale=rng.uniform(0.89, 1.0),
        x_jitter=rng.uniform(0.02, 0.07),
        blur=rng.uniform(0.0, 1.0),
        noise=rng.uniform(2.0, 5.0),
        occlusion=rng.uniform(0.05, 0.35),
        back_prob=rng.uniform(0.15, 0.85),
    )


def _lerp(a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
    return a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t


def _limb(
    draw: ImageDraw.ImageDraw, quad: list[tuple[float, float]], split: float, upper: Colour, lower: Colour
) -> None:
    """Draws a limb quad (top-left, top-right, bottom-right, bottom-left) in two colours split at ``split``."""
    mid_r, mid_l = _lerp(quad[1], quad[2], split), _lerp(quad[0], quad[3], split)
    draw.polygon([quad[0], quad[1], mid_r, mid_l], fill=upper)
    draw.polygon([mid_l, mid_r, quad[2], quad[3]], fill=lower)


def _draw_person(
    draw: ImageDraw.ImageDraw, p: Person, cx: float, foot: float, ph: float, back: bool, rng: np.random.Generator
) -> None:
    stride, swing = rng.uniform(-0.07, 0.07) * ph, rng.uniform(-0.06, 0.06) * ph  # walking pose
    hr, sh = p.head * ph, p.shoulder * ph
    hh = sh * p.hip
    hy, sy, hip_y = foot - ph + hr, foot - ph + 2.15 * hr, foot - p.legs * ph
    waist, shoe_h = hip_y + 0.04 * ph, 0.035 * ph

    for side, dx in ((-1, stride), (1, -stride)):
        xo, xi, bottom = cx + side * 0.92 * hh, cx + side * 0.1 * hh, foot - shoe_h
        quad = [(xo, hip_y), (xi, hip_y), (xi + dx - side * 0.1 * hh, bottom), (xo + dx + side * 0.1 * hh, bottom)]
        split = {"trousers": 1.0, "shorts": 0.4, "skirt": 0.0}[p.bottom_kind]
        _limb(draw, quad, split, p.bottom, p.skin)
        fx = (quad[2][0] + quad[3][0]) / 2
        draw.ellipse([fx - 0.5 * hh, bottom - shoe_h, fx + 0.5 * hh, foot], fill=p.shoes)
    if p.bottom_kind == "skirt":
        y1 = hip_y + 0.5 * p.legs * ph
        draw.polygon([(cx - hh, hip_y), (cx + hh, hip_y), (cx + 1.5 * hh, y1), (cx - 1.5 * hh, y1)], fill=p.bottom)

    draw.polygon([(cx - sh, sy), (cx + sh, sy), (cx + 1.05 * hh, waist), (cx - 1.05 * hh, waist)], fill=p.top)

    def half(y: float) -> float:  # torso half-width at height y
        return sh + (1.05 * hh - sh) * (y - sy) / (waist - sy)

    period = p.period * ph
    if p.pattern in ("stripes", "checks"):
        for y in np.arange(sy + period / 2, waist, period):
            draw.line([(cx - half(y), y), (cx + half(y), y)], fill=p.top2, width=max(2, round(period * 0.4)))
    if p.pattern == "checks":
        inner = min(sh, hh)
        for x in np.arange(cx - inner + period / 2, cx + inner, period):
            draw.line([(x, sy), (x, waist)], fill=p.top2, width=max(2, round(period * 0.3)))
    if p.pattern == "two_tone":
        y1 = sy + 0.45 * (waist - sy)
        draw.polygon([(cx - sh, sy), (cx + sh, sy), (cx + half(y1), y1), (cx - half(y1), y1)], fill=p.top2)
    if p.pattern == "logo" and not back:
        lx, ly, r = cx, sy + 0.3 * (waist - sy), 0.035 * ph
        box = [lx - r, ly - r, lx + r, ly + r]
        if p.logo == "circle":
            draw.ellipse(box, fill=p.top2)
        elif p.logo == "square":
            draw.rectangle(box, fill=p.top2)
        else:
            draw.polygon([(lx, ly - r), (lx + r, ly + r), (lx - r, ly + r)], fill=p.top2)

    if p.backpack is not None:
        if back:
            draw.rounded_rectangle(
                [cx - 0.75 * sh, sy + 0.03 * ph, cx + 0.75 * sh, sy + 0.26 * ph], radius=0.03 * ph, fill=p.backpack
            )
        else:
            for side in (-1, 1):
                draw.line(
                    [(cx + side * 0.6 * sh, sy), (cx + side * 0.55 * sh, sy + 0.2 * ph)],
                    fill=p.backpack,
                    width=max(2, round(0.025 * ph)),
                )
    if p.bag is not None:
        side = -p.bag_side if back else p.bag_side  # the bag hangs from the same shoulder whichever way one faces
        bx = cx + side * (sh + 0.02 * ph)
        draw.line([(cx - side * 0.8 * sh, sy), (bx, hip_y - 0.05 * ph)], fill=p.bag, width=max(2, round(0.015 * ph)))
        draw.rectangle([bx - 0.06 * ph, hip_y - 0.05 * ph, bx + 0.06 * ph, hip_y + 0.07 * ph], fill=p.bag)

    arm_w, arm_len = 0.05 * ph, 0.38 * ph
    for side, dx in ((-1, swing), (1, -swing)):
        x0 = cx + side * (sh - arm_w / 2)
        x1 = x0 + dx + side * 0.02 * ph
        quad = [
            (x0 - arm_w / 2, sy),
            (x0 + arm_w / 2, sy),
            (x1 + 0.4 * arm_w, sy + arm_len),
            (x1 - 0.4 * arm_w, sy + arm_len),
        ]
        _limb(draw, quad, 0.9 if p.long_sleeves else 0.35, p.top, p.skin)
        draw.ellipse(
            [x1 - 0.5 * arm_w, sy + arm_len - 0.4 * arm_w, x1 + 0.5 * arm_w, sy + arm_len + 0.6 * arm_w], fill=p.skin
        )

    if p.scarf is not None:
        draw.rectangle([cx - 0.7 * sh, sy - 0.01 * ph, cx + 0.7 * sh, sy + 0.04 * ph], fill=p.scarf)
        if not back:
            draw.rectangle([cx + 0.1 * sh, sy, cx + 0.35 * sh, sy + 0.18 * ph], fill=p.scarf)
    if p.hair_style == "long":
        draw.rectangle([cx - 1.0 * hr, hy, cx + 1.0 * hr, sy + 0.08 * ph], fill=p.hair)
    draw.rectangle([cx - 0.3 * hr, hy + 0.8 * hr, cx + 0.3 * hr, sy + 1], fill=p.skin)  # neck
    head = [cx - 0.85 * hr, hy - hr, cx + 0.85 * hr, hy + hr]
    draw.ellipse(head, fill=p.skin)
    if p.hair_style != "bald":
        if back:
            draw.ellipse(head, fill=p.hair)
        else:
            draw.chord([head[0] - 1, head[1] - 1, head[2] + 1, head[3]], 180, 360, fill=p.hair)
        if p.hair_style == "ponytail":
            draw.ellipse(
                [cx - 0.35 * hr, hy + 0.5 * hr, cx + 0.35 * hr, hy + 1.6 * hr]
                if back
                else [cx + 0.6 * hr, hy - 0.4 * hr, cx + 1.2 * hr, hy + 0.5 * hr],
                fill=p.hair,
            )
    if p.hat == "cap":
        draw.chord([head[0] - 1, head[1] - 2, head[2] + 1, head[3] - 0.6 * hr], 180, 360, fill=p.hat_colour)
        if not back:
            draw.rectangle([cx - 1.1 * hr, hy - 0.45 * hr, cx + 1.1 * hr, hy - 0.3 * hr], fill=p.hat_colour)
    elif p.hat == "beanie":
        draw.chord([head[0] - 1, head[1] - 2, head[2] + 1, head[3]], 170, 370, fill=p.hat_colour)


def render(
    cam: Camera, rng: np.random.Generator, size: tuple[int, int], person: Person | None, back: bool, zoom: float = 1.0
) -> Image.Image:
    """Renders one crop of ``size`` (W, H): scene window, person (if any), occluder, camera response and noise."""
    sh, sw = cam.scene.shape[:2]
    y0, x0 = rng.integers(0, sh - _RENDER_H + 1), rng.integers(0, sw - _RENDER_W + 1)
    img = Image.fromarray(cam.scene[y0 : y0 + _RENDER_H, x0 : x0 + _RENDER_W].copy())
    draw = ImageDraw.Draw(img)
    if person is not None:
        foot = _RENDER_H * rng.uniform(0.93, 0.99)
        ph = _RENDER_H * cam.scale * person.height * rng.uniform(0.96, 1.04)
        cx = _RENDER_W * (0.5 + rng.normal(0.0, cam.x_jitter))
        if zoom > 1.0:  # junk: a bad detection that shows only an enlarged fragment of a person
            ph *= zoom
            foot = _RENDER_H * rng.uniform(1.0, zoom)
            cx = _RENDER_W * rng.uniform(-0.3, 1.3)
        else:
            ph = min(ph, foot + 0.02 * _RENDER_H)  # keep the head in the crop
        _draw_person(draw, person, cx, foot, ph, back, rng)
    if rng.random() < cam.occlusion:
        colour = cam.clutter[rng.integers(len(cam.clutter))]
        if rng.random() < 0.5:  # pole or sign post
            x = rng.uniform(0.1, 0.9) * _RENDER_W
            draw.rectangle([x, 0, x + rng.uniform(0.07, 0.15) * _RENDER_W, _RENDER_H], fill=colour)
        else:  # parked car, bench or another pedestrian's body in front
            x = rng.uniform(-0.5, 0.5) * _RENDER_W
            draw.rectangle(
                [x, _RENDER_H * rng.uniform(0.55, 0.8), x + rng.uniform(0.6, 1.2) * _RENDER_W, _RENDER_H], fill=colour
            )
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.resize(size, Image.Resampling.BILINEAR)
    sigma = (cam.blur + rng.uniform(0.0, 0.3)) * size[1] / MARKET_SIZE[1]
    if sigma > 0.2:
        img = img.filter(ImageFilter.GaussianBlur(sigma))
    arr = np.asarray(img, np.float32) * (cam.gain * cam.brightness * rng.uniform(0.92, 1.08))
    arr += cam.noise * rng.standard_normal(arr.shape, dtype=np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
