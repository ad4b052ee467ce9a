"""The one preprocessing path: decoding odd-but-valid images, rejecting bad ones."""

import io

import numpy as np
import pytest
from PIL import Image

from malaria.preprocess import ImageTooLargeError, InvalidImageError, decode_image, preprocess
from malaria.spec import ModelSpec

SPEC = ModelSpec(image_size=32)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def rgb_cell(size=(40, 40)) -> Image.Image:
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[..., 0] = 200
    array[: size[1] // 2, :, 1] = 100
    return Image.fromarray(array)


def test_output_is_scaled_float32_of_the_spec_size():
    x = preprocess(encode(rgb_cell()), SPEC)
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x[..., 0].mean() == pytest.approx(200 / 255, abs=1e-3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_other_modes_become_rgb(mode):
    image = rgb_cell()
    if mode == "I;16":
        converted = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
        assert converted.mode.startswith("I;16")
    else:
        converted = image.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    x = preprocess(encode(converted, fmt), SPEC)
    assert x.shape == (32, 32, 3)
    assert np.isfinite(x).all() and x.max() > 0.05


@pytest.mark.parametrize("level", [40000, 200])  # 200 of 65535: a dark image, not a bright 8-bit one
def test_sixteen_bit_keeps_its_brightness(level):
    gray = np.full((20, 20), level, dtype=np.uint16)
    encoded = encode(Image.fromarray(gray))
    assert Image.open(io.BytesIO(encoded)).mode.startswith("I;16")
    x = preprocess(encoded, SPEC)
    assert x.mean() == pytest.approx(level / 65535, abs=0.01)


def test_transparent_background_becomes_black():
    rgba = Image.new("RGBA", (20, 20), (255, 255, 255, 0))
    assert preprocess(encode(rgba), SPEC).max() == 0.0


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (20, 40)
    top, bottom = np.asarray(decoded)[:20].mean(), np.asarray(decoded)[20:].mean()
    assert top > 200 and bottom < 50


def test_non_square_and_tiny_images_are_resized():
    assert preprocess(encode(rgb_cell((60, 25))), SPEC).shape == (32, 32, 3)
    assert preprocess(encode(rgb_cell((3, 3))), SPEC).shape == (32, 32, 3)


def test_pil_image_and_path_sources(tmp_path):
    path = tmp_path / "cell.png"
    rgb_cell().save(path)
    np.testing.assert_array_equal(preprocess(path, SPEC), preprocess(Image.open(path), SPEC))


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a recognised image"),
    ],
)
def test_garbage_is_rejected_clearly(payload, message):
    with pytest.raises(InvalidImageError, match=message):
        preprocess(payload, SPEC)


def test_truncated_file_is_rejected():
    data = encode(rgb_cell((200, 200)).convert("RGB"), "PNG")
    with pytest.raises(InvalidImageError):
        preprocess(data[: len(data) // 2], SPEC)


def test_pixel_limit_guards_against_decompression_bombs():
    bomb = encode(Image.new("L", (5000, 5000)))  # small file, 25 megapixels
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLargeError, match="limit"):
        decode_image(bomb, max_pixels=1_000_000)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_microscope_formats_are_decoded(fmt):
    image = decode_image(_encoded(Image.new("RGB", (40, 30), (200, 100, 50)), fmt))
    assert image.size == (40, 30) and image.mode == "RGB"


def test_16_bit_tiff_is_decoded_to_its_range():
    sixteen = Image.fromarray(np.full((20, 20), 65535 // 2, dtype=np.uint16))
    image = decode_image(_encoded(sixteen, "TIFF"))
    assert abs(int(np.asarray(image)[0, 0, 0]) - 127) <= 1


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "ICO", "PPM"])
def test_other_formats_are_refused_before_decoding(fmt):
    data = _encoded(Image.new("RGB", (32, 32), (200, 100, 50)), fmt)
    with pytest.raises(InvalidImageError, match="not a recognised image format .accepted: PNG, JPEG, TIFF, BMP"):
        decode_image(data)


ICO_BOMB = """
import resource, struct, zlib
side = 30000  # a 900 Mpx PNG inside an ICO: Pillow's ICO plugin decodes it while opening
packer, row = zlib.compressobj(9), b"\\0" + bytes(side)
raw = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
png = b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
png += chunk(b"IDAT", raw) + chunk(b"IEND", b"")
ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png
from malaria.preprocess import InvalidImageError, decode_image
used = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (used + 400_000_000, used + 400_000_000))  # far below 900 MB
try:
    decode_image(ico, max_pixels=25_000_000)
except InvalidImageError as exc:
    print("refused:", exc)
"""


def test_an_ico_bomb_is_refused_without_decoding_it():
    """Under a 1.5 GB address-space ceiling: decoding the embedded 900 Mpx image would not fit."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", ICO_BOMB], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-1500:]
    assert result.stdout.startswith("refused: not a recognised image format")
