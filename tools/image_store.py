"""A content-addressed PNG store: the graph state holds image ids, never pixels.

Why: LangGraph checkpoints the state after every step; pixels in it would bloat checkpoints and
messages. Instead each image is written once as ``<root>/images/<id>.png`` and the state carries the
id. The id is derived from the content, so storing the same array twice (in a retry, a resumed run or
a second process) is a no-op that returns the same id, and PNG makes the round trip exact.

Ids:
- images (uint8 RGB (H, W, 3) or uint8 grayscale (H, W)): 16 lowercase hex digits, the start of
  sha256 over the array's shape, dtype and bytes;
- masks (bool (H, W), stored as a 0/255 grayscale PNG): ``m`` followed by the same 16 hex digits of
  the mask's own hash. The prefix tells `get` to return a bool array, and it can never collide with an
  image id (``m`` is not a hex digit).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from tools.imaging import ImageInputError, save_png_atomic

MASK_PREFIX = "m"
_HEX_DIGITS = 16
_ID_PATTERN = re.compile(rf"^(?P<mask>{MASK_PREFIX})?[0-9a-f]{{{_HEX_DIGITS}}}$")


class UnknownImageError(KeyError):
    """An image id that is malformed or not in the store."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def content_id(array: np.ndarray) -> str:
    """The content hash of an array: 16 hex digits of sha256 over shape, dtype and bytes.

    Args:
        array: any numpy array; its memory layout does not matter (a view hashes like its copy).

    Returns:
        16 lowercase hex digits.
    """
    contiguous = np.ascontiguousarray(array)
    header = f"{'x'.join(str(int(n)) for n in contiguous.shape)}:{contiguous.dtype.str}:".encode("ascii")
    digest = hashlib.sha256(header)
    digest.update(contiguous.tobytes())
    return digest.hexdigest()[:_HEX_DIGITS]


def is_mask_id(image_id: str) -> bool:
    """Whether `image_id` names a mask (as returned by `ImageStore.put_mask`)."""
    match = _ID_PATTERN.match(image_id) if isinstance(image_id, str) else None
    return bool(match and match["mask"])


class _DecodedCache:
    """Decoded arrays by file path, bounded in bytes, least recently used out first.

    Why it is safe: a store file's name is the hash of its content and is never rewritten, so a
    decoded copy can never go stale. Why it matters: each tool node reads the normal and the edited
    image back; decoding them again dominated the graph's own overhead.
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            array = self._items.get(key)
            if array is not None:
                self._items.move_to_end(key)
            return array

    def put(self, key: str, array: np.ndarray) -> None:
        if array.nbytes > self._max_bytes // 4:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = array
            self._bytes += array.nbytes
            while self._bytes > self._max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes


_DECODED = _DecodedCache()


class ImageStore:
    """Content-addressed PNG store under ``<root>/images/``.

    Safe for concurrent threads and processes sharing a root: files are written to a temporary name
    and renamed into place, and two writers of one id write identical bytes.

    Args:
        root: the run directory; images go to ``root / "images"`` (created on first put).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.images_dir = self.root / "images"

    def __repr__(self) -> str:
        return f"ImageStore({str(self.root)!r})"

    def put(self, image: np.ndarray) -> str:
        """Store an image (or a bool mask, as `put_mask` does) and return its id.

        Args:
            image: uint8 RGB (H, W, 3) or uint8 grayscale (H, W); a bool (H, W) array is stored
                as a mask.

        Returns:
            The content id; the same content always gives the same id, and a second put writes nothing.

        Raises:
            ValueError: unsupported dtype or shape.
        """
        if isinstance(image, np.ndarray) and image.dtype == bool:
            return self.put_mask(image)
        _check_image(image)
        return self._write(content_id(image), image)

    def put_mask(self, mask: np.ndarray) -> str:
        """Store a bool mask (as a 0/255 grayscale PNG) and return its id (``m`` + 16 hex digits).

        Args:
            mask: bool array of shape (H, W).

        Returns:
            The mask id; `get` returns it as a bool array.

        Raises:
            ValueError: not a 2-D bool array.
        """
        if not isinstance(mask, np.ndarray) or mask.dtype != bool or mask.ndim != 2 or mask.size == 0:
            raise ValueError(
                f"expected a non-empty bool mask of shape (H, W), got {_describe(mask)}; "
                "convert with `mask > 0` or store a uint8 image with put()"
            )
        return self._write(MASK_PREFIX + content_id(mask), mask)

    def get(self, image_id: str) -> np.ndarray:
        """Read an image or mask back, exactly as it was put.

        Args:
            image_id: an id returned by `put` or `put_mask`.

        Returns:
            A new writeable array: uint8 (H, W, 3) or (H, W) for images, bool (H, W) for masks.

        Raises:
            UnknownImageError (a KeyError): the id is malformed or not in this store.
            ImageInputError: the stored file exists but cannot be decoded.
        """
        path = self.path(image_id)
        cached = _DECODED.get(str(path))
        if cached is not None:
            return cached.copy()
        try:
            with Image.open(path, formats=("PNG",)) as im:
                im.load()
                array = np.array(im)
        except FileNotFoundError:
            raise UnknownImageError(
                f"no image with id '{image_id}' in {self.images_dir}; use an id returned by put()/put_mask() "
                "of a store with the same root"
            ) from None
        except Exception as e:  # noqa: BLE001 - any decoder failure means the stored file is damaged
            raise ImageInputError(
                f"stored image '{image_id}' at {path} is unreadable ({e}); "
                "delete the file and put the image again"
            ) from None
        if is_mask_id(image_id):
            array = array != 0
        _DECODED.put(str(path), array)
        return array.copy()

    def path(self, image_id: str) -> Path:
        """The PNG path of an id (whether or not it has been stored).

        Raises:
            UnknownImageError (a KeyError): the id is malformed.
        """
        if not isinstance(image_id, str) or not _ID_PATTERN.match(image_id):
            raise UnknownImageError(
                f"invalid image id {image_id!r}: expected 16 lowercase hex digits (an image) or "
                f"'{MASK_PREFIX}' + 16 hex digits (a mask), as returned by ImageStore.put()/put_mask()"
            )
        return self.images_dir / f"{image_id}.png"

    def __contains__(self, image_id: object) -> bool:
        if not isinstance(image_id, str) or not _ID_PATTERN.match(image_id):
            return False
        return self.path(image_id).is_file()

    def _write(self, image_id: str, array: np.ndarray) -> str:
        path = self.path(image_id)
        if not path.is_file():
            save_png_atomic(array, path)
        return image_id


def _check_image(image: object) -> None:
    if (
        isinstance(image, np.ndarray)
        and image.dtype == np.uint8
        and image.size > 0
        and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3))
    ):
        return
    raise ValueError(
        f"expected a non-empty uint8 RGB (H, W, 3) or grayscale (H, W) image, got {_describe(image)}; "
        "read files with tools.imaging.load_image, or use put_mask() for bool masks"
    )


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


__all__ = ["MASK_PREFIX", "ImageStore", "UnknownImageError", "content_id", "is_mask_id"]
