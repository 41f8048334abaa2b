"""Pictures for people: sample grids, line and bar charts (the loss curve, benchmarks), drawn with Pillow."""
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
    save_line_chart({"loss": (steps, losses)}, path, "step", "loss", log_y=True, size=size)


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def save_line_chart(series: dict[str, tuple[list[float], list[float]]], path: str | Path, x_name: str, y_name: str,
                    log_x: bool = False, log_y: bool = False, size=(640, 360)) -> None:
    """Lines (a dot on each point) of y against x, one per named series, colour-keyed on the right when
    there are several; the axis ranges written on the axes."""
    legend = 170 if len(series) > 1 else 0
    width, height, margin = size[0] + legend, size[1], 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    scale = lambda values, log: np.log10(np.maximum(np.asarray(values, np.float64), 1e-12)) if log else \
        np.asarray(values, np.float64)  # noqa: E731
    xs_all = np.concatenate([scale(xs, log_x) for xs, _ in series.values()])
    ys_all = np.concatenate([scale(ys, log_y) for _, ys in series.values()])
    if len(xs_all) >= 2:
        (x_lo, x_hi), (y_lo, y_hi) = (xs_all.min(), xs_all.max() + 1e-9), (ys_all.min(), ys_all.max() + 1e-9)
        right = width - legend - margin
        for i, (name, (xs, ys)) in enumerate(series.items()):
            colour = PALETTE[i % len(PALETTE)]
            px = margin + (scale(xs, log_x) - x_lo) / (x_hi - x_lo) * (right - margin)
            py = height - margin - (scale(ys, log_y) - y_lo) / (y_hi - y_lo) * (height - 2 * margin)
            points = list(zip(px.tolist(), py.tolist()))
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            if legend:
                draw.text((right + 16, margin + 14 * i), name, fill=colour)
        shown = lambda value, log: f"{10 ** value if log else value:.4g}"  # noqa: E731
        log_note = lambda log: " (log scale)" if log else ""  # noqa: E731
        draw.text((4, margin - 12), f"{y_name} {shown(y_hi, log_y)}", fill="black")
        draw.text((4, height - margin), f"{y_name} {shown(y_lo, log_y)}{log_note(log_y)}", fill="black")
        draw.text((margin, height - 16), f"{x_name} {shown(x_lo, log_x)}{log_note(log_x)}", fill="black")
        draw.text((right - 60, height - 16), f"{x_name} {shown(x_hi, log_x)}", fill="black")
        draw.rectangle([margin, margin, right, height - margin], outline="gray")
    image.save(path)


def save_bar_chart(groups: list[tuple[str, list[tuple[str, float]]]], path: str | Path, unit: str,
                   bar_width: int = 420) -> None:
    """Horizontal bars, one titled group each: [(title, [(label, value), ...]), ...]; each group is
    scaled to its own largest value, which sets the bar width, and every bar is labelled with its value."""
    label_width, row, margin = 190, 22, 12
    height = margin + sum(row * (len(bars) + 1) + margin for _, bars in groups)
    image = Image.new("RGB", (label_width + bar_width + 120, height), "white")
    draw = ImageDraw.Draw(image)
    y = margin
    for title, bars in groups:
        draw.text((margin, y + 4), title, fill="black")
        y += row
        top = max(value for _, value in bars) or 1.0
        for i, (label, value) in enumerate(bars):
            length = int(bar_width * value / top)
            draw.text((margin + 8, y + 4), label, fill="black")
            draw.rectangle([label_width, y + 2, label_width + max(length, 1), y + row - 4],
                           fill=PALETTE[i % len(PALETTE)])
            draw.text((label_width + length + 6, y + 4), f"{value:.1f} {unit}", fill="black")
            y += row
        y += margin
    image.save(path)
