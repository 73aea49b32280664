"""Alarms wait on disk while the broker is away: a small SQLite queue, oldest first.

An alarm is written here before it is published, and deleted only when the broker has
acknowledged it (QoS 1 PUBACK). A crash or a broker outage therefore loses no alarm; at worst
one is delivered twice (SCADA sees the same frame id again). Every failure of the file
(a full disk, an I/O error) raises ``SpoolError`` naming it, so the publisher can still
deliver the alarm from memory and report the fault.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from moleflow.errors import MoleflowError


class SpoolError(MoleflowError, RuntimeError):
    """The spool file cannot be opened or written."""


class AlarmSpool:
    def __init__(self, path: Path | str, max_alarms: int = 100000) -> None:
        self.path, self.max_alarms = Path(path), max_alarms
        self.dropped = 0
        self._lock = threading.Lock()
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS alarms (id INTEGER PRIMARY KEY "
                             "AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL)")
        except (sqlite3.Error, OSError) as exc:
            raise SpoolError(f"spool.path {path}: cannot open the alarm spool ({exc})") from exc

    def put(self, topic: str, payload: bytes) -> int:
        """Store an alarm; returns its id. Beyond ``max_alarms`` the oldest are dropped (added
        to ``dropped``; the caller reports them). SpoolError when the file cannot be written
        (a full disk): the caller still has the alarm and must deliver it another way."""
        with self._lock:
            try:
                cur = self._db.execute("INSERT INTO alarms (topic, payload) VALUES (?, ?)",
                                       (topic, payload))
                excess = self._count() - self.max_alarms
                if excess > 0:
                    self._db.execute("DELETE FROM alarms WHERE id IN (SELECT id FROM alarms "
                                     "ORDER BY id LIMIT ?)", (excess,))
                    self.dropped += excess
                return int(cur.lastrowid)
            except (sqlite3.Error, OSError) as exc:
                raise SpoolError(f"spool {self.path}: cannot store an alarm ({exc})") from exc

    def pending(self, limit: int = 1000) -> list[tuple[int, str, bytes]]:
        """The oldest waiting alarms, in order."""
        with self._lock:
            try:
                return list(self._db.execute("SELECT id, topic, payload FROM alarms ORDER BY id "
                                             "LIMIT ?", (limit,)))
            except (sqlite3.Error, OSError) as exc:
                raise SpoolError(f"spool {self.path}: cannot read alarms ({exc})") from exc

    def ack(self, alarm_id: int) -> None:
        """Forget a delivered alarm. SpoolError if the delete fails (the alarm then stays
        and is delivered again later: twice rather than never)."""
        with self._lock:
            try:
                self._db.execute("DELETE FROM alarms WHERE id = ?", (alarm_id,))
            except (sqlite3.Error, OSError) as exc:
                raise SpoolError(f"spool {self.path}: cannot remove alarm {alarm_id} "
                                 f"({exc})") from exc

    def __len__(self) -> int:
        with self._lock:
            try:
                return self._count()
            except (sqlite3.Error, OSError) as exc:
                raise SpoolError(f"spool {self.path}: cannot count alarms ({exc})") from exc

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM alarms").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
