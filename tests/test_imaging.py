"""Edge validation of images: every odd input is converted or refused with a clear message."""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.imaging import (
    ImageInputError,
    encode_data_url,
    is_data_url,
    load_image,
    load_mask,
    save_png_atomic,
    write_json_atomic,
    write_text_atomic,
)


def _gradient_rgb(height: int = 32, width: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 5 % 256, yy * 7 % 256, (xx + yy) * 3 % 256], axis=-1).astype(np.uint8)


def _save(image: Image.Image, path: Path, **kwargs: object) -> Path:
    image.save(path, **kwargs)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims the given size (enough for PIL to decide before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _stored_mode(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def _stored_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- reading


def test_rgb_png_loads_exactly_as_contiguous_writeable_uint8(tmp_path: Path) -> None:
    rgb = _gradient_rgb()
    path = _save(Image.fromarray(rgb), tmp_path / "a.png")
    for source in (path, str(path)):
        out = load_image(source)
        assert out.dtype == np.uint8 and out.shape == (32, 48, 3)
        assert out.flags.c_contiguous and out.flags.writeable
        np.testing.assert_array_equal(out, rgb)


def test_random_bytes_with_png_suffix_are_refused_as_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageInputError, match=r"noise\.png.*not an image file.*give a PNG/JPEG"):
        load_image(path)


def test_truncated_png_is_refused_as_corrupt(tmp_path: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageInputError, match=r"corrupt or truncated.*re-export"):
        load_image(path)


def test_16bit_grayscale_png_is_scaled_by_bit_depth_not_clipped(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    values[0, 0], values[0, 1], values[0, 2], values[0, 3] = 0, 65535, 128 * 257, 1000
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    assert _stored_mode(path).startswith("I")
    out = load_image(path)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [128, 128, 128]
    assert out[0, 3].tolist() == [4, 4, 4]  # 1000 / 257, where clipping would give 255
    np.testing.assert_array_equal(out[..., 0], np.rint(values / 257.0).astype(np.uint8))


def test_big_endian_16bit_tiff_is_scaled_like_little_endian(tmp_path: Path) -> None:
    values = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64).astype(">u2")
    path = _save(Image.fromarray(values), tmp_path / "be.tif")
    assert _stored_mode(path) == "I;16B"
    expected = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    np.testing.assert_array_equal(load_image(path)[..., 1], expected)


def test_32bit_integer_image_with_negative_values_is_normalised_by_range(tmp_path: Path) -> None:
    values = np.linspace(-100_000, 300_000, 32 * 32).astype(np.int32).reshape(32, 32)
    path = _save(Image.fromarray(values), tmp_path / "wide.tif")
    assert _stored_mode(path) == "I"
    out = load_image(path)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_float_image_is_normalised_by_its_range(tmp_path: Path) -> None:
    values = np.linspace(-1.0, 3.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    path = _save(Image.fromarray(values), tmp_path / "float.tif")
    assert _stored_mode(path) == "F"
    out = load_image(path)
    assert out[0, 0].tolist() == [0, 0, 0] and out[-1, -1].tolist() == [255, 255, 255]
    assert abs(int(out[16, 0, 0]) - 128) <= 1  # the middle of the range maps to the middle


def test_one_pixel_image_is_refused_naming_the_minimum_side(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (1, 1), (10, 20, 30)), tmp_path / "dot.png")
    with pytest.raises(ImageInputError, match=r"1x1 px.*at least 16 px; give a larger image"):
        load_image(path)


def test_min_side_is_configurable(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (40, 20)), tmp_path / "small.png")
    assert load_image(path, min_side=20).shape == (20, 40, 3)
    with pytest.raises(ImageInputError, match="at least 21 px"):
        load_image(path, min_side=21)


def test_rgba_is_composited_over_mid_grey_into_three_channels(tmp_path: Path) -> None:
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # opaque red
    rgba[:, 10:15] = (0, 0, 0, 0)  # fully transparent
    rgba[:, 15:] = (255, 255, 255, 128)  # half-transparent white
    out = load_image(_save(Image.fromarray(rgba), tmp_path / "rgba.png"))
    assert out.shape == (20, 20, 3)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 12].tolist() == [128, 128, 128]
    assert out[0, 17].tolist() == [192, 192, 192]


def test_palette_image_with_transparency_shows_grey_where_transparent(tmp_path: Path) -> None:
    palette_image = Image.new("P", (20, 20), 0)
    palette_image.putpalette([0, 255, 0] + [0, 0, 255] + [0, 0, 0] * 254)
    palette_image.paste(1, (0, 0, 10, 20))
    path = _save(palette_image, tmp_path / "pal.png", transparency=0)
    assert _stored_mode(path) == "P"
    out = load_image(path)
    assert out[0, 0].tolist() == [0, 0, 255]  # opaque entry keeps its colour
    assert out[0, 15].tolist() == [128, 128, 128]  # transparent entry (green) is not shown


def test_palette_image_without_transparency_uses_its_palette(tmp_path: Path) -> None:
    palette_image = Image.new("P", (20, 20), 3)
    palette_image.putpalette([0, 0, 0] * 3 + [200, 100, 50] + [0, 0, 0] * 252)
    assert load_image(_save(palette_image, tmp_path / "pal.png"))[5, 5].tolist() == [200, 100, 50]


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = _gradient_rgb()[..., 0]
    out = load_image(_save(Image.fromarray(gray), tmp_path / "gray.png"))
    assert out.shape == (32, 48, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_grayscale_with_alpha_is_composited_over_grey(tmp_path: Path) -> None:
    la = np.zeros((20, 20, 2), np.uint8)
    la[:, :10] = (50, 255)
    la[:, 10:] = (250, 0)
    out = load_image(_save(Image.fromarray(la), tmp_path / "la.png"))
    assert out.shape == (20, 20, 3)
    assert out[0, 0].tolist() == [50, 50, 50] and out[0, 15].tolist() == [128, 128, 128]


def test_bilevel_image_becomes_black_and_white(tmp_path: Path) -> None:
    image = Image.new("1", (20, 20), 0)
    image.paste(1, (0, 0, 10, 20))
    out = load_image(_save(image, tmp_path / "bw.png"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 15].tolist() == [0, 0, 0]


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert _stored_mode(path) == "CMYK"
    out = load_image(path)
    assert out.shape == (32, 32, 3)
    assert np.abs(out[16, 16].astype(int) - [255, 0, 0]).max() <= 8


def test_ycbcr_tiff_is_converted_to_rgb(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (32, 32), (200, 30, 40)).convert("YCbCr"), tmp_path / "ycc.tif")
    assert _stored_mode(path) == "YCbCr"
    assert np.abs(load_image(path)[5, 5].astype(int) - [200, 30, 40]).max() <= 3


def test_exif_orientation_6_rotates_so_height_and_width_swap(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[...] = (0, 0, 255)
    stored[:10, :10] = (255, 0, 0)  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(Image.fromarray(stored), tmp_path / "phone.jpg", exif=exif, quality=95)
    out = load_image(path)
    assert out.shape == (40, 20, 3)
    assert out[3, 16, 0] > 200 and out[3, 16, 2] < 60  # the block is now top-right
    assert out[3, 3, 2] > 200 and out[3, 3, 0] < 60


def test_huge_image_is_downscaled_to_max_side_keeping_aspect(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = Image.new("RGB", (5000, 300), (90, 140, 200))
    path = _save(image, tmp_path / "wide.png", compress_level=1)
    with caplog.at_level(logging.WARNING, logger="tools.imaging"):
        out = load_image(path)
    assert out.shape == (246, 4096, 3)  # 300 * 4096 / 5000 = 245.8
    assert out[100, 2000].tolist() == [90, 140, 200]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("downscaled to 4096x246" in message for message in warnings)


def test_image_too_elongated_to_downscale_is_refused(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (400, 20)), tmp_path / "strip.png")
    with pytest.raises(ImageInputError, match=r"too elongated.*crop"):
        load_image(path, max_side=200)


@pytest.mark.parametrize("side", [20_000, 10_000], ids=["over-error-limit", "over-warning-limit"])
def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path, side: int) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    with pytest.raises(ImageInputError, match=r"decompression bomb.*smaller image"):
        load_image(path)


def test_animated_gif_uses_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    with Image.open(path) as stored:
        assert stored.n_frames == 2
    assert load_image(path)[10, 10].tolist() == [255, 0, 0]


def test_missing_file_is_refused_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match=r"nothere\.png.*file not found; check the path"):
        load_image(tmp_path / "nothere.png")


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match="is a directory"):
        load_image(tmp_path)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageInputError, match=r"empty \(0 bytes\)"):
        load_image(path)


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(ImageInputError, match="empty"):
        load_image(b"")


def test_bytes_input_decodes_like_the_file(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_gradient_rgb()), tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(path.read_bytes()), load_image(path))
    np.testing.assert_array_equal(load_image(bytearray(path.read_bytes())), load_image(path))


def test_data_url_round_trips_exactly() -> None:
    rgb = _gradient_rgb()
    url = encode_data_url(rgb)
    assert url.startswith("data:image/png;base64,") and is_data_url(url)
    np.testing.assert_array_equal(load_image(url), rgb)


def test_is_data_url_only_accepts_data_strings(tmp_path: Path) -> None:
    assert not is_data_url("images/a.png")
    assert not is_data_url(b"data:image/png;base64,")
    assert not is_data_url(tmp_path)
    assert is_data_url("  DATA:image/jpeg;base64,AAAA")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", "not image"),
        ("data:image/png,rawtext", "not base64-encoded"),
        ("data:image/png;base64,aGVsbG8gd29ybGQ=", "not an image file"),
    ],
    ids=["bad-base64", "not-image-type", "not-base64", "not-an-image"],
)
def test_malformed_data_url_is_refused(url: str, message: str) -> None:
    with pytest.raises(ImageInputError, match=message):
        load_image(url)


def test_unsupported_source_type_is_refused() -> None:
    with pytest.raises(ImageInputError, match="give a file path, bytes or a data"):
        load_image(123)  # type: ignore[arg-type]


def test_errors_are_value_errors_with_one_line_messages(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        load_image(tmp_path / "missing.png")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- writing


def test_save_png_atomic_round_trips_rgb_and_leaves_no_temp_files(tmp_path: Path) -> None:
    rgb = _gradient_rgb()
    path = save_png_atomic(rgb, tmp_path / "deep" / "er" / "out.png")
    assert path == tmp_path / "deep" / "er" / "out.png"
    np.testing.assert_array_equal(_stored_pixels(path), rgb)
    assert _no_temp_files(path.parent)


def test_save_png_atomic_overwrites_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    save_png_atomic(np.zeros((16, 16, 3), np.uint8), path)
    save_png_atomic(np.full((16, 16, 3), 7, np.uint8), path)
    assert _stored_pixels(path).max() == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_bool_mask_is_saved_as_0_255_grayscale_and_loads_back(tmp_path: Path) -> None:
    mask = np.zeros((20, 30), bool)
    mask[5:10, 3:25] = True
    path = save_png_atomic(mask, tmp_path / "mask.png")
    assert _stored_mode(path) == "L"
    assert set(np.unique(_stored_pixels(path)).tolist()) == {0, 255}
    loaded = load_mask(path)
    assert loaded.dtype == bool
    np.testing.assert_array_equal(loaded, mask)


def test_uint8_mask_is_saved_as_grayscale(tmp_path: Path) -> None:
    mask = np.zeros((16, 16), np.uint8)
    mask[2:4] = 255
    path = save_png_atomic(mask, tmp_path / "m.png")
    np.testing.assert_array_equal(_stored_pixels(path), mask)


def test_load_mask_treats_any_nonzero_pixel_as_true(tmp_path: Path) -> None:
    gray = np.zeros((16, 16), np.uint8)
    gray[0, 0], gray[1, 1] = 1, 200
    np.testing.assert_array_equal(load_mask(_save(Image.fromarray(gray), tmp_path / "g.png")), gray > 0)
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[3, 3] = (0, 0, 9)
    colour_path = _save(Image.fromarray(rgb), tmp_path / "c.png")
    np.testing.assert_array_equal(load_mask(colour_path), rgb.any(axis=-1))


def test_save_png_atomic_refuses_unsupported_arrays_without_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected uint8 RGB"):
        save_png_atomic(np.zeros((8, 8, 3), np.float32), tmp_path / "f.png")
    assert list(tmp_path.iterdir()) == []


def test_write_text_atomic_writes_utf8_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = write_text_atomic(tmp_path / "sub" / "note.txt", "défaut: rayure\n")
    assert path.read_text(encoding="utf-8") == "défaut: rayure\n"
    assert _no_temp_files(path.parent)


def test_write_json_atomic_keeps_key_order_and_indents(tmp_path: Path) -> None:
    obj = {"z": 1, "a": [1, 2], "é": "ü"}
    path = write_json_atomic(tmp_path / "r.json", obj)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == obj
    assert list(json.loads(text)) == ["z", "a", "é"]
    assert text.startswith('{\n  "z": 1,')
    assert _no_temp_files(tmp_path)


def test_write_json_atomic_with_unserialisable_object_keeps_the_old_file(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "r.json", {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
