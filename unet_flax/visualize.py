"""Pictures for people: sample grids and the loss curve, drawn with Pillow."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def save_grid(images: np.ndarray, path: str | Path, columns: int | None = None, scale: int = 4,
              padding: int = 2) -> None:
    """uint8 NHWC images -> one PNG, `columns` wide, each image enlarged `scale` times (nearest)."""
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    cell_h, cell_w = height * scale + padding, width * scale + padding
    grid = np.full((rows * cell_h + padding, columns * cell_w + padding, channels), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        big = image.repeat(scale, axis=0).repeat(scale, axis=1)
        grid[padding + r * cell_h:padding + r * cell_h + height * scale,
             padding + c * cell_w:padding + c * cell_w + width * scale] = big
    Image.fromarray(grid.squeeze(-1) if channels == 1 else grid).save(path)


def save_loss_curve(steps: list[int], losses: list[float], path: str | Path, size=(640, 360)) -> None:
    """A line plot of loss against step (log scale), with the axis ranges written on it."""
    width, height, margin = size[0], size[1], 48
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    if len(steps) >= 2:
        logs = np.log10(np.maximum(np.asarray(losses, np.float64), 1e-12))
        lo, hi = float(logs.min()), float(logs.max()) + 1e-9
        xs = margin + (np.asarray(steps) - steps[0]) / max(steps[-1] - steps[0], 1) * (width - 2 * margin)
        ys = height - margin - (logs - lo) / (hi - lo) * (height - 2 * margin)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(31, 119, 180), width=2)
        draw.text((4, margin - 12), f"loss {10 ** hi:.4g}", fill="black")
        draw.text((4, height - margin), f"loss {10 ** lo:.4g} (log scale)", fill="black")
        draw.text((margin, height - 16), f"step {steps[0]}", fill="black")
        draw.text((width - margin - 60, height - 16), f"step {steps[-1]}", fill="black")
    draw.rectangle([margin, margin, width - margin, height - margin], outline="gray")
    image.save(path)


def save_bar_chart(groups: list[tuple[str, list[tuple[str, float]]]], path: str | Path, unit: str,
                   bar_width: int = 420) -> None:
    """Horizontal bars, one titled group each: [(title, [(label, value), ...]), ...]; each group is
    scaled to its own largest value, which sets the bar width, and every bar is labelled with its value."""
    label_width, row, margin = 190, 22, 12
    height = margin + sum(row * (len(bars) + 1) + margin for _, bars in groups)
    image = Image.new("RGB", (label_width + bar_width + 120, height), "white")
    draw = ImageDraw.Draw(image)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    y = margin
    for title, bars in groups:
        draw.text((margin, y + 4), title, fill="black")
        y += row
        top = max(value for _, value in bars) or 1.0
        for i, (label, value) in enumerate(bars):
            length = int(bar_width * value / top)
            draw.text((margin + 8, y + 4), label, fill="black")
            draw.rectangle([label_width, y + 2, label_width + max(length, 1), y + row - 4], fill=palette[i % len(palette)])
            draw.text((label_width + length + 6, y + 4), f"{value:.1f} {unit}", fill="black")
            y += row
        y += margin
    image.save(path)
