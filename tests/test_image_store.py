"""The content-addressed image store: ids from content, exact round trips, idempotent writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tools.image_store import ImageStore, UnknownImageError, content_id, is_mask_id

REPO_ROOT = Path(__file__).resolve().parents[1]


def _image(seed: int = 0, shape: tuple[int, ...] = (24, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _files(store: ImageStore) -> list[str]:
    return sorted(p.name for p in store.images_dir.iterdir())


def test_put_returns_16_hex_id_and_writes_png_under_images(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "run")
    image_id = store.put(_image())
    assert len(image_id) == 16 and all(c in "0123456789abcdef" for c in image_id)
    assert store.path(image_id) == tmp_path / "run" / "images" / f"{image_id}.png"
    assert store.path(image_id).is_file()
    assert image_id in store


def test_same_content_gives_same_id_and_second_put_writes_nothing(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    image = _image()
    first = store.put(image)
    before = os.stat(store.path(first))
    second = store.put(image.copy())
    after = os.stat(store.path(first))
    assert first == second
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert _files(store) == [f"{first}.png"]


def test_id_does_not_depend_on_memory_layout(tmp_path: Path) -> None:
    base = _image(shape=(32, 24, 3))
    view = np.transpose(base, (1, 0, 2))  # non-contiguous view
    assert not view.flags.c_contiguous
    store = ImageStore(tmp_path)
    assert store.put(view) == store.put(np.ascontiguousarray(view)) == content_id(view)


def test_different_content_or_shape_gives_different_ids(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    image = _image()
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    reshaped = image.reshape(32, 24, 3)  # same bytes, other shape
    ids = {store.put(image), store.put(changed), store.put(reshaped)}
    assert len(ids) == 3
    assert len(_files(store)) == 3


def test_get_round_trips_rgb_exactly_as_a_fresh_writeable_array(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    image = _image()
    out = store.get(store.put(image))
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, image)
    out[0, 0] = 0  # the caller may modify it
    np.testing.assert_array_equal(ImageStore(tmp_path).get(content_id(image)), image)


def test_grayscale_image_round_trips_as_two_dimensional(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    gray = _image(shape=(20, 30))
    out = store.get(store.put(gray))
    assert out.shape == (20, 30) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, gray)


def test_mask_round_trips_as_bool_under_an_m_prefixed_id(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    mask = _image(shape=(20, 30)) > 128
    mask_id = store.put_mask(mask)
    assert mask_id.startswith("m") and len(mask_id) == 17 and is_mask_id(mask_id)
    out = store.get(mask_id)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, mask)
    assert store.put_mask(mask.copy()) == mask_id


def test_put_of_a_bool_array_stores_a_mask(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    mask = np.eye(16, dtype=bool)
    mask_id = store.put(mask)
    assert is_mask_id(mask_id) and mask_id == store.put_mask(mask)
    assert store.get(mask_id).dtype == bool


def test_mask_and_image_with_equal_pixels_get_different_ids(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    mask = np.eye(16, dtype=bool)
    as_uint8 = mask.astype(np.uint8) * 255
    assert store.put_mask(mask) != store.put(as_uint8)
    np.testing.assert_array_equal(store.get(store.put(as_uint8)), as_uint8)


def test_unknown_id_raises_key_error_naming_it(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(KeyError) as info:
        store.get("0123456789abcdef")
    assert isinstance(info.value, UnknownImageError)
    assert "no image with id '0123456789abcdef'" in str(info.value)
    assert "0123456789abcdef" not in store


@pytest.mark.parametrize("bad_id", ["", "xyz", "0123456789ABCDEF", "../../etc/passwd", "m123"])
def test_malformed_id_raises_key_error_explaining_the_format(tmp_path: Path, bad_id: str) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(KeyError, match=r"invalid image id.*16 lowercase hex digits"):
        store.get(bad_id)
    assert bad_id not in store


def test_contains_is_false_for_non_strings(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    assert 3 not in store and None not in store


@pytest.mark.parametrize(
    "bad",
    [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 4), np.uint8), np.zeros((0, 8, 3), np.uint8), [[1, 2]]],
    ids=["float", "rgba", "empty", "list"],
)
def test_put_refuses_unsupported_arrays(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="expected a non-empty uint8"):
        ImageStore(tmp_path).put(bad)  # type: ignore[arg-type]


def test_put_mask_refuses_non_bool_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bool mask"):
        ImageStore(tmp_path).put_mask(np.zeros((8, 8), np.uint8))


def test_concurrent_processes_putting_the_same_image_agree_and_leave_one_file(tmp_path: Path) -> None:
    image = _image(seed=7, shape=(64, 64, 3))
    np.save(tmp_path / "image.npy", image)
    code = (
        "import sys, numpy as np; from tools.image_store import ImageStore; "
        "print(ImageStore(sys.argv[1]).put(np.load(sys.argv[2])))"
    )
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "run"), str(tmp_path / "image.npy")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        for _ in range(4)
    ]
    results = [worker.communicate(timeout=60) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), [err for _, err in results]
    ids = {out.strip() for out, _ in results}
    assert ids == {content_id(image)}
    store = ImageStore(tmp_path / "run")
    assert _files(store) == [f"{content_id(image)}.png"]  # no temp files left behind
    np.testing.assert_array_equal(store.get(content_id(image)), image)
