"""Image I/O at the edge: decode anything a user may hand us into uint8 RGB, write files atomically.

Why: every tool backend works on numpy uint8 RGB arrays of shape (H, W, 3) and bool masks of shape
(H, W). Users hand us grayscale, palette, transparent, 16-bit, float, CMYK, EXIF-rotated, animated,
tiny, huge, truncated and plain wrong files, as paths, bytes or data URLs. This module is the one place
where they are converted (or refused with a one-line message that says what to do), so nothing past it
has to care. Writes go to a temporary file in the target directory and are renamed into place, so a
crash or a concurrent reader never sees half a file.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import os
import re
import stat as stat_module
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeAlias

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

ImageSource: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview

#: Grey level that transparent pixels are composited over (see `_composite_over_grey`).
BACKGROUND_GREY = 128

#: Formats we decode. Restricted on purpose: inputs may come from remote clients (data URLs), and
#: some PIL plugins (EPS via Ghostscript, for one) run external programs or are rarely exercised.
SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "TIFF", "BMP", "DIB", "WEBP", "GIF", "PPM", "TGA")

_ADVICE_FORMAT = "give a PNG/JPEG/TIFF/BMP/WebP"
_DATA_URL_LABEL = "from data URL"
_DATA_URL_ADVICE = "give data:image/png;base64,<data>"
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<payload>.*)$", re.DOTALL)
_PREMULTIPLIED = ("La", "RGBa")


class ImageInputError(ValueError):
    """An input image that cannot be used; the message says what is wrong and what to do."""


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _refused(label: str, problem: str, advice: str) -> ImageInputError:
    """The one-line error for an unreadable source: what is wrong, then what to do."""
    return ImageInputError(f"cannot read image {label}: {problem}; {advice}")


def is_data_url(s: object) -> bool:
    """Whether `s` is a `data:` URL string (the check is on the scheme only; `load_image` validates).

    Args:
        s: anything.

    Returns:
        True for a string that starts with ``data:`` (case-insensitive, leading blanks ignored).
    """
    return isinstance(s, str) and s.lstrip()[:5].lower() == "data:"


def load_image(source: ImageSource, *, min_side: int = 16, max_side: int = 4096) -> np.ndarray:
    """Decode an image into a uint8 RGB array, converting every common mode and refusing bad input.

    Conversions: EXIF orientation is applied; the first frame of a multi-frame file is taken;
    1/L/P/CMYK/YCbCr become RGB; 16- and 32-bit integer images are scaled by their bit depth
    (65535 -> 255), not clipped; float images are normalised by their own range; transparent
    images (RGBA, LA, palette or grayscale with a transparent colour) are composited over mid-grey
    (see `_composite_over_grey` for why). Images larger than `max_side` are downscaled with LANCZOS,
    keeping the aspect ratio, and a warning is logged.

    Args:
        source: a file path, the encoded file as bytes, or a ``data:image/<fmt>;base64,...`` URL.
        min_side: the smallest accepted height or width, in pixels.
        max_side: the largest height or width kept; larger images are downscaled to fit.

    Returns:
        A C-contiguous, writeable uint8 array of shape (H, W, 3).

    Raises:
        ImageInputError: the source is missing, not an image, corrupt, a decompression bomb, too
            small, or too elongated to fit `max_side` without its short side dropping under `min_side`.
        ValueError: `min_side`/`max_side` are inconsistent.
    """
    if min_side < 1 or max_side < min_side:
        raise ValueError(f"need 1 <= min_side <= max_side, got min_side={min_side}, max_side={max_side}")
    data, label = _resolve_source(source)
    rgb = _decode(data, label, _to_rgb)
    height, width = rgb.shape[:2]
    if min(height, width) < min_side:
        raise ImageInputError(
            f"cannot use image {label}: it is {width}x{height} px and the smallest side must be at "
            f"least {min_side} px; give a larger image"
        )
    if max(height, width) > max_side:
        rgb = _downscale(rgb, max_side, min_side, label)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def load_mask(path: ImageSource) -> np.ndarray:
    """Read a mask image as a bool array: any nonzero pixel is True.

    Grayscale, bilevel, 16-bit and float masks are tested on their value; colour masks (RGB,
    palette) on any colour channel; the alpha channel of LA/RGBA masks is ignored.

    Args:
        path: a file path, the encoded file as bytes, or a data URL.

    Returns:
        A C-contiguous bool array of shape (H, W).

    Raises:
        ImageInputError: the file is missing, not an image, or corrupt.
    """
    data, label = _resolve_source(path)
    return np.ascontiguousarray(_decode(data, label, _to_mask), dtype=bool)


def _resolve_source(source: ImageSource) -> tuple[str | io.BytesIO, str]:
    """Turn a source into something `Image.open` takes, plus a label for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw = bytes(source)
        label = f"from bytes ({len(raw)} bytes)"
        if not raw:
            raise _refused(label, "the data is empty", f"{_ADVICE_FORMAT} file's bytes")
        return io.BytesIO(raw), label
    if isinstance(source, str) and is_data_url(source):
        return io.BytesIO(_decode_data_url(source)), _DATA_URL_LABEL
    if not isinstance(source, (str, os.PathLike)):
        raise ImageInputError(
            f"cannot read image of type {type(source).__name__}; "
            "give a file path, bytes or a data:image/...;base64 URL"
        )
    text = os.fspath(source)
    if isinstance(text, bytes):  # a bytes PathLike
        text = os.fsdecode(text)
    label = f"'{_shorten(text)}'"
    if not text.strip():
        raise ImageInputError("cannot read image: the path is empty; give the path of an image file")
    path = Path(text).expanduser()
    try:
        stat = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        hint = (
            " (a string that is not a data: URL is read as a path; pass image data as bytes or a "
            "data:image/png;base64,... URL)"
            if len(text) > 255
            else ""
        )
        raise _refused(label, f"file not found{hint}", "check the path") from None
    except OSError as e:
        raise _refused(label, str(e.strerror or e), "check the path") from None
    if stat_module.S_ISDIR(stat.st_mode):
        raise _refused(label, "it is a directory, not a file", "give the path of an image file")
    if stat.st_size == 0:
        raise _refused(label, "the file is empty (0 bytes)", "re-export or re-download it")
    if not os.access(path, os.R_OK):
        raise _refused(label, "permission denied", "make the file readable")
    return str(path), label


def _decode_data_url(url: str) -> bytes:
    match = _DATA_URL.match(url.strip())
    if match is None:
        raise _refused(_DATA_URL_LABEL, "no ',' separates the header from the data", _DATA_URL_ADVICE)
    mime = match["mime"].strip().lower()
    params = [p.strip().lower() for p in match["params"].split(";") if p.strip()]
    if mime and not mime.startswith("image/"):
        raise _refused(_DATA_URL_LABEL, f"media type is '{mime}', not image/*", _DATA_URL_ADVICE)
    if "base64" not in params:
        raise _refused(_DATA_URL_LABEL, "it is not base64-encoded", _DATA_URL_ADVICE)
    payload = re.sub(r"\s+", "", match["payload"])
    payload += "=" * (-len(payload) % 4)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _refused(_DATA_URL_LABEL, "the payload is not valid base64", "re-encode the image") from None
    if not raw:
        raise _refused(_DATA_URL_LABEL, "the payload is empty", _DATA_URL_ADVICE)
    return raw


def _decode(fp: str | io.BytesIO, label: str, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Open, fully decode frame 0, apply EXIF orientation and convert, mapping failures to ImageInputError."""
    try:
        with warnings.catch_warnings():
            # PIL warns (and only raises at twice the limit): treat the warning as the refusal it should be.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp, formats=_available_formats()) as im:
                n_frames = getattr(im, "n_frames", 1)
                if n_frames > 1:
                    logger.info("image %s has %d frames; using frame 0", label, n_frames)
                    im.seek(0)
                im.load()  # decode everything now, so truncation shows up here and not later
                oriented = _apply_exif_orientation(im, label)
                return convert(oriented)
    except ImageInputError as e:
        raise ImageInputError(f"cannot use image {label}: {e}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(
            f"cannot read image {label}: refused as a possible decompression bomb ({str(e).rstrip('.')}); "
            "give a smaller image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the source"
        ) from None
    except UnidentifiedImageError:
        raise ImageInputError(
            f"cannot read image {label}: not an image file (cannot identify image file); {_ADVICE_FORMAT}"
        ) from None
    except PermissionError:
        raise _refused(label, "permission denied", "make the file readable") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, zlib.error...
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reason = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
        problem = f"the file is corrupt or truncated ({reason})"
        raise _refused(label, problem, "re-export or re-download it") from None


def _available_formats() -> list[str]:
    Image.init()  # register every plugin (open() with `formats` alone loads only the common five)
    return [name for name in SUPPORTED_FORMATS if name in Image.ID]


def _apply_exif_orientation(im: Image.Image, label: str) -> Image.Image:
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose an otherwise good image
        logger.warning("image %s has an unreadable EXIF block; ignoring its orientation", label)
        return im
    if orientation in (None, 1):
        return im
    try:
        transposed = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001
        logger.warning("image %s: cannot apply EXIF orientation %s; using it as stored", label, orientation)
        return im
    return transposed if transposed is not None else im


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image of any supported mode to uint8 RGB (H, W, 3)."""
    mode = im.mode
    if mode == "F":
        return _gray_to_rgb(_float_to_uint8(np.asarray(im, dtype=np.float64)))
    if mode == "I" or mode.startswith("I;16"):
        return _gray_to_rgb(_integer_to_uint8(np.asarray(im)))
    if mode in _PREMULTIPLIED:
        return _composite_premultiplied_over_grey(np.asarray(im))
    if im.has_transparency_data:
        return _composite_over_grey(np.asarray(im.convert("RGBA")))
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    try:
        rgb = im.convert("RGB")
    except (ValueError, OSError):
        raise ImageInputError(f"image mode {mode} has no RGB conversion; save it as 8-bit RGB") from None
    return np.array(rgb, dtype=np.uint8)


def _to_mask(im: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image to a bool mask (nonzero is True)."""
    mode = im.mode
    if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        return np.asarray(im) != 0
    if mode in ("LA", "La"):
        return np.asarray(im)[..., 0] != 0
    try:
        rgb = np.asarray(im.convert("RGB"))
    except (ValueError, OSError):
        raise ImageInputError(f"mask mode {mode} is not supported; save it as 8-bit grayscale") from None
    return rgb.any(axis=-1)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _integer_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale 16/32-bit integer samples to 8 bits by their bit depth (never clip).

    Unsigned 16-bit data maps 0..65535 onto 0..255 (v / 257, rounded). 32-bit data ("I" mode) whose
    values fit in 0..65535 is 16-bit data in a wider container (how PIL long read 16-bit PNGs) and is
    scaled the same way; anything else (negative or wider values) is normalised by its own range.
    """
    if values.dtype.kind == "u" and values.dtype.itemsize == 1:
        return values.astype(np.uint8)
    if values.size == 0:
        return np.zeros(values.shape, np.uint8)
    lo, hi = int(values.min()), int(values.max())
    if lo >= 0 and hi <= 65535:
        return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return _normalise_range(values.astype(np.float64), float(lo), float(hi))


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Normalise float samples onto 0..255 using their finite range (NaN -> 0, +inf -> 255, -inf -> 0)."""
    finite = np.isfinite(values)
    if not finite.any():
        raise ImageInputError("float image has no finite pixel values; give an image with real data")
    lo, hi = float(values[finite].min()), float(values[finite].max())
    values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
    return _normalise_range(values, lo, hi)


def _normalise_range(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi > lo:
        return np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    # A constant image has no range: keep its level if it reads as 0..1 (normalised) or 0..255 data.
    level = lo * 255.0 if 0.0 <= lo <= 1.0 else lo
    return np.full(values.shape, int(np.clip(np.rint(level), 0, 255)), np.uint8)


def _composite_over_grey(rgba: np.ndarray) -> np.ndarray:
    """Flatten straight-alpha RGBA onto a uniform mid-grey (128) background.

    Why mid-grey and not white or black: the defect engine blends colour into the object and the mask
    generator thresholds colour differences. A white or black fill turns every anti-aliased or
    half-transparent edge into a bright or dark rim that reads as a (fake) defect boundary and skews
    local contrast statistics. Mid-grey is the level closest on average to any colour, so the
    flattened edges carry the least invented contrast.
    """
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    out = (rgb * alpha + BACKGROUND_GREY * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _composite_premultiplied_over_grey(values: np.ndarray) -> np.ndarray:
    """As `_composite_over_grey`, for premultiplied La/RGBa data (colour already scaled by alpha)."""
    colour = values[..., :-1].astype(np.uint32)
    alpha = values[..., -1:].astype(np.uint32)
    out = np.minimum((colour * 255 + BACKGROUND_GREY * (255 - alpha) + 127) // 255, 255).astype(np.uint8)
    return out if out.shape[-1] == 3 else _gray_to_rgb(out[..., 0])


def _downscale(rgb: np.ndarray, max_side: int, min_side: int, label: str) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = max_side / max(height, width)
    new_w = max(1, min(max_side, round(width * scale)))
    new_h = max(1, min(max_side, round(height * scale)))
    if min(new_w, new_h) < min_side:
        raise ImageInputError(
            f"cannot use image {label}: it is {width}x{height} px, too elongated to fit max_side={max_side} "
            f"with its short side at least {min_side} px; crop it to a less elongated region"
        )
    logger.warning(
        "image %s is %dx%d px, larger than max_side=%d; downscaled to %dx%d",
        label,
        width,
        height,
        max_side,
        new_w,
        new_h,
    )
    resized = Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.LANCZOS)
    return np.array(resized, dtype=np.uint8)


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[: limit - 20]}...{text[-15:]}"


# --------------------------------------------------------------------------------------------------
# Encoding and writing
# --------------------------------------------------------------------------------------------------


#: zlib level for every PNG we write. PNG is lossless at any level; level 1 encodes about 5x faster
#: than Pillow's default 6 for files ~10-20% larger, and encoding was the agent's largest overhead.
PNG_COMPRESS_LEVEL = 1


def _to_pil(array: np.ndarray) -> Image.Image:
    """A PIL image for a uint8 RGB (H, W, 3), uint8 grayscale (H, W) or bool mask (H, W) array."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(array).__name__}")
    if array.size == 0:
        raise ValueError(f"cannot encode an empty array of shape {array.shape}")
    if array.dtype == bool and array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8) * np.uint8(255))
    if array.dtype == np.uint8 and array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array))
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(array))
    raise ValueError(
        f"expected uint8 RGB (H, W, 3), uint8 (H, W) or bool (H, W), got {array.dtype} {array.shape}; "
        "convert with load_image or array.astype(np.uint8)"
    )


def encode_png(array: np.ndarray) -> bytes:
    """Encode an image or mask array as PNG bytes (bool masks as 0/255 grayscale).

    Args:
        array: uint8 RGB (H, W, 3), uint8 grayscale (H, W) or bool mask (H, W).

    Returns:
        The PNG file's bytes.
    """
    buffer = io.BytesIO()
    _to_pil(array).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def encode_data_url(image: np.ndarray) -> str:
    """Encode an image (or mask) as a ``data:image/png;base64,...`` URL.

    Args:
        image: uint8 RGB (H, W, 3), uint8 grayscale (H, W) or bool mask (H, W).

    Returns:
        The data URL; `load_image` reads it back unchanged (as RGB).
    """
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Mode of files we create: what `open()` would give (mkstemp alone would give 0600).
_FILE_MODE = 0o666 & ~_current_umask()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not possible everywhere (Windows); the rename is still atomic
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Write through a temporary file in the target directory, fsync it, then rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, _FILE_MODE)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)
    return target


def save_png_atomic(array: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Save an image or mask as PNG atomically (temp file in the same directory, fsync, rename).

    Args:
        array: uint8 RGB (H, W, 3), uint8 grayscale/mask (H, W), or bool mask (H, W) saved as 0/255.
        path: destination; parent directories are created.

    Returns:
        The destination path.

    Raises:
        ValueError: the array has an unsupported dtype or shape (nothing is written).
    """
    pil = _to_pil(array)
    return _atomic_write(path, lambda f: pil.save(f, format="PNG", compress_level=PNG_COMPRESS_LEVEL))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically (temp file in the same directory, fsync, rename).

    Args:
        path: destination; parent directories are created.
        text: the content, written as is.

    Returns:
        The destination path.
    """
    data = text.encode("utf-8")
    return _atomic_write(path, lambda f: f.write(data))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write an object as indented JSON (indent=2, keys in insertion order) atomically.

    The object is serialised before anything is written, so an unserialisable object leaves an
    existing file untouched.

    Args:
        path: destination; parent directories are created.
        obj: a JSON-serialisable object.

    Returns:
        The destination path.

    Raises:
        TypeError: `obj` is not JSON-serialisable (nothing is written).
    """
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    return write_text_atomic(path, text)


__all__ = [
    "BACKGROUND_GREY",
    "SUPPORTED_FORMATS",
    "ImageInputError",
    "ImageSource",
    "encode_data_url",
    "encode_png",
    "is_data_url",
    "load_image",
    "load_mask",
    "save_png_atomic",
    "write_json_atomic",
    "write_text_atomic",
]
