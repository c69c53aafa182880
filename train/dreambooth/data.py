"""Instance and class images: read, checked and turned into [-1, 1] pixel tensors of one size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""Files read as images (case-insensitive); other files in the folder are ignored."""
MASK_SUFFIX = ".mask.png"
"""NAME.mask.png beside NAME.png is that image's subject mask, not an instance image."""


def image_files(folder: Path) -> list[Path]:
    """The folder's image files, sorted by name; a missing folder or one without images is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.lower().endswith(MASK_SUFFIX))
    if not files:
        raise ValueError(f"{folder}: no images (files ending in {', '.join(IMAGE_SUFFIXES)})")
    return files


def captions(files: list[Path], default: str, token: str) -> list[str]:
    """Each image's prompt: its caption file (NAME.txt beside NAME.png) or `default`; each must hold the token."""
    from train.dreambooth.config import check_instance_prompt

    out = []
    for f in files:
        caption = f.with_suffix(".txt")
        if caption.is_file():
            text = " ".join(caption.read_text(encoding="utf-8").split())
            check_instance_prompt(text, token, f"{caption.name}: caption")
            out.append(text)
        elif default.strip():
            out.append(default)
        else:
            raise ValueError(f"{f.name} has no caption file ({caption.name}) and no --instance-prompt was given: "
                             f"give one, with the token {token!r}")
    return out


def load_images(files: list[Path], resolution: int) -> np.ndarray:
    """[N, H, W, 3] uint8. With `resolution` every image is resized to resolution x resolution (bicubic);
    with 0 they must all have one size, a multiple of 8 each way."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"{f}: unreadable image ({type(e).__name__}: {e})") from None
        if resolution:
            rgb = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC)
        out.append(np.asarray(rgb, dtype=np.uint8))
    sizes = sorted({(a.shape[1], a.shape[0]) for a in out})
    if len(sizes) > 1:
        first = {s: next(f.name for f, a in zip(files, out, strict=True) if (a.shape[1], a.shape[0]) == s)
                 for s in sizes}
        raise ValueError("images of different sizes: " + ", ".join(f"{w}x{h} ({first[(w, h)]})" for w, h in sizes)
                         + "; pass --resolution PX to resize them all to PX x PX")
    w, h = sizes[0]
    if w % 8 or h % 8:
        raise ValueError(f"{files[0].parent}: images are {w}x{h}; width and height must be multiples of 8 "
                         "(or pass --resolution PX)")
    return np.stack(out)


def mask_file(image: Path) -> Path:
    return image.with_name(image.stem + MASK_SUFFIX)


def load_masks(files: list[Path], size: tuple[int, int]) -> np.ndarray:
    """bool [N, H, W]: each image's mask (white = subject; resized to the training size), all False where an
    image has none. No mask at all is an error (the caller asked for masks)."""
    from PIL import Image, UnidentifiedImageError

    w, h = size
    out = np.zeros((len(files), h, w), bool)
    found = 0
    for i, f in enumerate(files):
        m = mask_file(f)
        if not m.is_file():
            continue
        try:
            with Image.open(m) as im:
                gray = im.convert("L").resize((w, h), Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"{m}: unreadable mask ({type(e).__name__}: {e})") from None
        out[i] = np.asarray(gray) > 127
        found += 1
    if not found:
        raise ValueError(f"mask_weight is set but no instance image has a mask ({mask_file(files[0]).name} beside "
                         f"{files[0].name}, white = the subject)")
    return out


def to_pixels(images: np.ndarray):  # type: ignore[no-untyped-def]
    """uint8 [N, H, W, 3] -> float32 torch [N, 3, H, W] in [-1, 1] (the VAE's input)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
