"""The daemon served on this machine, for ``moleflow demo`` and ``moleflow bench-daemon``.

``served()`` starts an MQTT broker on a free loopback port, writes a config pointing the
daemon at it and at one camera socket, starts ``moleflow serve`` as a child process (as systemd
would), subscribes a listener and waits for the retained ``online`` status; on exit it stops
all three. ``Mosquitto`` is also what the integration tests run. No torch.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator

import yaml

from moleflow.config import Config
from moleflow.errors import MoleflowError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_path() -> str | None:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    return exe if Path(exe).exists() else None


class Mosquitto:
    """Mosquitto on a free loopback port; ``persistence`` keeps sessions across a restart."""

    def __init__(self, folder: Path, persistence: bool = False) -> None:
        exe = mosquitto_path()
        if exe is None:
            raise MoleflowError("the mosquitto broker is not installed (apt-get install "
                                "mosquitto)")
        self.exe, self.port = exe, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        if persistence:
            lines += ["persistence true", f"persistence_location {folder}/",
                      "autosave_interval 1"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise MoleflowError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def start_broker(folder: Path, embedded_ok: bool):
    """Mosquitto when installed, else (if ``embedded_ok``) the embedded broker; both have
    ``.port`` and ``.stop()``."""
    if mosquitto_path() is not None or not embedded_ok:
        return Mosquitto(folder).start()
    from moleflow.devtools.minibroker import MiniBroker
    broker = MiniBroker("127.0.0.1", free_port())
    broker.start()
    return broker


class Served(int):
    """What ``served()`` yields: the camera socket's port (callers use it as the int it is),
    with the daemon's process and folder, so tools that watch the daemon from outside (``moleflow
    fuzz``, ``moleflow soak``) can read its pid's /proc entries and its log."""

    daemon: subprocess.Popen
    folder: Path

    @classmethod
    def of(cls, port: int, daemon: subprocess.Popen, folder: Path) -> Served:
        out = cls(port)
        out.daemon, out.folder = daemon, folder
        return out


@dataclass(frozen=True)
class Service:
    """What ``served()`` serves: an engine set with ``cfg`` (``settings`` override whole config
    sections), one ``pattern`` (rep/pull/sub) camera socket, the device id of its topics; the
    config and the daemon's log go to ``folder``. ``embedded_ok``: without Mosquitto, the
    demo's embedded broker will do."""

    engines: Path
    cfg: Config
    folder: Path
    pattern: str = "pull"
    device_id: str = "dev"
    settings: dict[str, dict] | None = None
    embedded_ok: bool = False

    def write_config(self, broker_port: int, camera_port: int) -> Path:
        conf = self.cfg.to_dict()
        conf["engines"]["path"] = str(self.engines)
        conf["mqtt"].update(port=broker_port, device_id=self.device_id)
        conf["ingest"]["endpoints"] = [f"{self.pattern}+tcp://127.0.0.1:{camera_port}"]
        conf["spool"]["path"] = str(self.folder / "alarms.sqlite")
        conf["evidence"]["folder"] = str(self.folder / "evidence")
        conf["metrics"]["port"] = 0
        for section, values in (self.settings or {}).items():
            conf[section].update(values)
        path = self.folder / "config.yaml"
        path.write_text(yaml.safe_dump(conf, sort_keys=False))
        return path


@contextlib.contextmanager
def served(service: Service, topics: list[tuple[str, int]],
           on_message: Callable[[str, bytes], None]) -> Iterator[Served]:
    """Serve ``service``; yields its camera port (a ``Served``: also the daemon's process).

    ``on_message(topic, payload)`` gets every message on ``topics`` (filters under
    ``moleflow/<device_id>/``) on the listener's thread. The daemon's log is
    ``folder/daemon.log``.
    """
    import paho.mqtt.client as mqtt
    folder = service.folder
    folder.mkdir(parents=True, exist_ok=True)
    broker = start_broker(folder, service.embedded_ok)
    zport = free_port()
    config = service.write_config(broker.port, zport)
    log_path = folder / "daemon.log"
    log_file = open(log_path, "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "moleflow.cli", "serve", "--config",
                               str(config)], stdout=log_file, stderr=subprocess.STDOUT)
    online = threading.Event()
    root = f"moleflow/{service.device_id}"

    def receive(client, userdata, msg):
        if msg.topic == f"{root}/status":
            if json.loads(msg.payload).get("state") == "online":
                online.set()
        else:
            on_message(msg.topic, msg.payload)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = receive
    client.on_connect = lambda c, *a: c.subscribe(
        [(f"{root}/{t}", q) for t, q in topics] + [(f"{root}/status", 1)])
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        if not online.wait(180):
            raise MoleflowError(f"the daemon did not come online: "
                                f"{log_path.read_text()[-2000:]}")
        yield Served.of(zport, daemon, folder)
    finally:
        client.loop_stop()
        client.disconnect()
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            raise MoleflowError("the daemon did not stop within 60 s of SIGTERM: "
                                + log_path.read_text()[-3000:]) from None
        finally:
            log_file.close()
            broker.stop()
