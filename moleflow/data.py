"""Find and read an MVTec-AD style data set (numpy + cv2 only, no torch).

Layout of one class folder::

    <root>/<class>/train/good/*.png               normal training images
    <root>/<class>/test/good/*.png                normal test images
    <root>/<class>/test/<defect>/*.png            defective test images
    <root>/<class>/ground_truth/<defect>/<stem>_mask.png

Users bring their own folders, so every problem with the data raises
:class:`DataError` naming the offending path and saying how to fix it,
instead of a bare traceback from deep inside training.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from moleflow.errors import MoleflowError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassData",
    "DataError",
    "TestItem",
    "list_classes",
    "load_class",
    "load_images",
    "read_image",
    "read_mask",
    "class_masks",
]

#: Lower-case suffixes (with dot) treated as images; matching is case-insensitive.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

_LAYOUT_HINT = "expected <root>/<class>/train/good/*.png (MVTec AD layout)"


class DataError(MoleflowError, ValueError):
    """A problem with the user's data; the message names the path and the fix."""


@dataclass(frozen=True)
class TestItem:
    """One test image: label 0 = good, 1 = defective (then ``mask_path`` is set)."""

    __test__ = False  # keep pytest from collecting this as a test class

    path: Path
    label: int
    defect: str
    mask_path: Path | None


@dataclass(frozen=True)
class ClassData:
    """All file paths of one class, sorted for determinism."""

    name: str
    root: Path
    train: tuple[Path, ...]
    test: tuple[TestItem, ...]

    def files(self) -> list[Path]:
        """Every train, test and mask file of the class."""
        out = list(self.train)
        for item in self.test:
            out.append(item.path)
            if item.mask_path is not None:
                out.append(item.mask_path)
        return out

    def fingerprint(self) -> str:
        """sha256 over relative path, size and mtime (ns) of every file.

        Cheap (no file contents are read) and changes whenever a file is
        added, removed, replaced or touched, so it can key a feature cache.
        """
        rows = []
        for path in self.files():
            try:
                st = path.stat()
            except OSError as exc:
                raise DataError(f"cannot stat {path} ({exc.strerror}); the data changed while "
                                f"loading it, reload the class") from exc
            rel = os.path.relpath(path, self.root).replace(os.sep, "/")
            rows.append(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}")
        digest = hashlib.sha256()
        for row in sorted(rows):
            digest.update(row.encode("utf-8", "surrogateescape") + b"\n")
        return digest.hexdigest()


def _is_image(path: Path) -> bool:
    return (not path.name.startswith(".")) and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` sorted by name; hidden/other files ignored."""
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _check_root(root: Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"data root {root} does not exist; pass the folder that holds the class "
                        f"folders ({_LAYOUT_HINT})")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder; pass the folder that holds the class "
                        f"folders ({_LAYOUT_HINT})")
    return root


def list_classes(root: Path) -> list[str]:
    """Sorted names of the class folders under ``root`` that contain ``train/good``."""
    root = _check_root(root)
    return [d.name for d in _subdirs(root) if (d / "train" / "good").is_dir()]


def _find_masks(folder: Path) -> dict[str, Path]:
    """Map mask file name without suffix (e.g. ``000_mask``) to its path, preferring .png."""
    masks: dict[str, Path] = {}
    if folder.is_dir():
        for p in _images_in(folder):
            if p.stem not in masks or p.suffix.lower() == ".png":
                masks[p.stem] = p
    return masks


def _load_test(cls_dir: Path) -> tuple[TestItem, ...]:
    test_dir = cls_dir / "test"
    items: list[TestItem] = []
    for sub in _subdirs(test_dir):
        images = _images_in(sub)
        if sub.name == "good":
            items.extend(TestItem(p, 0, "good", None) for p in images)
            continue
        gt_dir = cls_dir / "ground_truth" / sub.name
        masks = _find_masks(gt_dir)
        for p in images:
            mask = masks.get(f"{p.stem}_mask")
            if mask is None:
                raise DataError(f"defective test image {p} has no mask; expected "
                                f"{gt_dir / (p.stem + '_mask.png')} (white = defect, black = "
                                f"good, same size as the image); add it or remove the image")
            items.append(TestItem(p, 1, sub.name, mask))
    return tuple(items)


def load_class(root: Path, name: str, *, need_test: bool = True) -> ClassData:
    """Collect and validate the files of class ``name`` under ``root``.

    With ``need_test=False`` a missing or empty ``test/`` is allowed (test is
    then empty); a present test set is still validated (masks must exist).
    """
    root = _check_root(root)
    cls_dir = root / name
    if not cls_dir.is_dir():
        found = list_classes(root)
        listing = ", ".join(found) if found else "none (a class folder needs train/good inside)"
        raise DataError(f"class folder {cls_dir} not found; classes in {root}: {listing}")
    good_dir = cls_dir / "train" / "good"
    if not good_dir.is_dir():
        raise DataError(f"{good_dir} is missing; put the normal training images of class "
                        f"'{name}' there ({_LAYOUT_HINT})")
    train = tuple(_images_in(good_dir))
    if not train:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"{good_dir} has no image files ({exts}); add the normal training "
                        f"images of class '{name}'")
    test_dir = cls_dir / "test"
    test: tuple[TestItem, ...] = ()
    if test_dir.is_dir():
        test = _load_test(cls_dir)
    if need_test and not test:
        what = "is missing" if not test_dir.is_dir() else "has no images in its sub-folders"
        raise DataError(f"{test_dir} {what}; add test/good/ with normal images and "
                        f"test/<defect>/ with defective ones (masks in ground_truth/<defect>/)")
    return ClassData(name=name, root=cls_dir, train=train, test=test)


def _decode(path: Path, flags: int) -> np.ndarray:
    """Read an image file; any failure becomes a DataError naming the file."""
    path = Path(path)
    try:
        # np.fromfile + imdecode == cv2.imread, but also works with non-ASCII paths on Windows
        # and lets a missing file be told apart from a corrupt one.
        buf = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot open image {path} ({exc.strerror}); check that it exists and "
                        f"is readable") from exc
    img = cv2.imdecode(buf, flags) if buf.size else None
    if img is None or img.size == 0:
        raise DataError(f"cannot read image {path} (corrupt or not an image); re-export it as "
                        f"PNG/JPEG or delete it")
    return img


def _to_uint8(img: np.ndarray, path: Path) -> np.ndarray:
    """Scale 16-bit / float images to uint8 (the range the backbone expects)."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        f = np.nan_to_num(img.astype(np.float32))
        if f.max(initial=0.0) <= 1.0:
            f = f * 255.0
        return np.clip(np.rint(f), 0, 255).astype(np.uint8)
    raise DataError(f"image {path} has unsupported pixel type {img.dtype}; save it as 8- or "
                    f"16-bit PNG/JPEG")


def _resize(img: np.ndarray, size: int, interpolation: int | None = None) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    if interpolation is None:
        interpolation = cv2.INTER_AREA if h * w > size * size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interpolation)


def read_image(path: Path, size: int) -> np.ndarray:
    """Read any supported image as uint8 RGB of shape (size, size, 3).

    Grey-scale is replicated to 3 channels, alpha dropped, 16-bit scaled.
    """
    img = _to_uint8(_decode(path, cv2.IMREAD_UNCHANGED), Path(path))
    if img.ndim == 3 and img.shape[2] in (1, 2):  # grey or grey+alpha
        img = img[:, :, 0]
    if img.ndim == 2:
        rgb = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 3:
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    elif img.ndim == 3 and img.shape[2] == 4:
        rgb = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    else:
        raise DataError(f"image {path} has unsupported shape {img.shape}; save it as grey, RGB "
                        f"or RGBA")
    return np.ascontiguousarray(_resize(rgb, size))


def _image_hw(path: Path) -> tuple[int, int]:
    img = _decode(path, cv2.IMREAD_UNCHANGED)
    return int(img.shape[0]), int(img.shape[1])


def read_mask(path: Path, image_path: Path, size: int, *,
              image_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a defect mask as bool (size, size); white (> 127) = defect.

    The mask must match its image's height/width, otherwise it is probably
    the wrong file. Pass ``image_shape`` (h, w) to skip re-decoding the image.
    """
    mask = _to_uint8(_decode(path, cv2.IMREAD_UNCHANGED), Path(path))
    if mask.ndim == 3:
        colour = mask[:, :, :3] if mask.shape[2] >= 3 else mask[:, :, :1]
        mask = colour.max(axis=2)  # max, not luma: a pure red/blue mask must not vanish
    ih, iw = image_shape if image_shape is not None else _image_hw(image_path)
    mh, mw = mask.shape[:2]
    if (mh, mw) != (ih, iw):
        raise DataError(f"mask {path} is {mw}x{mh} but its image {image_path} is {iw}x{ih} "
                        f"(width x height); masks must have the same size as their image")
    binary = (mask > 127).astype(np.uint8)
    return _resize(binary, size, cv2.INTER_NEAREST).astype(bool)


def load_images(paths: Iterable[Path] | Sequence[Path], size: int) -> np.ndarray:
    """Stack :func:`read_image` over ``paths`` into uint8 (N, size, size, 3)."""
    paths = list(paths)
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = read_image(p, size)
    return out


def class_masks(data: ClassData, size: int) -> np.ndarray:
    """Ground-truth masks (N, size, size) bool of a class's test images (all-false for good
    ones)."""
    out = np.zeros((len(data.test), size, size), dtype=bool)
    for i, item in enumerate(data.test):
        if item.mask_path is not None:
            out[i] = read_mask(item.mask_path, item.path, size)
    return out
