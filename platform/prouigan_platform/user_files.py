"""A user's file, read with care: a regular file only (a FIFO named ``x.png`` would block the read forever, a device
would never end), and an image's size checked from its header before a decoder allocates for it."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

from PIL import Image

from prouigan_platform.errors import BadInput, UserError

MAX_IMAGE_PIXELS = 100_000_000  # a photo's pixels, from its header (the dataset build's limit too)


def regular_file(path: str | Path, what: str = "file") -> Path:
    """``path`` when it names a regular file (a link to one is fine); a UserError naming it otherwise."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else \
            "not a regular file"
        raise BadInput(f"{what} {path} is {kind}, not a regular file: refused")
    return path


def open_image(path: str | Path, what: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A user's image file decoded, after its header says it is at most ``max_pixels``; a UserError otherwise."""
    path = regular_file(path, what)
    try:
        with warnings.catch_warnings():  # the size is checked here, against our own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        if im.width * im.height > max_pixels:
            raise BadInput(f"{what} {path} is {im.width}x{im.height} pixels ({im.width * im.height / 1e6:.0f} MP); "
                           f"the limit is {max_pixels / 1e6:.0f} MP: refused before decoding")
        im.load()
    except UserError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadInput(f"{what} {path} is not a readable image ({type(e).__name__})") from None
    return im
