"""sensor_msgs/Image and CompressedImage <-> numpy, without cv_bridge.

Decoding works on any object with the Image fields (height, width, encoding,
is_bigendian, step, data), so it is testable without a ROS graph. Every malformed
message raises `FrameError` (a ValueError) with a message that names the problem and the
numbers involved; callers count and log it and go on with the next frame.

Conversions to the detector's RGB uint8 frame:

* rgb8, bgr8, rgba8, bgra8 (alpha dropped), mono8 / 8UC1 (grey replicated);
* mono16 / 16UC1: the 16-bit range is mapped linearly onto 8 bits (v * 255 / 65535,
  rounded), honouring `is_bigendian`;
* 32FC1 / 32FC3: intensities in [0, 1] (the OpenCV / cv_bridge convention for float
  images; 32FC3 channels taken as R, G, B) scaled to 0..255; NaN and -Inf become 0,
  +Inf becomes 1, values outside [0, 1] are clipped.

Rows may be padded: `step` (bytes per row) may exceed width * bytes per pixel.

CompressedImage data is decoded as cv_bridge does (IMREAD_UNCHANGED): pixels as stored,
an EXIF orientation tag is ignored (so the frame still matches its CameraInfo); grey,
BGR and BGRA results become RGB, 16-bit and float ones follow the same rules as above.

Encoding never casts: a dtype that does not match the encoding is refused with a
ValueError, as cv_bridge does (uint16 300 sent as mono8 would become 44, a [0, 1] float
frame sent as rgb8 black). 8-bit encodings take uint8, 16-bit ones uint16 (either byte
order), 32F ones any float dtype (float64 scores are stored as float32).
"""
from __future__ import annotations

import array
import struct
from typing import Any

import cv2
import numpy as np

# encoding -> (numpy base type, channels)
ENCODINGS: dict[str, tuple[type, int]] = {
    "rgb8": (np.uint8, 3),
    "bgr8": (np.uint8, 3),
    "rgba8": (np.uint8, 4),
    "bgra8": (np.uint8, 4),
    "mono8": (np.uint8, 1),
    "8UC1": (np.uint8, 1),
    "mono16": (np.uint16, 1),
    "16UC1": (np.uint16, 1),
    "32FC1": (np.float32, 1),
    "32FC3": (np.float32, 3),
}


class FrameError(ValueError):
    """An image message that cannot be turned into a frame; `kind` groups the causes
    ("encoding", "size", "data", "compressed") for counting."""

    def __init__(self, message: str, kind: str = "data"):
        super().__init__(message)
        self.kind = kind


def bytes_of(data: Any) -> np.ndarray:
    """The message's data field (bytes, array.array('B'), list of ints, ndarray) as uint8."""
    if data is None:
        return np.zeros(0, np.uint8)
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype != np.uint8 else data.reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _layout(encoding: str) -> tuple[type, int]:
    """(numpy base type, channels) of a supported encoding; FrameError for any other."""
    if encoding not in ENCODINGS:
        raise FrameError(f"unsupported image encoding {encoding!r}; supported: {', '.join(ENCODINGS)}",
                         "encoding")
    return ENCODINGS[encoding]


def _to_u8(values: np.ndarray) -> np.ndarray:
    """Samples -> uint8 by one rule for raw and compressed images: uint16 v -> v * 255 / 65535
    rounded (not v >> 8), float intensities in [0, 1] -> 0..255 with NaN, Inf and
    out-of-range values sanitised."""
    if values.dtype == np.uint8:
        return values
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if values.dtype.kind == "f":
        finite = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0)
        return np.round(np.clip(finite, 0.0, 1.0) * 255.0).astype(np.uint8)
    # only a compressed image (e.g. a signed TIFF) gets here; raw encodings are checked before
    raise FrameError(f"unsupported sample type {values.dtype.name}; 8- or 16-bit unsigned or float "
                     "images are supported", "encoding")


def image_pixels(msg: Any, what: str = "image") -> np.ndarray:
    """sensor_msgs/Image -> its pixels (H, W, channels) in the encoding's dtype, row padding
    dropped and byte order honoured; FrameError for a message whose layout does not add up."""
    encoding = str(msg.encoding)
    base, channels = _layout(encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise FrameError(f"{what} has zero size ({width}x{height} pixels)", "size")
    pixel_bytes = np.dtype(base).itemsize * channels
    row_bytes = width * pixel_bytes
    if step < row_bytes:
        raise FrameError(f"step {step} is smaller than width * bytes per pixel = {width} * {pixel_bytes} "
                         f"= {row_bytes} for {encoding}", "data")
    buf = bytes_of(msg.data)
    if buf.size < height * step:
        raise FrameError(f"{what} data has {buf.size} bytes, fewer than height * step = {height} * {step} "
                         f"= {height * step}", "data")
    rows = buf[: height * step].reshape(height, step)[:, :row_bytes]
    dtype = np.dtype(base)
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if msg.is_bigendian else "<")
    pixels = np.ascontiguousarray(rows).view(dtype).reshape(height, width, channels)
    return pixels.astype(pixels.dtype.newbyteorder("="), copy=False)


def image_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/Image (or anything with its fields) -> uint8 (H, W, 3) RGB, contiguous."""
    encoding = str(msg.encoding)
    u8 = _to_u8(image_pixels(msg))
    if u8.shape[2] == 1:
        rgb = np.repeat(u8, 3, axis=2)
    elif encoding in ("bgr8", "bgra8"):
        rgb = u8[..., 2::-1]
    else:  # rgb8, rgba8, 32FC3
        rgb = u8[..., :3]
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _check_png_chunks(buf: np.ndarray, fmt: str) -> None:
    """Refuse a PNG whose chunk claims more bytes than the message holds: OpenCV 5's PNG
    reader allocates the claimed length before failing (a 212-byte message with a corrupt
    IDAT length took 3.9 GB and 4 s)."""
    pos = 8
    while pos + 8 <= buf.size:
        length, kind = struct.unpack_from(">I4s", buf, pos)
        if pos + 12 + length > buf.size:
            raise FrameError(f"cannot decode CompressedImage (format {fmt!r}, {buf.size} bytes): PNG chunk "
                             f"{kind!r} at byte {pos} claims {length} bytes, past the end of the data",
                             "compressed")
        if kind == b"IEND":
            return
        pos += 12 + length


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg / png) -> uint8 (H, W, 3) RGB."""
    fmt = str(getattr(msg, "format", "") or "")
    if "compresseddepth" in fmt.lower().replace(" ", ""):
        raise FrameError(f"unsupported CompressedImage format {fmt!r} (compressedDepth); "
                         "publish colour images as jpeg or png", "encoding")
    buf = bytes_of(msg.data)
    if buf.size == 0:
        raise FrameError(f"CompressedImage (format {fmt!r}) has no data", "compressed")
    if buf[:8].tobytes() == b"\x89PNG\r\n\x1a\n":
        _check_png_chunks(buf, fmt)
    # IMREAD_UNCHANGED, as cv_bridge: depth and channels as stored, and no EXIF rotation
    # (OpenCV applies the orientation tag to every other read mode unless
    # IMREAD_IGNORE_ORIENTATION is set, a bit UNCHANGED = -1 already has).
    try:
        decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as err:  # e.g. a header over OpenCV's pixel limit asserts instead of failing
        raise FrameError(f"cannot decode CompressedImage (format {fmt!r}, {buf.size} bytes): "
                         f"{' '.join(str(err).split())}", "compressed") from None
    if decoded is None:
        raise FrameError(f"cannot decode CompressedImage (format {fmt!r}, {buf.size} bytes): "
                         "corrupt or not a JPEG/PNG image", "compressed")
    pixels = decoded.reshape(decoded.shape[0], decoded.shape[1], -1)
    channels = pixels.shape[2]
    if channels not in (1, 3, 4):
        raise FrameError(f"CompressedImage (format {fmt!r}) decodes to {channels} channels; "
                         "grey, BGR or BGRA are supported", "compressed")
    u8 = _to_u8(pixels)
    rgb = np.repeat(u8, 3, axis=2) if channels == 1 else u8[..., 2::-1]  # BGR(A) -> RGB
    return np.ascontiguousarray(rgb)


# --------------------------------------------------------------------------- encoding


def _image_msg_type():
    from sensor_msgs.msg import Image

    return Image


def array_to_image(pixels: np.ndarray, encoding: str, header: Any = None, msg_type: Any = None):
    """(H, W[, C]) array -> sensor_msgs/Image with `encoding`, little-endian, unpadded.

    `header` (typically the input frame's) is attached as is, so stamp and frame_id are
    exactly the input's. `msg_type` defaults to sensor_msgs.msg.Image. A dtype that does not
    match the encoding is refused, never cast (see the module docstring)."""
    encoding = str(encoding)
    base, channels = _layout(encoding)
    pixels = np.asarray(pixels)
    want = np.dtype(base)
    if not (pixels.dtype.kind == "f" if want.kind == "f"
            else pixels.dtype.kind == want.kind and pixels.dtype.itemsize == want.itemsize):
        raise ValueError(f"{encoding} needs {'float' if want.kind == 'f' else want.name} pixels, "
                         f"got {pixels.dtype.name}; convert them explicitly")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[2] != channels:
        raise ValueError(f"{encoding} needs (H, W{', %d' % channels if channels > 1 else ''}) pixels, "
                         f"got shape {pixels.shape}")
    pixels = np.ascontiguousarray(pixels, dtype=want.newbyteorder("<"))
    msg = (msg_type or _image_msg_type())()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(pixels.shape[0]), int(pixels.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(pixels.shape[1] * pixels.dtype.itemsize * channels)
    # array.array takes the fast path of the generated setter (no per-element checks).
    msg.data = array.array("B", pixels.tobytes())
    return msg


def rgb_to_image(rgb: np.ndarray, header: Any = None, msg_type: Any = None):
    """uint8 (H, W, 3) RGB -> rgb8 Image."""
    return array_to_image(rgb, "rgb8", header, msg_type)


def mask_to_image(mask: np.ndarray, header: Any = None, msg_type: Any = None):
    """bool (H, W) -> mono8 Image with 0 (normal) / 255 (anomalous)."""
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise ValueError(f"mono8 mask needs bool pixels, got {mask.dtype.name}; threshold it explicitly")
    return array_to_image(np.where(mask, 255, 0).astype(np.uint8), "mono8", header, msg_type)


def score_to_image(score: np.ndarray, header: Any = None, msg_type: Any = None):
    """float (H, W) score in [0, 1] (any float dtype) -> 32FC1 Image."""
    return array_to_image(score, "32FC1", header, msg_type)


def rgb_to_compressed(rgb: np.ndarray, header: Any = None, fmt: str = "jpeg", quality: int = 90,
                      msg_type: Any = None):
    """uint8 (H, W, 3) RGB -> CompressedImage (jpeg or png)."""
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"format must be jpeg or png, got {fmt!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == "jpeg" else []
    ok, enc = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {rgb.shape} frame as {fmt}")
    if msg_type is None:
        from sensor_msgs.msg import CompressedImage as msg_type
    msg = msg_type()
    if header is not None:
        msg.header = header
    msg.format = fmt
    msg.data = array.array("B", enc.tobytes())
    return msg
