"""An ImageFolder of 112×112 JPEGs cut from scikit-image's bundled photos (no network), for timing training.

    python deploy/sizing/photo_corpus.py /tmp/corpus --classes 100 --per-class 1010

Prepared with ``--split 4 --size 56 --resize-mode squash`` each image gives 56×56 sub-images: the
input size of an ImageNet-21K sub36 member (336 / 6 = 56), so a member trains on it at the same cost
per sample. Photo content (not noise) keeps JPEG decode cost and sizes realistic.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
SIDE = 112


def write_class(label: int, root: Path, count: int) -> int:
    import skimage.data

    photos = [np.ascontiguousarray(getattr(skimage.data, name)()[..., :3]) for name in PHOTOS]
    rng = np.random.default_rng(label)
    folder = root / f"n{label:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        photo = photos[rng.integers(len(photos))]
        crop = int(rng.integers(SIDE, min(photo.shape[:2])))
        top, left = (int(rng.integers(0, extent - crop + 1)) for extent in photo.shape[:2])
        image = Image.fromarray(photo[top:top + crop, left:left + crop]).resize((SIDE, SIDE), Image.BILINEAR)
        image.save(folder / f"n{label:08d}_{index}.JPEG", quality=90)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=1010)
    parser.add_argument("--processes", type=int, default=None)
    args = parser.parse_args()
    with ProcessPoolExecutor(args.processes) as pool:
        written = sum(pool.map(partial(write_class, root=args.root, count=args.per_class), range(args.classes)))
    print(f"{written} images in {args.classes} classes under {args.root}")


if __name__ == "__main__":
    main()
