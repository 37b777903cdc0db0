"""Property-based fuzzing of the image codec (hypothesis), on plain objects with the message fields.

Whatever arrives on a topic, `image_to_rgb` / `compressed_to_rgb` either return a contiguous
uint8 (H, W, 3) frame or raise `FrameError` with a reason and a known kind: any other
exception would escape the node's bad-input handling. Examples are derandomized (the same
on every run and in CI) and no example database is written.
"""
from __future__ import annotations

import array
import struct
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ros_anomaly_diffusion.ros import image_codec as codec
from ros_anomaly_diffusion.ros.image_codec import FrameError

KINDS = {"encoding", "size", "data", "compressed"}
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None)

# Look-alikes of supported encodings and real ROS encodings the codec does not take.
JUNK_ENCODINGS = ["", "RGB8", "rgb8 ", "mono8\x00", "yuv422", "bayer_rggb8", "8UC3", "16SC1", "64FC1", "32FC2"]
CONTAINERS = [bytes, bytearray, lambda b: array.array("B", b), list, lambda b: np.frombuffer(b, np.uint8)]


def decodes_or_frame_error(decode, msg):
    """The frame, or None after checking the FrameError; any other exception fails the test."""
    try:
        out = decode(msg)
    except FrameError as err:
        assert str(err) and err.kind in KINDS, (str(err), err.kind)
        return None
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.flags.c_contiguous
    return out


@st.composite
def raw_messages(draw):
    encoding = draw(st.one_of(st.sampled_from(sorted(codec.ENCODINGS)), st.sampled_from(JUNK_ENCODINGS),
                              st.text(max_size=8)))
    base, channels = codec.ENCODINGS.get(encoding, (np.uint8, 3))
    itemsize = np.dtype(base).itemsize
    height, width = draw(st.integers(-1, 9)), draw(st.integers(-1, 9))
    row = max(width, 0) * itemsize * channels
    step = row + draw(st.one_of(st.just(0), st.integers(-2 * itemsize * channels - 1, -1),  # equal, short
                                st.integers(1, 9), st.integers(-2**31, 2**31)))  # padded, absurd
    bigendian = draw(st.sampled_from([0, 1, 2, False, True]))
    length = max(height * step, 0) + draw(st.one_of(st.just(0), st.integers(-9, 9)))  # exact, truncated, oversized
    length = max(min(length, 4096), 0)
    if base is np.float32 and draw(st.booleans()):
        # NaN, +-Inf, subnormals and huge values, in the message's byte order
        floats = draw(st.lists(st.floats(width=32), min_size=length // 4, max_size=length // 4))
        data = np.array(floats, ">f4" if bigendian else "<f4").tobytes()
    else:
        data = draw(st.binary(min_size=length, max_size=length))
    data = None if draw(st.integers(0, 30)) == 0 else draw(st.sampled_from(CONTAINERS))(data)
    return SimpleNamespace(height=height, width=width, encoding=encoding, is_bigendian=bigendian,
                           step=step, data=data)


@FUZZ
@given(raw_messages())
def test_image_to_rgb_returns_a_frame_or_raises_frame_error(msg):
    out = decodes_or_frame_error(codec.image_to_rgb, msg)
    if msg.encoding not in codec.ENCODINGS:
        assert out is None
        return
    base, channels = codec.ENCODINGS[msg.encoding]
    valid = (msg.height > 0 and msg.width > 0 and msg.step >= msg.width * np.dtype(base).itemsize * channels
             and msg.data is not None and len(msg.data) >= msg.height * msg.step)
    assert (out is not None) == valid, "a valid message must decode, an invalid one must be refused"
    if out is not None:
        assert out.shape[:2] == (msg.height, msg.width)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@st.composite
def image_bytes(draw):
    """A real PNG / JPEG (grey, BGR, BGRA; 8 or 16 bit) of a random small size."""
    ext = draw(st.sampled_from([".png", ".jpg"]))
    dtype = np.uint16 if ext == ".png" and draw(st.booleans()) else np.uint8
    shape = (draw(st.integers(1, 12)), draw(st.integers(1, 12))) + draw(st.sampled_from([(), (3,), (4,)]))
    pixels = draw(hnp.arrays(dtype, shape, elements=st.integers(0, np.iinfo(dtype).max)))
    ok, enc = cv2.imencode(ext, pixels)
    assert ok
    return enc.tobytes(), shape[:2]


@st.composite
def compressed_messages(draw):
    """(message, (H, W) when the data is an intact image else None)."""
    kind = draw(st.sampled_from(["intact", "truncated", "corrupted", "junk", "png header"]))
    expected = None
    if kind in ("intact", "truncated", "corrupted"):
        data, size = draw(image_bytes())
        if kind == "intact":
            expected = size
        elif kind == "truncated":
            data = data[:draw(st.integers(0, len(data) - 1))]
        else:
            # bytes after the header (PNG IHDR, JPEG start of scan): the claimed size stays small
            start = 33 if data.startswith(b"\x89PNG") else data.find(b"\xff\xda") + 2
            buf = bytearray(data)
            for i in draw(st.lists(st.integers(start, len(buf) - 1), min_size=1, max_size=8)):
                buf[i] = draw(st.integers(0, 255))
            data = bytes(buf)
    elif kind == "junk":
        magic = draw(st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF89a", b"II*\x00",
                                      b"MM\x00*", b"P5\n", b"P6\n", b"RIFF\x00\x00\x00\x00WEBP"]))
        data = magic + draw(st.binary(max_size=200))
    else:
        # A hand-made PNG: sizes from zero to far past OpenCV's pixel limit (which asserts,
        # so no huge buffer is ever allocated), any bit depth / colour type, random scanlines.
        small, huge = st.integers(0, 8), st.integers(2**15 + 1, 2**31 - 1)
        w, h = draw(st.one_of(st.tuples(small, small), st.tuples(huge, huge)))
        depth, colour = draw(st.sampled_from([1, 2, 4, 8, 16, 3])), draw(st.sampled_from([0, 2, 3, 4, 6, 5]))
        ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, draw(st.integers(0, 1)))
        data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
                + png_chunk(b"IDAT", zlib.compress(draw(st.binary(max_size=300)))) + png_chunk(b"IEND", b""))
    fmt = draw(st.one_of(st.sampled_from(["jpeg", "png", "rgb8; jpeg compressed bgr8", "mono16; png compressed mono16",
                                          "16UC1; compressedDepth png", "", "tiff"]), st.text(max_size=12)))
    container = draw(st.sampled_from(CONTAINERS))
    return SimpleNamespace(format=fmt, data=container(data)), expected


@FUZZ
@given(compressed_messages())
def test_compressed_to_rgb_returns_a_frame_or_raises_frame_error(case):
    msg, expected = case
    out = decodes_or_frame_error(codec.compressed_to_rgb, msg)
    if "compresseddepth" in msg.format.lower().replace(" ", ""):
        assert out is None
    elif expected is not None:
        assert out is not None and out.shape[:2] == expected


@st.composite
def pixel_arrays(draw):
    encoding = draw(st.sampled_from(sorted(codec.ENCODINGS)))
    base, channels = codec.ENCODINGS[encoding]
    shape = (draw(st.integers(1, 8)), draw(st.integers(1, 8))) + ((channels,) if channels > 1 else ())
    if base is np.float32:
        dtype, elements = draw(st.sampled_from([np.float32, np.float64])), st.floats(0, 1, width=32)
    else:
        # 16-bit pixels in either byte order: the encoder writes them little-endian
        dtype = np.dtype(base).newbyteorder(draw(st.sampled_from("<>")))
        elements = st.integers(0, np.iinfo(base).max)
    return encoding, draw(hnp.arrays(dtype, shape, elements=elements))


@FUZZ
@given(pixel_arrays())
def test_array_to_image_then_image_to_rgb_keeps_the_pixels(case):
    encoding, pixels = case
    out = codec.image_to_rgb(codec.array_to_image(pixels, encoding, msg_type=SimpleNamespace))
    assert out.shape == pixels.shape[:2] + (3,)
    values = pixels.reshape(pixels.shape[0], pixels.shape[1], -1).astype(np.float64)
    if encoding in ("bgr8", "bgra8"):
        values = values[..., 2::-1]
    values = np.broadcast_to(values[..., :3], out.shape)
    if pixels.dtype.itemsize == 1:
        np.testing.assert_array_equal(out, values)
    else:  # 16 bit and float: the nearest 8-bit level
        scale = 255 / 65535 if pixels.dtype.kind == "u" else 255
        assert np.abs(out - values * scale).max() <= 0.5 + 1e-4


@FUZZ
@given(hnp.arrays(np.uint16, st.tuples(st.integers(1, 8), st.integers(1, 8))))
def test_16_bit_png_decodes_like_the_same_mono16_image(values):
    ok, png = cv2.imencode(".png", values)
    compressed = codec.compressed_to_rgb(SimpleNamespace(format="png", data=png.tobytes()))
    raw = codec.image_to_rgb(codec.array_to_image(values, "mono16", msg_type=SimpleNamespace))
    np.testing.assert_array_equal(compressed, raw)
