"""Make the image-classification example's data set and base model, on the fly and deterministically.

The images are photos, of a sort, from a production line: a brushed metal plate on a dark conveyor belt, under
uneven light, with sensor noise, slightly shifted and turned. A plate is `ok`, or has a defect: a `scratch` (a
thin bright or dark line across it) or a `dent` (a shaded blob). The script writes

    <out>/images/<split>/<n>.png          the images (64x64 PNG)
    <out>/{train,validation,test}.jsonl   {"image": "images/<split>/<n>.png", "label": "..."} records
    <out>/imagefolder/<split>/<label>/    the same images as image folders (with --imagefolder)
    <out>/tiny-resnet/                    a tiny ResNet base model with random weights (no download; --base vit
                                          for a tiny ViT in <out>/tiny-vit/)

    .venv/bin/python examples/image-classification/generate.py            # into examples/image-classification/data
    .venv/bin/kubetune run examples/image-classification/local.yaml

Image paths in the records are relative to the records' file, so the folder can be uploaded to object storage as it
is (`aws s3 sync <out> s3://data/defects/`) and finetunejob.yaml reads it there.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

LABELS = ("ok", "scratch", "dent")
SPLITS = {"train": 480, "validation": 60, "test": 120}
SIZE = 64


def plate(rng: np.random.Generator, size: int = SIZE) -> tuple[Image.Image, Image.Image, tuple]:
    """A metal plate on a belt: the image (RGB) and the plate's mask, and its box (x0, y0, x1, y1)."""
    belt = rng.normal(0.18, 0.03, (size, size)) + rng.normal(0, 0.02, (size, 1))  # rubber, faint rows
    tint = rng.uniform(0.96, 1.04, 3)
    margin = rng.integers(6, 11, 4)
    box = (int(margin[0]), int(margin[1]), size - int(margin[2]), size - int(margin[3]))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rounded_rectangle(box, radius=int(rng.integers(2, 7)), fill=255)
    angle = rng.uniform(-12, 12)
    mask = mask.rotate(angle, resample=Image.BILINEAR, center=(size / 2, size / 2))
    # Brushed metal: streaks along the brushing direction, a base grey that varies between plates.
    streaks = rng.normal(0, 0.04, (size, 1)) + rng.normal(0, 0.015, (size, size))
    metal = rng.uniform(0.55, 0.75) + streaks
    metal = np.asarray(Image.fromarray(np.uint8(np.clip(metal, 0, 1) * 255)).rotate(angle, resample=Image.BILINEAR,
                                                                                     fillcolor=160)) / 255.0
    alpha = np.asarray(mask) / 255.0
    grey = belt * (1 - alpha) + metal * alpha
    rgb = np.clip(grey[..., None] * tint, 0, 1)
    return Image.fromarray(np.uint8(rgb * 255)), mask, box


def inner_point(mask: Image.Image, rng: np.random.Generator, margin: int = 9) -> tuple[int, int]:
    """A point on the plate at least `margin` pixels from its edge: (y, x)."""
    inside = np.argwhere(np.asarray(mask.filter(ImageFilter.MinFilter(2 * margin + 1))) > 200)
    return tuple(inside[rng.integers(len(inside))])


def scratch(image: Image.Image, mask: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A straight or slightly bent line across part of the plate, brighter or darker than the metal."""
    y, x = inner_point(mask, rng)
    length, angle = rng.uniform(16, 30), rng.uniform(0, math.pi)
    dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
    bend = rng.uniform(-3, 3)
    points = [(x - dx, y - dy), (x + bend, y - bend), (x + dx, y + dy)]
    shade = int(rng.choice([rng.integers(15, 50), rng.integers(215, 250)]))
    layer = Image.new("L", image.size, 0)
    ImageDraw.Draw(layer).line(points, fill=255, width=int(rng.integers(2, 4)))
    layer = Image.fromarray(np.uint8(np.asarray(layer) * (np.asarray(mask) / 255.0)))  # only on the plate
    return Image.composite(Image.new("RGB", image.size, (shade,) * 3), image, layer)


def dent(image: Image.Image, mask: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A round dent: a dark shaded blob with a light rim on the side facing the light."""
    y, x = inner_point(mask, rng)
    r = rng.uniform(4, 8)
    rx, ry = r * rng.uniform(0.8, 1.25), r
    shadow = Image.new("L", image.size, 0)
    ImageDraw.Draw(shadow).ellipse((x - rx, y - ry, x + rx, y + ry), fill=int(rng.integers(150, 220)))
    shadow = Image.fromarray(np.uint8(np.asarray(shadow.filter(ImageFilter.GaussianBlur(1.2)))
                                      * (np.asarray(mask) / 255.0)))  # only on the plate
    rim = Image.new("L", image.size, 0)
    ImageDraw.Draw(rim).arc((x - rx - 1, y - ry - 1, x + rx + 1, y + ry + 1), 200, 340, fill=180, width=2)
    dark = Image.composite(Image.new("RGB", image.size, (25, 25, 28)), image, shadow)
    return Image.composite(Image.new("RGB", image.size, (235, 235, 235)), dark, rim.filter(ImageFilter.BLUR))


def lighting(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Uneven light (a gradient at a random angle), overall exposure, and sensor noise."""
    size = image.size[0]
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    angle = rng.uniform(0, 2 * math.pi)
    gradient = 1 + rng.uniform(0.1, 0.35) * (xx * math.cos(angle) + yy * math.sin(angle)) * 2
    pixels = np.asarray(image) / 255.0 * gradient[..., None] * rng.uniform(0.8, 1.2)
    pixels = pixels + rng.normal(0, 0.03, pixels.shape)
    return Image.fromarray(np.uint8(np.clip(pixels, 0, 1) * 255))


def sample(label: str, rng: np.random.Generator) -> Image.Image:
    image, mask, _ = plate(rng)
    if label == "scratch":
        image = scratch(image, mask, rng)
    elif label == "dent":
        image = dent(image, mask, rng)
    return lighting(image, rng)


def write(out: Path, seed: int = 0, splits: dict[str, int] | None = None, imagefolder: bool = False) -> dict:
    """Write the images and the records of every split under `out`; returns {split: records file}."""
    out = Path(out)
    files = {}
    for n, (split, count) in enumerate((splits or SPLITS).items()):
        rng = np.random.default_rng([seed, n])
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(count):
            label = LABELS[i % len(LABELS)] if split != "train" else LABELS[int(rng.integers(len(LABELS)))]
            rel = f"images/{split}/{i:04d}.png"
            sample(label, rng).save(out / rel)
            records.append({"image": rel, "label": label})
            if imagefolder:
                target = out / "imagefolder" / split / label / f"{i:04d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / rel, target)
        files[split] = out / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--imagefolder", action="store_true", help="also write <out>/imagefolder/<split>/<label>/")
    parser.add_argument("--base", choices=("resnet", "vit", "none"), default="resnet",
                        help="the tiny base model to write beside the data (random weights)")
    args = parser.parse_args()
    files = write(args.out, args.seed, imagefolder=args.imagefolder)
    for split, path in files.items():
        print(f"{split}: {sum(1 for _ in path.open())} records in {path}")
    if args.base != "none":
        from kubetune_dev.tiny_vision import make_tiny_resnet, make_tiny_vit

        make = make_tiny_resnet if args.base == "resnet" else make_tiny_vit
        print(f"base model: {make(args.out / f'tiny-{args.base}', image_size=32, seed=args.seed)}")


if __name__ == "__main__":
    main()
