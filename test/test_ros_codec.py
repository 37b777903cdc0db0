"""sensor_msgs/Image <-> numpy without cv_bridge: exact pixels, padding, endianness, bad input."""
from __future__ import annotations

import array
import struct
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from ros_anomaly_diffusion.ros import image_codec as codec
from ros_anomaly_diffusion.ros.image_codec import FrameError

RGB = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)


def raw(encoding: str, pixels: np.ndarray, pad: int = 0, bigendian: bool = False, cls=Image):
    """An Image built by hand (not via the codec's encoder), rows padded with `pad` junk bytes."""
    pixels = np.asarray(pixels)
    h, w = pixels.shape[:2]
    dt = pixels.dtype.newbyteorder(">" if bigendian else "<")
    rows = np.ascontiguousarray(pixels, dtype=dt).reshape(h, -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((h, pad), 0xAB, np.uint8)], axis=1)
    msg = cls()
    msg.height, msg.width, msg.encoding = h, w, encoding
    msg.is_bigendian = int(bigendian)
    msg.step = padded.shape[1]
    msg.data = array.array("B", padded.tobytes()) if cls is Image else padded.tobytes()
    return msg


@pytest.mark.parametrize("pad", [0, 3])
def test_colour_encodings_give_exact_rgb(pad):
    alpha = np.full((5, 7, 1), 17, np.uint8)
    cases = {
        "rgb8": RGB,
        "bgr8": RGB[..., ::-1],
        "rgba8": np.concatenate([RGB, alpha], axis=2),
        "bgra8": np.concatenate([RGB[..., ::-1], alpha], axis=2),
    }
    for enc, pixels in cases.items():
        out = codec.image_to_rgb(raw(enc, pixels, pad))
        assert out.dtype == np.uint8 and out.shape == (5, 7, 3) and out.flags.c_contiguous, enc
        np.testing.assert_array_equal(out, RGB, err_msg=enc)


def test_mono8_is_replicated_to_three_channels():
    grey = RGB[..., 0]
    out = codec.image_to_rgb(raw("mono8", grey, pad=1))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
@pytest.mark.parametrize("bigendian", [False, True])
def test_16_bit_scaled_to_8_bit_both_endiannesses(encoding, bigendian):
    values = np.array([[0, 257, 65535, 32896], [128, 25700, 1, 65278]], np.uint16)
    expected = np.array([[0, 1, 255, 128], [0, 100, 0, 254]], np.uint8)
    out = codec.image_to_rgb(raw(encoding, values, pad=2, bigendian=bigendian))
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 1], expected)
    np.testing.assert_array_equal(out[..., 2], expected)


def test_bigendian_flag_is_honoured_not_ignored():
    values = np.array([[256, 1]], np.uint16)  # 0x0100 and 0x0001
    little = raw("mono16", values)
    swapped = raw("mono16", values.byteswap())  # same bytes read with the other byte order
    swapped.is_bigendian = 1
    np.testing.assert_array_equal(codec.image_to_rgb(little), codec.image_to_rgb(swapped))
    assert not np.array_equal(codec.image_to_rgb(little), codec.image_to_rgb(raw("mono16", values.byteswap())))


def test_float_images_are_sanitised():
    f = np.array([[0.0, 0.5, 1.0, 2.0], [np.nan, np.inf, -np.inf, -0.3]], np.float32)
    out = codec.image_to_rgb(raw("32FC1", f, pad=4))
    np.testing.assert_array_equal(out[..., 0], [[0, 128, 255, 255], [0, 255, 0, 0]])
    np.testing.assert_array_equal(out[..., 2], out[..., 0])
    f3 = np.stack([f, 1 - np.nan_to_num(f, nan=0, posinf=1, neginf=0), np.full_like(f, 0.2)], axis=2)
    out3 = codec.image_to_rgb(raw("32FC3", f3, bigendian=True))
    np.testing.assert_array_equal(out3[..., 0], [[0, 128, 255, 255], [0, 255, 0, 0]])
    np.testing.assert_array_equal(out3[..., 1], [[255, 128, 0, 0], [255, 0, 255, 255]])
    assert (out3[..., 2] == 51).all()


def test_works_on_any_object_with_the_image_fields():
    rows = RGB.reshape(5, -1)
    msg = SimpleNamespace(height=5, width=7, encoding="rgb8", is_bigendian=0, step=21, data=rows.tobytes())
    np.testing.assert_array_equal(codec.image_to_rgb(msg), RGB)
    msg.data = list(rows.tobytes())  # a plain list of ints
    np.testing.assert_array_equal(codec.image_to_rgb(msg), RGB)
    msg.data = rows.reshape(-1)  # a numpy array (rosbags messages)
    np.testing.assert_array_equal(codec.image_to_rgb(msg), RGB)


@pytest.mark.parametrize("msg, needle", [
    (SimpleNamespace(height=2, width=2, encoding="yuv422", is_bigendian=0, step=4, data=bytes(8)),
     "unsupported image encoding 'yuv422'"),
    (SimpleNamespace(height=0, width=4, encoding="rgb8", is_bigendian=0, step=12, data=b""),
     "zero size (4x0 pixels)"),
    (SimpleNamespace(height=3, width=0, encoding="mono8", is_bigendian=0, step=0, data=b""),
     "zero size (0x3 pixels)"),
    (SimpleNamespace(height=2, width=4, encoding="rgb8", is_bigendian=0, step=12, data=bytes(23)),
     "23 bytes, fewer than height * step = 2 * 12 = 24"),
    (SimpleNamespace(height=2, width=4, encoding="rgb8", is_bigendian=0, step=10, data=bytes(24)),
     "step 10 is smaller than width * bytes per pixel = 4 * 3 = 12"),
    (SimpleNamespace(height=2, width=4, encoding="mono16", is_bigendian=0, step=7, data=bytes(16)),
     "step 7 is smaller than width * bytes per pixel = 4 * 2 = 8"),
])
def test_bad_images_raise_clear_frame_errors(msg, needle):
    with pytest.raises(FrameError) as info:
        codec.image_to_rgb(msg)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.kind in ("encoding", "size", "data")


def test_encoders_copy_header_and_round_trip():
    header = Header(frame_id="cam_left")
    header.stamp.sec, header.stamp.nanosec = 1234, 567890
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    m = codec.mask_to_image(mask, header)
    assert (m.encoding, m.height, m.width, m.step) == ("mono8", 5, 7, 7)
    assert (m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id) == (1234, 567890, "cam_left")
    np.testing.assert_array_equal(np.frombuffer(m.data, np.uint8).reshape(5, 7), np.where(mask, 255, 0))

    score = np.linspace(0, 1, 35, dtype=np.float32).reshape(5, 7)
    s = codec.score_to_image(score, header)
    assert (s.encoding, s.step, s.is_bigendian) == ("32FC1", 28, 0)
    np.testing.assert_array_equal(np.frombuffer(s.data, "<f4").reshape(5, 7), score)
    assert s.header.frame_id == "cam_left"

    o = codec.rgb_to_image(RGB, header)
    assert (o.encoding, o.step) == ("rgb8", 21)
    np.testing.assert_array_equal(codec.image_to_rgb(o), RGB)


def test_compressed_png_is_lossless_and_jpeg_close():
    header = Header(frame_id="c")
    png = codec.rgb_to_compressed(RGB, header, fmt="png")
    assert png.format == "png" and png.header.frame_id == "c"
    np.testing.assert_array_equal(codec.compressed_to_rgb(png), RGB)
    smooth = np.dstack([np.tile(np.arange(0, 64, 2, dtype=np.uint8), (16, 1))] * 3)
    jpg = codec.compressed_to_rgb(codec.rgb_to_compressed(smooth, fmt="jpeg", quality=95))
    assert jpg.shape == smooth.shape and np.abs(jpg.astype(int) - smooth).max() <= 8
    # A bgr8-encoded PNG as image_transport writes it decodes to the same RGB.
    ok, enc = cv2.imencode(".png", cv2.cvtColor(RGB, cv2.COLOR_RGB2BGR))
    msg = CompressedImage(format="bgr8; png compressed bgr8")
    msg.data = array.array("B", enc.tobytes())
    np.testing.assert_array_equal(codec.compressed_to_rgb(msg), RGB)


@pytest.mark.parametrize("data, needle", [
    (b"", "has no data"),
    (b"\xff\xd8\xff\xe0 this is not really a jpeg", "cannot decode CompressedImage (format 'jpeg'"),
])
def test_corrupt_compressed_raises_frame_error(data, needle):
    msg = SimpleNamespace(format="jpeg", data=data)
    with pytest.raises(FrameError) as info:
        codec.compressed_to_rgb(msg)
    assert needle in str(info.value)
    assert info.value.kind == "compressed"


def test_truncated_png_raises_frame_error():
    png = codec.rgb_to_compressed(RGB, fmt="png")
    png.data = array.array("B", bytes(png.data)[:40])
    with pytest.raises(FrameError, match="corrupt or not a JPEG/PNG"):
        codec.compressed_to_rgb(png)


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 Exif segment (one IFD entry: Orientation) written by hand after SOI."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def test_jpeg_exif_orientation_is_ignored_like_cv_bridge():
    # 6 = "rotate 90 degrees": applied, a 5x7 frame would come out 7x5 and no longer match
    # its CameraInfo; cv_bridge decodes the pixels as stored.
    plain = codec.rgb_to_compressed(RGB, fmt="jpeg", quality=95)
    tagged = SimpleNamespace(format="jpeg", data=with_exif_orientation(bytes(plain.data), 6))
    out = codec.compressed_to_rgb(tagged)
    assert out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, codec.compressed_to_rgb(plain))  # same JPEG stream, same pixels


def test_16_bit_png_scaled_like_a_raw_mono16_image():
    values = np.arange(0, 65536, 331, dtype=np.uint16).reshape(9, 22)  # v >> 8 differs from the raw rule
    ok, png = cv2.imencode(".png", values)
    msg = SimpleNamespace(format="mono16; png compressed mono16", data=png.tobytes())
    out = codec.compressed_to_rgb(msg)
    np.testing.assert_array_equal(out, codec.image_to_rgb(raw("mono16", values)))
    colour = np.stack([values, values[::-1], np.full_like(values, 400)], axis=2)  # RGB
    ok, png = cv2.imencode(".png", colour[..., ::-1])  # written as BGR, as OpenCV does
    out = codec.compressed_to_rgb(SimpleNamespace(format="png", data=png.tobytes()))
    np.testing.assert_array_equal(out, (colour.astype(np.uint32) * 255 + 32767) // 65535)


def test_grey_and_bgra_png_decode_to_rgb():
    grey = RGB[..., 1]
    ok, png = cv2.imencode(".png", grey)
    np.testing.assert_array_equal(codec.compressed_to_rgb(SimpleNamespace(format="png", data=png.tobytes())),
                                  np.repeat(grey[..., None], 3, axis=2))
    ok, png = cv2.imencode(".png", np.dstack([RGB[..., ::-1], np.full((5, 7), 9, np.uint8)]))  # BGRA
    np.testing.assert_array_equal(codec.compressed_to_rgb(SimpleNamespace(format="png", data=png.tobytes())), RGB)


def test_float_tiff_follows_the_float_rule_and_signed_samples_are_refused():
    ok, tiff = cv2.imencode(".tiff", np.array([[0.0, 0.5, 1.0, np.nan]], np.float32))
    out = codec.compressed_to_rgb(SimpleNamespace(format="tiff", data=tiff.tobytes()))
    np.testing.assert_array_equal(out[..., 0], [[0, 128, 255, 0]])
    ok, tiff = cv2.imencode(".tiff", np.zeros((2, 3), np.int16))
    with pytest.raises(FrameError, match="unsupported sample type int16") as info:
        codec.compressed_to_rgb(SimpleNamespace(format="tiff", data=tiff.tobytes()))
    assert info.value.kind == "encoding"


def test_png_header_claiming_a_huge_image_raises_frame_error():
    # OpenCV asserts on a header over its pixel limit (cv2.error), which must not escape.
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(bytes(10))) + chunk(b"IEND", b""))
    with pytest.raises(FrameError, match="cannot decode CompressedImage") as info:
        codec.compressed_to_rgb(SimpleNamespace(format="png", data=png))
    assert info.value.kind == "compressed"


def test_png_chunk_longer_than_the_data_is_refused_before_decoding():
    # OpenCV 5 would first allocate the claimed ~4 GB, then fail
    png = bytearray(bytes(codec.rgb_to_compressed(RGB, fmt="png").data))
    png[33:37] = struct.pack(">I", 0xF0000011)  # the length of the chunk after IHDR
    with pytest.raises(FrameError, match=r"chunk b'IDAT' at byte 33 claims 4026531857 bytes") as info:
        codec.compressed_to_rgb(SimpleNamespace(format="png", data=bytes(png)))
    assert info.value.kind == "compressed"


@pytest.mark.parametrize("call, needle", [
    (lambda: codec.array_to_image(np.full((2, 3), 300, np.uint16), "mono8"), "mono8 needs uint8 pixels, got uint16"),
    (lambda: codec.rgb_to_image(np.full((2, 3, 3), 0.5)), "rgb8 needs uint8 pixels, got float64"),
    (lambda: codec.array_to_image(np.zeros((2, 3), np.int32), "mono16"), "mono16 needs uint16 pixels, got int32"),
    (lambda: codec.score_to_image(np.zeros((2, 3), np.int64)), "32FC1 needs float pixels, got int64"),
    (lambda: codec.mask_to_image(np.zeros((2, 3), np.uint8)), "mono8 mask needs bool pixels, got uint8"),
])
def test_encoders_refuse_a_dtype_that_does_not_match_the_encoding(call, needle):
    with pytest.raises(ValueError) as info:
        call()
    assert needle in str(info.value)


def test_encoders_accept_the_same_kind_of_dtype():
    big = np.array([[1, 300, 65535]], ">u2")
    m = codec.array_to_image(big, "mono16", msg_type=SimpleNamespace)
    np.testing.assert_array_equal(np.frombuffer(m.data, "<u2"), [1, 300, 65535])
    score = np.array([[0.25, 1 / 3]])  # float64: converted to float32
    s = codec.score_to_image(score)
    np.testing.assert_array_equal(np.frombuffer(s.data, "<f4"), score.astype(np.float32).ravel())


def test_unknown_encoding_when_encoding_raises_frame_error():
    with pytest.raises(FrameError, match="unsupported image encoding 'yuv422'") as info:
        codec.array_to_image(np.zeros((2, 2, 2), np.uint8), "yuv422")
    assert info.value.kind == "encoding"
