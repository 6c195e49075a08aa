"""Makes a folder of real images for `dynsparse bench --images`: the photographs that
ship inside scikit-image's wheel, and seeded square crops of them (more inputs for the
gates to decide on, each a real picture). Labels are not needed: `bench` reports each
policy's top-1 agreement with dense execution.

usage: python3 benches/photos.py OUT_DIR [--crops N] [--seed S]
"""

import argparse
import os
import random
import shutil

import skimage
from PIL import Image

# The photographs among scikit-image's data files (not the synthetic test patterns).
PHOTOS = [
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png",
    "clock_motion.png", "coffee.png", "coins.png", "color.png", "grass.png",
    "gravel.png", "hubble_deep_field.jpg", "ihc.png", "logo.png", "moon.png",
    "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg",
    "rocket.jpg", "text.png",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--crops", type=int, default=108, help="square crops to add (default 108)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src = os.path.join(os.path.dirname(skimage.__file__), "data")
    os.makedirs(args.out, exist_ok=True)
    for name in PHOTOS:
        shutil.copy(os.path.join(src, name), os.path.join(args.out, name))
    rng = random.Random(args.seed)
    for i in range(args.crops):
        img = Image.open(os.path.join(src, rng.choice(PHOTOS))).convert("RGB")
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.4, 0.9))
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        img.crop((x, y, x + side, y + side)).save(os.path.join(args.out, f"crop{i:03d}.png"))
    print(f"{len(PHOTOS) + args.crops} images in {args.out}")


if __name__ == "__main__":
    main()
