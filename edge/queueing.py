"""The frames waiting to be scored: one bounded queue, fair between cameras.

Each camera has its own FIFO (its frames keep their order); workers take frames round-robin
over the cameras that have any, so a camera sending at 450 fps cannot starve one sending at
5 fps. When the total reaches its bound the oldest frame of the camera with the most waiting is
dropped: the flood pays for itself. Which camera names are admitted at all is bounded too
(``ingest.cameras`` or the first ``ingest.max_cameras`` names seen), which also bounds the
metric series labelled by camera. Not thread-safe by itself: the daemon holds its condition.
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar
from collections.abc import Hashable

T = TypeVar("T")
UNPARSED = "?"  # messages whose header names no camera: admitted, so decoding reports them


class FairQueue(Generic[T]):
    def __init__(self, size: int, cameras: list[str] | tuple[str, ...] = (),
                 max_cameras: int = 64) -> None:
        self.size, self.allowed, self.max_cameras = size, frozenset(cameras), max_cameras
        self._queues: collections.OrderedDict[Hashable, collections.deque[T]] = \
            collections.OrderedDict()
        self._seen: set[str] = set()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def cameras(self) -> list[str]:
        """The camera names admitted so far."""
        return list(self._seen)

    def admits(self, camera: str) -> bool:
        """Whether frames of ``camera`` are accepted (remembering it if there is room)."""
        if camera == UNPARSED or camera in self._seen:
            return True
        if self.allowed:
            ok = camera in self.allowed
        else:
            ok = len(self._seen) < self.max_cameras
        if ok:
            self._seen.add(camera)
        return ok

    def put(self, camera: str, item: T) -> T | None:
        """Append ``item``; returns the item dropped to make room, if any."""
        dropped = None
        if self._count >= self.size:
            longest = max(self._queues, key=lambda c: len(self._queues[c]))
            dropped = self._pop(longest)
        self._queues.setdefault(camera, collections.deque()).append(item)
        self._count += 1
        return dropped

    def take(self, n: int) -> list[T]:
        """Up to ``n`` items, one camera after another (round-robin)."""
        out: list[T] = []
        while len(out) < n and self._queues:
            camera = next(iter(self._queues))
            out.append(self._pop(camera))
            if camera in self._queues:
                self._queues.move_to_end(camera)
        return out

    def _pop(self, camera: Hashable) -> T:
        queue = self._queues[camera]
        item = queue.popleft()
        if not queue:
            del self._queues[camera]
        self._count -= 1
        return item
