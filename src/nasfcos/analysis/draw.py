"""Draw labelled detections on an image (used by ``nasfcos predict`` and the report's example figure)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

__all__ = ["draw_detections", "class_colour"]

_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)


def class_colour(label: int) -> tuple[int, int, int]:
    """A stable, distinguishable colour per class index."""
    return _PALETTE[int(label) % len(_PALETTE)]


def draw_detections(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[int],
    scores: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    *,
    min_score: float = 0.3,
    width: int = 2,
) -> Image.Image:
    """A copy of ``image`` with xyxy ``boxes`` outlined and captioned ``"name 0.87"``; low scores are skipped."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    for index, box in enumerate(boxes):
        score = None if scores is None else float(scores[index])
        if score is not None and score < min_score:
            continue
        label = int(labels[index])
        colour = class_colour(label)
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        name = class_names[label] if class_names is not None and label < len(class_names) else str(label)
        caption = name if score is None else f"{name} {score:.2f}"
        text_box = draw.textbbox((x0, y0), caption)
        text_h = text_box[3] - text_box[1]
        top = y0 - text_h - 2 if y0 - text_h - 2 >= 0 else y0
        draw.rectangle((x0, top, x0 + (text_box[2] - text_box[0]) + 4, top + text_h + 2), fill=colour)
        draw.text((x0 + 2, top), caption, fill=(0, 0, 0))
    return canvas
