"""Reads a 64x64 shapes image with plain image analysis (no learned model): background colour, shape colour,
shape kind (the trained shapes, and `train.shapes.spec.NEW_SHAPES` for fine-tunes), size and position, in the
vocabulary of `train.shapes.spec`."""

from __future__ import annotations

import numpy as np

from train.shapes.spec import COLORS, IMAGE_SIZE

PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
NAMES = list(COLORS)
MIN_SHAPE_PIXELS = 12
LARGE_EXTENT = 23.0
"""Bounding-box side (px) between the small (16 +- 2) and large (30 +- 2) nominal widths."""
STAR_FILL_BELOW = 0.5
"""Share of its bounding box a shape covers, below which it is a star (drawn: 0.36-0.43; a circle 0.72-0.82, a
triangle 0.52-0.57 but told apart first by its top half)."""
CORNER = 0.25
"""Side of the bounding box's corner squares, as a share of its shorter side."""
CROSS_CORNERS_BELOW = 0.08
"""Mean share of the four corner squares a shape covers, below which it is a cross (drawn: 0.00; a circle
0.16-0.44; a star covers as little but is told apart first by its fill)."""
BAR_ASPECT_BELOW = 0.7
"""Width / height of the bounding box below which a shape is an (upright) bar (drawn: 0.36-0.44; the other shapes
0.93-1.17)."""
LEFT_BELOW, RIGHT_ABOVE = 24.5, 39.5
"""Centroid x thresholds halfway between the left (17), centre (32) and right (47) columns."""


def nearest_color(rgb: np.ndarray) -> str:
    return NAMES[int(np.argmin(np.linalg.norm(PALETTE - rgb, axis=1)))]


def read(image: np.ndarray) -> dict[str, str | None]:
    """uint8 [H, W, 3] (64x64 expected) -> {background, color, shape, size, position}; None where unreadable."""
    if image.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}; the checker reads {IMAGE_SIZE}x{IMAGE_SIZE}")
    px = image[..., :3].astype(np.float64)
    border = np.concatenate([px[:2].reshape(-1, 3), px[-2:].reshape(-1, 3), px[:, :2].reshape(-1, 3),
                             px[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    out: dict[str, str | None] = {"background": nearest_color(bg), "color": None, "shape": None, "size": None,
                                  "position": None}
    dist = np.linalg.norm(px - bg, axis=-1)
    if (dist > 40).sum() < MIN_SHAPE_PIXELS:
        return out
    core = dist > 0.7 * dist.max()
    fg = np.median(px[core], axis=0)
    out["color"] = nearest_color(fg)
    # how far each pixel is from background toward the shape colour: 0 background, 1 shape
    axis = fg - bg
    alpha = np.clip(((px - bg) @ axis) / max(axis @ axis, 1e-6), 0.0, 1.0)
    mask = alpha > 0.5
    if mask.sum() < MIN_SHAPE_PIXELS:
        return out
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = y1 - y0 + 1, x1 - x0 + 1
    extent = (h + w) / 2
    out["size"] = "large" if extent >= LARGE_EXTENT else "small"
    cx = xs.mean()
    out["position"] = "left" if cx < LEFT_BELOW else "right" if cx > RIGHT_ABOVE else "centre"
    fill = mask.sum() / (h * w)
    top_share = (ys < (y0 + y1) / 2).sum() / len(ys)
    c = max(1, int(round(CORNER * min(h, w))))
    corners = np.mean([mask[y0:y0 + c, x0:x0 + c].mean(), mask[y0:y0 + c, x1 + 1 - c:x1 + 1].mean(),
                       mask[y1 + 1 - c:y1 + 1, x0:x0 + c].mean(), mask[y1 + 1 - c:y1 + 1, x1 + 1 - c:x1 + 1].mean()])
    if w / h < BAR_ASPECT_BELOW:
        out["shape"] = "bar"
    elif alpha[int(round((y0 + y1) / 2)), int(round((x0 + x1) / 2))] < 0.5:  # the middle is background
        out["shape"] = "ring"
    elif top_share < 0.37:  # a triangle holds a quarter of its area in its top half; circles and squares half
        out["shape"] = "triangle"
    elif fill < STAR_FILL_BELOW:
        out["shape"] = "star"
    elif corners < CROSS_CORNERS_BELOW:
        out["shape"] = "cross"
    else:
        out["shape"] = "square" if fill > 0.89 else "circle"
    return out
