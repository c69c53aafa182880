"""`python -m bench.check_image PNG...`: print what the quality checker reads in shapes images."""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image

from bench.checker import read


def main(paths: list[str]) -> int:
    for path in paths:
        got = read(np.asarray(Image.open(path).convert("RGB")))
        print(f"{path}: " + ", ".join(f"{k}={v}" for k, v in got.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
