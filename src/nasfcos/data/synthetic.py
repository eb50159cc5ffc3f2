"""The built-in synthetic detection set: coloured shapes on cluttered backgrounds, generated from a seed.

Why: the demo, the tests and the benchmarks need a dataset that ships with the code (nothing is downloaded),
that a CPU can learn in minutes at 256 px, and on which a better decoder scores measurably higher. So the set
is deliberately not trivial:

- **Classes** (up to 6, in this order): ``disc`` (filled ellipse), ``rectangle``, ``triangle``, ``cross``
  (plus sign), ``ring`` (ellipse with a hole showing the background), ``star`` (5 points). Every object gets a
  random aspect ratio (0.6-1.6) and rotation. Each class has a preferred hue (60 degrees apart) but the hue
  of each object is drawn around it with a 30-degree standard deviation and random saturation/brightness, so
  colour alone does not separate classes; shape does, and at 8 px (where a ring looks like a disc and a
  star like a blob) only barely.
- **Sizes**: the longer side of every object's box is log-uniform in ``size_range`` (default 8 to 200 px at
  256 px, i.e. ``min(H, W) / 32`` to ``0.78 * min(H, W)``), so every octave of scale gets the same share of
  objects. FCOS assigns a location to a level by ``max(l, t, r, b)``, which lies between half the longer
  side (at the centre) and the longer side (at an edge). The paper's ranges (0-64-128-256-512-inf at an
  800-px short side) scaled to a 256-px image are 0-20-41-82-164-inf, so these objects give positives on P3
  through P6 at the native resolution (P7, covering > 64 % of the image, gets almost none: as on COCO); when
  the images are resized to 800 px, the same objects (25 to 625 px) span all five levels.
- **Clutter**: a smooth random background, sometimes a sinusoidal grating, soft blurred blobs, sharp
  irregular polygons that are not objects (hard negatives) and random lines (some drawn over objects), then
  per-pixel noise on everything.
- **Occlusion**: objects are drawn in random order, later ones occluding earlier ones. An object with less
  than ``1 - max_occlusion`` (default 30 %) of its pixels left visible is dropped from the annotations; the
  others keep the box of their *full* shape (the amodal box, as COCO and VOC annotators draw it), not of the
  visible part. Lines drawn over objects do not count as occlusion. Every object lies fully inside the image.

Determinism: image ``i`` of a split is drawn from ``SeedSequence([seed, split, i])`` alone, so the same seed
gives byte-identical JSON and pixel-identical (and, with the same Pillow/zlib, byte-identical) PNGs, and
image ``i`` does not depend on how many images are generated. Layout::

    out_dir/annotations/{train,val}.json   COCO, "info" records every generation parameter
    out_dir/images/{train,val}/000001.png  ...
    out_dir/manifest.json                  written last; :func:`ensure_synthetic` reuses a set whose
                                           manifest matches the requested parameters
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from nasfcos.errors import UserError
from nasfcos.io import atomic_write_bytes, atomic_write_json

GENERATOR_VERSION = 1
SHAPES: tuple[str, ...] = ("disc", "rectangle", "triangle", "cross", "ring", "star")
SPLITS = {"train": 0, "val": 1}
_IMAGE_NAME = re.compile(r"^\d{6}\.png$")


@dataclass
class SynthInfo:
    """Where a generated set lives and what it holds."""

    root: Path
    train_json: Path
    val_json: Path
    train_images: Path
    val_images: Path
    class_names: list[str]
    num_train: int
    num_val: int
    num_train_objects: int
    num_val_objects: int
    params: dict[str, Any] = field(default_factory=dict)
    reused: bool = False
    seconds: float = 0.0

    def json_for(self, split: str) -> Path:
        return {"train": self.train_json, "val": self.val_json}[split]


# --------------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------------


def _hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = (int(v) for v in image_size)
    return h, w


def resolve_params(
    *,
    seed: int = 0,
    num_train: int = 400,
    num_val: int = 100,
    image_size: int | tuple[int, int] = 256,
    num_classes: int = 6,
    objects_per_image: tuple[int, int] = (2, 7),
    size_range: tuple[float, float] | None = None,
    max_occlusion: float = 0.7,
    clutter: bool = True,
    noise: float = 6.0,
) -> dict[str, Any]:
    """Validate generation parameters and fill defaults; the result is what the JSON "info" records."""
    h, w = _hw(image_size)
    if h < 32 or w < 32:
        raise UserError(f"image_size: {h}x{w}: expected at least 32x32 pixels")
    if not 1 <= num_classes <= len(SHAPES):
        raise UserError(f"num_classes: {num_classes}: expected 1..{len(SHAPES)} (shapes: {', '.join(SHAPES)})")
    if num_train < 0 or num_val < 0 or num_train + num_val == 0:
        raise UserError(f"num_train/num_val: {num_train}/{num_val}: expected non-negative counts, not both 0")
    lo_n, hi_n = (int(v) for v in objects_per_image)
    if not 1 <= lo_n <= hi_n:
        raise UserError(f"objects_per_image: {objects_per_image}: expected 1 <= min <= max")
    short = min(h, w)
    if size_range is None:
        size_range = (max(6.0, round(short / 32)), round(0.78 * short))
    smin, smax = (float(v) for v in size_range)
    if not 4.0 <= smin <= smax <= 0.95 * short:
        raise UserError(f"size_range: {size_range}: expected 4 <= min <= max <= {0.95 * short:g} px")
    if not 0.0 < max_occlusion < 1.0:
        raise UserError(f"max_occlusion: {max_occlusion}: expected a fraction in (0, 1)")
    return {
        "generator_version": GENERATOR_VERSION, "seed": int(seed), "num_train": int(num_train),
        "num_val": int(num_val), "image_size": [h, w], "num_classes": int(num_classes),
        "objects_per_image": [lo_n, hi_n], "size_range": [smin, smax], "max_occlusion": float(max_occlusion),
        "clutter": bool(clutter), "noise": float(noise),
    }


# --------------------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------------------


def _unit_shape(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Outer polygon (and the hole of a ring) of a shape around the origin, roughly within [-1, 1]^2."""
    if kind in ("disc", "ring"):
        t = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
        outer = np.stack([np.cos(t), np.sin(t)], 1)
        hole = outer * rng.uniform(0.45, 0.68) if kind == "ring" else None
        return outer, hole
    if kind == "rectangle":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float), None
    if kind == "triangle":
        angles = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-15, 15, 3))
        return np.stack([np.cos(angles), np.sin(angles)], 1), None
    if kind == "cross":
        a = rng.uniform(0.25, 0.4)
        return np.array([[a, 1], [a, a], [1, a], [1, -a], [a, -a], [a, -1], [-a, -1], [-a, -a], [-1, -a],
                         [-1, a], [-a, a], [-a, 1]], dtype=float), None
    if kind == "star":
        inner = rng.uniform(0.38, 0.55)
        t = np.linspace(0.0, 2 * math.pi, 10, endpoint=False) + math.pi / 2
        radius = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([radius * np.cos(t), radius * np.sin(t)], 1), None
    raise ValueError(kind)


def _random_polygon(rng: np.random.Generator) -> np.ndarray:
    """An irregular polygon (a clutter item): random radii at sorted random angles."""
    n = int(rng.integers(5, 10))
    t = np.sort(rng.uniform(0, 2 * math.pi, n))
    r = rng.uniform(0.3, 1.0, n)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _place(poly: np.ndarray, hole: np.ndarray | None, max_side: float, h: int, w: int,
           rng: np.random.Generator, aspect: float, angle: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Stretch, rotate, scale to the requested longer side and translate so the shape lies inside the image."""
    stretch = np.array([math.sqrt(aspect), 1.0 / math.sqrt(aspect)])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    outer = (poly * stretch) @ rot.T
    inner = None if hole is None else (hole * stretch) @ rot.T
    extent = outer.max(0) - outer.min(0)
    scale = max_side / float(extent.max())
    extent = extent * scale
    centre_lo = outer.min(0) * -scale  # distance from the shape's min corner to its origin
    x0 = rng.uniform(1.0, max(1.0, w - 1.0 - extent[0]))
    y0 = rng.uniform(1.0, max(1.0, h - 1.0 - extent[1]))
    offset = np.array([x0, y0]) + centre_lo
    return outer * scale + offset, None if inner is None else inner * scale + offset


def _mask_of(outer: np.ndarray, hole: np.ndarray | None, h: int, w: int) -> tuple[np.ndarray, int, int] | None:
    """Rasterise a placed shape on a local canvas; returns (bool mask, x offset, y offset) or None if empty."""
    ox = max(0, int(math.floor(outer[:, 0].min())))
    oy = max(0, int(math.floor(outer[:, 1].min())))
    ex = min(w, int(math.ceil(outer[:, 0].max())) + 1)
    ey = min(h, int(math.ceil(outer[:, 1].max())) + 1)
    if ex <= ox or ey <= oy:
        return None
    canvas = Image.new("L", (ex - ox, ey - oy), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon([(float(x - ox), float(y - oy)) for x, y in outer], fill=1)
    if hole is not None:
        draw.polygon([(float(x - ox), float(y - oy)) for x, y in hole], fill=0)
    mask = np.asarray(canvas, dtype=bool)
    if not mask.any():
        return None
    return mask, ox, oy


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, h: int, w: int, clutter: bool) -> np.ndarray:
    base = _hsv(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.85))
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    cells = int(rng.integers(3, 8))
    coarse = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    img = img + (smooth - 127.5) * rng.uniform(0.15, 0.4)
    if clutter and rng.uniform() < 0.5:
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
        xs = np.arange(w, dtype=np.float32) * (math.cos(angle) * 2 * math.pi / period)
        ys = np.arange(h, dtype=np.float32) * (math.sin(angle) * 2 * math.pi / period)
        img = img + (np.sin(ys[:, None] + xs[None, :]) * rng.uniform(6, 20))[..., None]
    return img


def _soft_blobs(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blend a few blurred, half-transparent ellipses in (drawn and blurred at 1/4 resolution: they are smooth)."""
    h, w = img.shape[:2]
    sh, sw = max(8, h // 4), max(8, w // 4)
    n = int(rng.integers(1, 6))
    layer = Image.new("RGB", (sw, sh), 0)
    alpha = Image.new("L", (sw, sh), 0)
    d_layer, d_alpha = ImageDraw.Draw(layer), ImageDraw.Draw(alpha)
    for _ in range(n):
        cx, cy = rng.uniform(0, sw), rng.uniform(0, sh)
        rx, ry = rng.uniform(0.05, 0.3) * sw, rng.uniform(0.05, 0.3) * sh
        colour = tuple(int(c) for c in _hsv(rng.uniform(), rng.uniform(0.1, 0.7), rng.uniform(0.2, 0.9)))
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        d_layer.ellipse(box, fill=colour)
        d_alpha.ellipse(box, fill=int(rng.uniform(80, 170)))
    radius = float(rng.uniform(1, 2.5)) * min(sh, sw) / 64
    layer = layer.filter(ImageFilter.GaussianBlur(radius)).resize((w, h), Image.BILINEAR)
    alpha = alpha.filter(ImageFilter.GaussianBlur(radius)).resize((w, h), Image.BILINEAR)
    soft = np.asarray(layer, dtype=np.float32)
    a = np.asarray(alpha, dtype=np.float32)[..., None] * (1.0 / 255.0)
    return img + (soft - img) * a


def _lines(img: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    if count <= 0:
        return img
    h, w = img.shape[:2]
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(count):
        points = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(int(rng.integers(2, 4)))]
        colour = tuple(int(c) for c in _hsv(rng.uniform(), rng.uniform(0, 0.8), rng.uniform(0.1, 1.0)))
        draw.line(points, fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(canvas, dtype=np.float32)


def _paint(img: np.ndarray, mask: np.ndarray, ox: int, oy: int, colour: np.ndarray,
           rng: np.random.Generator) -> None:
    """Fill a mask with a colour plus a gentle linear shading (objects are not flat)."""
    ys, xs = np.nonzero(mask)
    direction = rng.uniform(0, 2 * math.pi)
    span = max(mask.shape)
    ramp = ((xs * math.cos(direction) + ys * math.sin(direction)) / max(span, 1) - 0.5)
    shade = ramp[:, None] * rng.uniform(0, 50)
    img[ys + oy, xs + ox] = colour[None, :] + shade


def render_image(params: dict[str, Any], split: str, index: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw image ``index`` of ``split``; return the uint8 HxWx3 pixels and its annotations (xyxy, label)."""
    h, w = params["image_size"]
    rng = np.random.default_rng(np.random.SeedSequence([params["seed"], SPLITS[split], index]))
    clutter = params["clutter"]
    img = _background(rng, h, w, clutter)
    if clutter:
        img = _soft_blobs(img, rng)
        for _ in range(int(rng.integers(0, 4))):  # hard negatives: sharp polygons that are not objects
            side = math.exp(rng.uniform(math.log(params["size_range"][0]), math.log(params["size_range"][1] * 0.6)))
            outer, _ = _place(_random_polygon(rng), None, side, h, w, rng, 1.0, 0.0)
            placed = _mask_of(outer, None, h, w)
            if placed is not None:
                _paint(img, *placed, _hsv(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0)), rng)
        img = _lines(img, rng, int(rng.integers(0, 5)))

    lo, hi = params["objects_per_image"]
    log_lo, log_hi = math.log(params["size_range"][0]), math.log(params["size_range"][1])
    num_classes = params["num_classes"]
    owner = np.full((h, w), -1, dtype=np.int32)
    objects: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(lo, hi + 1))):
        label = int(rng.integers(num_classes))
        max_side = math.exp(rng.uniform(log_lo, log_hi))
        aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
        outer, hole = _unit_shape(SHAPES[label], rng)
        outer, hole = _place(outer, hole, max_side, h, w, rng, aspect, rng.uniform(0, 2 * math.pi))
        placed = _mask_of(outer, hole, h, w)
        colour = _hsv(label / len(SHAPES) + rng.normal(0, 30 / 360), rng.uniform(0.35, 1.0), rng.uniform(0.4, 1.0))
        if placed is None:
            continue
        mask, ox, oy = placed
        _paint(img, mask, ox, oy, colour, rng)
        region = owner[oy:oy + mask.shape[0], ox:ox + mask.shape[1]]
        region[mask] = len(objects)
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        box = [float(ox + cols[0]), float(oy + rows[0]), float(ox + cols[-1] + 1), float(oy + rows[-1] + 1)]
        objects.append({"box": box, "label": label, "pixels": int(mask.sum())})
    if clutter:
        img = _lines(img, rng, int(rng.integers(0, 3)))  # drawn over objects; not counted as occlusion
    if params["noise"] > 0:
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * params["noise"]
    pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    visible = np.bincount(owner.ravel() + 1, minlength=len(objects) + 1)[1:]
    keep_fraction = 1.0 - params["max_occlusion"]
    annotations = []
    for i, obj in enumerate(objects):
        fraction = float(visible[i]) / obj["pixels"]
        if fraction >= keep_fraction:
            annotations.append({"box": obj["box"], "label": obj["label"], "visible": round(fraction, 4)})
    return pixels, annotations


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # zlib strategy 2 (Huffman only): the per-pixel noise defeats LZ matching anyway, so this is both the
    # fastest setting and the smallest file (about 130 KB at 256 px).
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1, compress_type=2)
    return buffer.getvalue()


def _write_fast(path: Path, data: bytes) -> None:
    """Temporary file + rename (never a half-written image) without the per-file fsync: the manifest, written
    atomically and last, is what marks a complete set."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _coco_for_split(params: dict[str, Any], split: str, per_image: list[list[dict[str, Any]]]) -> dict[str, Any]:
    h, w = params["image_size"]
    images, annotations = [], []
    for index, anns in enumerate(per_image):
        image_id = index + 1
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png", "width": w, "height": h})
        for ann in anns:
            x1, y1, x2, y2 = ann["box"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": ann["label"] + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                "visible_fraction": ann["visible"],
            })
    categories = [{"id": k + 1, "name": SHAPES[k], "supercategory": "shape"} for k in range(params["num_classes"])]
    info = {"description": "nasfcos synthetic shapes", "split": split, "image_dir": f"images/{split}",
            "params": params}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode("utf-8")


def _info(root: Path, params: dict[str, Any], counts: dict[str, int], reused: bool, seconds: float) -> SynthInfo:
    return SynthInfo(
        root=root, train_json=root / "annotations" / "train.json", val_json=root / "annotations" / "val.json",
        train_images=root / "images" / "train", val_images=root / "images" / "val",
        class_names=list(SHAPES[: params["num_classes"]]), num_train=params["num_train"], num_val=params["num_val"],
        num_train_objects=counts["train"], num_val_objects=counts["val"], params=params, reused=reused,
        seconds=seconds,
    )


def make_synthetic(out_dir: str | os.PathLike[str], **kwargs: Any) -> SynthInfo:
    """Generate the synthetic set into ``out_dir`` (always regenerates; see :func:`ensure_synthetic`).

    Keyword arguments (defaults): ``seed=0, num_train=400, num_val=100, image_size=256`` (int or ``(H, W)``),
    ``num_classes=6, objects_per_image=(2, 7), size_range=None`` (``(min, max)`` longer box side in pixels;
    default ``min(H, W)/32`` to ``0.78 min(H, W)``), ``max_occlusion=0.7, clutter=True, noise=6.0``.
    """
    start = time.perf_counter()
    params = resolve_params(**kwargs)
    root = Path(out_dir)
    manifest = root / "manifest.json"
    if manifest.exists():
        manifest.unlink()  # the set is incomplete until the new manifest is written
    hashes: dict[str, str] = {}
    counts: dict[str, int] = {}
    workers = max(1, min(4, os.cpu_count() or 1))
    for split in SPLITS:
        count = params[f"num_{split}"]
        image_dir = root / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)

        def produce(index: int, split: str = split, image_dir: Path = image_dir) -> list[dict[str, Any]]:
            pixels, anns = render_image(params, split, index)
            _write_fast(image_dir / f"{index + 1:06d}.png", _png_bytes(pixels))
            return anns

        # Each image depends only on (seed, split, index), so threads cannot change the result; PNG encoding,
        # blurring and the large numpy operations release the GIL.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            per_image = list(pool.map(produce, range(count)))
        wanted = {f"{i + 1:06d}.png" for i in range(count)}
        for stale in image_dir.iterdir():  # images left over from a larger earlier set
            if _IMAGE_NAME.match(stale.name) and stale.name not in wanted:
                stale.unlink()
        data = _json_bytes(_coco_for_split(params, split, per_image))
        atomic_write_bytes(root / "annotations" / f"{split}.json", data)
        hashes[f"annotations/{split}.json"] = hashlib.sha256(data).hexdigest()
        counts[split] = sum(len(a) for a in per_image)
    atomic_write_json(manifest, {"params": params, "files": hashes, "objects": counts})
    return _info(root, params, counts, reused=False, seconds=time.perf_counter() - start)


def ensure_synthetic(out_dir: str | os.PathLike[str], **kwargs: Any) -> SynthInfo:
    """Reuse the set in ``out_dir`` if its manifest records the same parameters and its files are intact;
    otherwise generate it with :func:`make_synthetic`."""
    params = resolve_params(**kwargs)
    root = Path(out_dir)
    manifest_path = root / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        intact = manifest.get("params") == params and all(
            hashlib.sha256((root / name).read_bytes()).hexdigest() == digest
            for name, digest in manifest["files"].items()
        ) and all(
            (root / "images" / split / f"{i + 1:06d}.png").is_file()
            for split in SPLITS for i in range(params[f"num_{split}"])
        )
        if intact:
            return _info(root, params, manifest["objects"], reused=True, seconds=0.0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return make_synthetic(root, **kwargs)


def read_synthetic(info: SynthInfo, split: str = "train") -> Any:
    """The :class:`DetectionSet` of one split of a generated set."""
    from nasfcos.data.coco import read_coco

    return read_coco(info.json_for(split), (info.root / "images" / split), on_bad_box="error")
