"""Evidence per alarm: the frame and its overlay as JPEG files, kept within bounds.

For each alarm the daemon saves ``<camera>-<frame>-<time>-frame.jpg`` and
``<camera>-<frame>-<time>-overlay.jpg`` (camera and frame ids reduced to ``[A-Za-z0-9._-]``,
time in UTC as ``20261203T171141.123Z``) in ``evidence.folder``. Retention drops whole alarms,
oldest first, past ``max_files`` files, ``max_age_s`` seconds or ``max_bytes`` bytes; files
of an earlier run found at start are kept under the same bounds.

Saving never raises out of the scoring path: a folder that cannot be created or written, or a
full disk, raises ``EvidenceError`` with the reason, which the daemon logs, counts and reports
while the alarm goes out without evidence. ``path_of`` serves only files this store wrote (or
found at start) and still keeps: no ``..``, no ``/``, no other names.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from moleflow.config.serving import EvidenceConfig
from moleflow.errors import MoleflowError

log = logging.getLogger("moleflow.evidence")
KINDS = ("frame", "overlay")
_NAME = re.compile(r"^([A-Za-z0-9._-]+)-(frame|overlay)\.jpg$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class EvidenceError(MoleflowError, OSError):
    """Evidence files cannot be written (the reason is in the message)."""


def safe_part(text: str, limit: int = 64) -> str:
    """``text`` with every character outside [A-Za-z0-9._-] replaced by '_', at most ``limit``
    long, never empty and never only dots."""
    out = re.sub(r"\.{2,}", "_", _UNSAFE.sub("_", str(text)))[:limit]
    return out if out.strip(".") else (out.replace(".", "_") or "_")


def stamp(t: float) -> str:
    """UTC time as ``YYYYmmddTHHMMSS.mmmZ`` (sorts as the time does)."""
    ms = min(int((t % 1) * 1000), 999)
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(int(t))) + f".{ms:03d}Z"


@dataclass
class Item:
    """One alarm's evidence: its files, their bytes and when they were written."""
    stem: str
    files: list[str]
    size: int
    written: float

    def entry(self) -> dict:
        return {"stem": self.stem, "files": list(self.files), "bytes": self.size,
                "time": self.written}


class EvidenceStore:
    def __init__(self, cfg: EvidenceConfig) -> None:
        self.cfg = cfg
        self.folder = Path(cfg.folder) if cfg.folder else None
        self._lock = threading.Lock()
        self._items: OrderedDict[str, Item] = OrderedDict()  # oldest first
        self._files: dict[str, str] = {}                     # file name -> its item's stem
        self.saved = self.pruned = self.failed = 0
        self._last = ("", 0)  # the last name's base and suffix number
        if self.folder is not None:
            self._adopt()

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def _adopt(self) -> None:
        """Take the evidence an earlier run left in the folder under this store's bounds."""
        try:
            found = [(p.stat().st_mtime, p.stat().st_size, p.name)
                     for p in self.folder.iterdir() if _NAME.match(p.name) and p.is_file()]
        except OSError:  # no folder yet (save() creates it) or unreadable: say so now
            parent = next((p for p in self.folder.parents if p.exists()), Path("/"))
            if self.folder.exists() or not os.access(parent, os.W_OK | os.X_OK):
                log.warning("evidence.folder %s cannot be used (%s is not writable): alarms "
                            "will go out without evidence files", self.folder,
                            self.folder if self.folder.exists() else parent)
            return
        for tmp in self.folder.glob(".*.jpg.tmp"):  # a write cut short by a crash
            _unlink(tmp)
        for mtime, size, name in sorted(found):
            stem = _NAME.match(name).group(1)
            item = self._items.get(stem)
            if item is None:
                item = self._items[stem] = Item(stem, [], 0, mtime)
            item.files.append(name)
            item.size += size
            self._files[name] = stem
        with self._lock:
            self._prune(time.time())

    # ----- writing ----------------------------------------------------------------------------
    def encode(self, image_bgr: np.ndarray) -> bytes:
        """JPEG bytes at ``evidence.jpeg_quality``."""
        ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY,
                                                   self.cfg.jpeg_quality])
        if not ok:
            raise EvidenceError(f"cannot encode a {image_bgr.shape} image as JPEG")
        return buf.tobytes()

    def save(self, camera: str, frame_id: str, images: dict[str, np.ndarray | bytes],
             when: float | None = None) -> dict[str, str]:
        """Write the alarm's images (``{"frame": bgr, "overlay": bgr}``, arrays or JPEG bytes);
        returns ``{kind: file name}``. EvidenceError (nothing left half-written) when it
        cannot."""
        if self.folder is None:
            raise EvidenceError("evidence.folder is empty: evidence is switched off")
        when = time.time() if when is None else when
        encoded = {kind: img if isinstance(img, bytes) else self.encode(img)
                   for kind, img in images.items()}
        with self._lock:
            base = f"{safe_part(camera)}-{safe_part(frame_id or 'frame')}-{stamp(when)}"
            # a name is never given twice, even after retention dropped its first owner
            n = self._last[1] if self._last[0] == base else 0  # suffixes this base was given
            while True:
                n += 1
                stem = base if n == 1 else f"{base}-{n}"
                if stem not in self._items:  # nor kept from an earlier run
                    break
            self._last = (base, n)
            names = {kind: f"{stem}-{kind}.jpg" for kind in encoded}
            written: list[Path] = []
            path = self.folder
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                for kind, data in encoded.items():
                    path = self.folder / names[kind]
                    _write(path, data)
                    written.append(path)
            except OSError as exc:
                for done in written:
                    _unlink(done)
                self.failed += 1
                raise EvidenceError(f"evidence.folder: cannot write {path} "
                                    f"({exc.strerror or exc})") from exc
            self._items[stem] = Item(stem, list(names.values()),
                                     sum(len(d) for d in encoded.values()), when)
            self._files.update((name, stem) for name in names.values())
            self.saved += 1
            self._prune(time.time())
        return names

    def _prune(self, now: float) -> None:
        """Drop whole alarms, oldest first, while any bound is exceeded (lock held)."""
        files = sum(len(i.files) for i in self._items.values())
        size = sum(i.size for i in self._items.values())
        while self._items:
            oldest = next(iter(self._items.values()))
            if (files <= self.cfg.max_files and size <= self.cfg.max_bytes
                    and now - oldest.written <= self.cfg.max_age_s):
                break
            del self._items[oldest.stem]
            for name in oldest.files:
                self._files.pop(name, None)
                _unlink(self.folder / name)
            files -= len(oldest.files)
            size -= oldest.size
            self.pruned += 1

    # ----- reading (the web page) -------------------------------------------------------------
    def path_of(self, name: str) -> Path | None:
        """The file called ``name`` if this store wrote it and still keeps it, else None."""
        if self.folder is None or not isinstance(name, str) or not _NAME.match(name) \
                or ".." in name:
            return None
        with self._lock:
            self._prune(time.time())
            if name not in self._files:
                return None
        path = self.folder / name
        return path if path.is_file() else None

    def recent(self, limit: int = 50) -> list[dict]:
        """The newest alarms' evidence first: ``{stem, files, bytes, time}``."""
        with self._lock:
            self._prune(time.time())
            items = list(self._items.values())[-limit:] if limit > 0 else []
        return [i.entry() for i in reversed(items)]

    def usage(self) -> dict:
        """Files and bytes kept, alarms saved, pruned and failed since the start."""
        with self._lock:
            return {"files": len(self._files), "bytes": sum(i.size for i in self._items.values()),
                    "saved": self.saved, "pruned": self.pruned, "failed": self.failed}


def _write(path: Path, data: bytes) -> None:
    """Write through a temporary name, so a full disk leaves no truncated JPEG."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError:
        _unlink(tmp)
        raise


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
