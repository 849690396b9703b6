"""How large a picture mera decodes (a still image or a video frame), checked from the file's
header before anything is decoded; read by mera.data.media and mera.data.video."""

from __future__ import annotations

from mera.errors import DataError

# the largest image (and video frame) mera decodes: 8192 x 8192. An encoder takes a few hundred
# pixels a side; a bigger file is a mistake or a decompression bomb, refused from its header alone
MAX_IMAGE_PIXELS = 8192 * 8192


def check_pixels(p, width: int, height: int, what: str = "image") -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"{p}: the {what} is {width} x {height} = {width * height:,} pixels, more than mera decodes "
                        f"({MAX_IMAGE_PIXELS:,}: mera.data.limits.MAX_IMAGE_PIXELS); resize it first")
