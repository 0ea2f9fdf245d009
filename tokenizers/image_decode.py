"""Still images: sniffing, the pixel budget, decoding (Pillow), and naming a source.

Pillow reads only the header on `Image.open`: the size is known, and checked
against the pixel budget, before a single pixel is decoded.
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lwm_serve.tokenizers.errors import (
    CorruptMediaError,
    EmptyMediaError,
    MediaError,
    MediaTooLargeError,
    UnsupportedMediaError,
)

Source = Union[str, os.PathLike, bytes]
# Pillow formats taken as a still image (animated GIF/WebP: first frame).
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"})


def source_name(src: Source) -> str:
    return "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)


def read_head(src: Source, n: int = 32) -> bytes:
    """First bytes of the media; raises EmptyMediaError for zero bytes."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        head = bytes(src[:n])
    else:
        try:
            with open(src, "rb") as f:
                head = f.read(n)
        except FileNotFoundError as e:
            raise MediaError(f"{source_name(src)}: no such file") from e
        except IsADirectoryError as e:
            raise MediaError(f"{source_name(src)}: is a directory, not a media file") from e
    if not head:
        raise EmptyMediaError(f"{source_name(src)}: the media is empty (0 bytes)")
    return head


def check_pixels(name: str, width: int, height: int, max_pixels: int | None) -> None:
    """Refuses a picture of more than `max_pixels` pixels (read from a header, before decoding).

    Raises:
        MediaTooLargeError: over the budget.
    """
    if max_pixels is not None and width * height > max_pixels:
        raise MediaTooLargeError(f"{name}: {width}x{height} = {width * height} pixels per frame is more than "
                                 f"this server's limit of {max_pixels} pixels (max_media_pixels)")


def is_image(src: Source, max_pixels: int | None = None) -> bool:
    """True if Pillow recognises `src` as a still-image format (header only).

    Raises:
        MediaTooLargeError: an image over `max_pixels`, or one Pillow itself calls a
            decompression bomb: refused here, never handed to a decoder.
    """
    read_head(src)
    try:
        with _open_image(src) as img:
            if img.format not in IMAGE_FORMATS:
                return False
            check_pixels(source_name(src), img.width, img.height, max_pixels)
            return True
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise MediaTooLargeError(f"{source_name(src)}: the image has too many pixels to decode ({e})") from e
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def _open_image(src: Source) -> Image.Image:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(src)))
    return Image.open(src)


def load_image(src: Source, max_pixels: int | None = None) -> np.ndarray:
    """Decode a still image (first frame of an animation), EXIF orientation applied.

    Args:
        src: path or bytes of a PNG/JPEG/WebP/GIF/BMP/TIFF image.
        max_pixels: refuse (MediaTooLargeError) an image with more pixels, before decoding.

    Returns:
        [H, W, 3] uint8 RGB (alpha dropped, as the reference's `convert('RGB')`).
    """
    read_head(src)
    try:
        with _open_image(src) as img:
            if img.format not in IMAGE_FORMATS:
                raise UnsupportedMediaError(f"{source_name(src)}: image format {img.format} is not supported")
            check_pixels(source_name(src), img.width, img.height, max_pixels)
            img.seek(0)
            upright = ImageOps.exif_transpose(img)
            return np.asarray(upright.convert("RGB"), dtype=np.uint8)
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise MediaTooLargeError(f"{source_name(src)}: the image has too many pixels to decode ({e})") from e
    except UnidentifiedImageError as e:
        raise UnsupportedMediaError(f"{source_name(src)}: not a recognised image format") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptMediaError(f"{source_name(src)}: image is truncated or damaged ({e})") from e
