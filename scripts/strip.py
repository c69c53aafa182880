"""`python scripts/strip.py A.png B.png ... --out STRIP.png`: images side by side, each scaled 3x (nearest), for
the README's pictures of small-model results."""

from __future__ import annotations

import argparse

from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=int, default=3)
    p.add_argument("--gap", type=int, default=8)
    args = p.parse_args()
    tiles = [Image.open(path).convert("RGB") for path in args.images]
    tiles = [t.resize((t.width * args.scale, t.height * args.scale), Image.Resampling.NEAREST) for t in tiles]
    strip = Image.new("RGB", (sum(t.width for t in tiles) + args.gap * (len(tiles) - 1),
                              max(t.height for t in tiles)), (128, 128, 128))
    x = 0
    for t in tiles:
        strip.paste(t, (x, 0))
        x += t.width + args.gap
    strip.save(args.out)


if __name__ == "__main__":
    main()
