"""Generate a small synthetic detection set: coloured shapes on textured backgrounds, VOC-style.

    python examples/ssd/make_shapes.py OUT_DIR [--train 300] [--test 60] [--size 96] [--seed 0]

writes OUT_DIR/images/*.png, OUT_DIR/annotations/*.xml (VOC: size, object/name/difficult/bndbox),
OUT_DIR/labelmap.prototxt (background + circle, square, triangle), and the list files
OUT_DIR/trainval.txt and OUT_DIR/test.txt ("images/x.png annotations/x.xml" lines) that
`caffe convert_annoset` reads. Each image holds one to three non-overlapping shapes; backgrounds are
smooth random noise so that the detector has to look at shape, not just colour.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.integers(40, 200, (size // 8 + 2, size // 8 + 2, 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
    noise = rng.normal(0, 12, (size, size, 3))
    return np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8)


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def make_image(rng: np.random.Generator, size: int):
    img = Image.fromarray(background(rng, size))
    draw = ImageDraw.Draw(img)
    objects: list[tuple[str, tuple[int, int, int, int]]] = []
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            side = int(rng.integers(size // 5, size // 2))
            x0, y0 = int(rng.integers(0, size - side)), int(rng.integers(0, size - side))
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for _, b in objects):
                break
        else:
            continue
        kind = CLASSES[int(rng.integers(len(CLASSES)))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw_shape(draw, kind, box, colour)
        objects.append((kind, box))
    return img, objects


def voc_xml(name: str, size: int, objects) -> str:
    parts = [f"<annotation><filename>{name}</filename><size><width>{size}</width><height>{size}</height>"
             "<depth>3</depth></size>"]
    for kind, (x0, y0, x1, y1) in objects:
        parts.append(f"<object><name>{kind}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin>"
                     f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--test", type=int, default=60)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for sub in ("images", "annotations"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    with open(os.path.join(args.out, "labelmap.prototxt"), "w") as f:
        f.write('item { name: "none_of_the_above" label: 0 display_name: "background" }\n')
        for i, c in enumerate(CLASSES, 1):
            f.write(f'item {{ name: "{c}" label: {i} display_name: "{c}" }}\n')
    for split, count in (("trainval", args.train), ("test", args.test)):
        lines = []
        for k in range(count):
            name = f"{split}_{k:05d}"
            img, objects = make_image(rng, args.size)
            img.save(os.path.join(args.out, "images", name + ".png"))
            with open(os.path.join(args.out, "annotations", name + ".xml"), "w") as f:
                f.write(voc_xml(name + ".png", args.size, objects))
            lines.append(f"images/{name}.png annotations/{name}.xml\n")
        with open(os.path.join(args.out, f"{split}.txt"), "w") as f:
            f.writelines(lines)
    print(f"wrote {args.train} training and {args.test} test images to {args.out}")


if __name__ == "__main__":
    main()
