"""Typed media errors: every bad-input case raises a `MediaError` subclass.

`MediaError` is a `ValueError` so generic callers still treat it as bad input;
`server/errors.py` maps each subclass to its HTTP status. Messages name what is
wrong (the file, the stream, the limit) and never embed media bytes.
"""

from __future__ import annotations


class MediaError(ValueError):
    """Base class: the media given cannot be turned into frames."""


class EmptyMediaError(MediaError):
    """The media has no bytes, or no decodable frame."""


class CorruptMediaError(MediaError):
    """The bytes are truncated or damaged, or not a media file at all."""


class UnsupportedMediaError(MediaError):
    """The container, codec or image format is not supported (or too large to decode)."""


class NoVideoStreamError(MediaError):
    """The container has no video stream (e.g. audio only)."""


class MediaTooLongError(MediaError):
    """The media is longer than the configured limit."""


class MediaTooLargeError(MediaError):
    """An image or video frame has more pixels than the configured budget (refused before decoding)."""
