"""Per-camera products and the MQTT command topics.

``ingest.products`` (``camera=product`` strings) pins a camera to one expert: its frames skip
the router. A frame's own product hint (``Frame.product``) still wins, being the more specific
information; a camera without a product, or a frame whose camera product is not an expert of
the running set, is routed as before.

Commands arrive under ``<prefix>/<device_id>/cmd/`` on the publisher's own connection
(subscribed on every connect, QoS 1):

* ``cmd/product`` ``{"camera": "cam0", "product": "bottle"}`` pins a camera at run time
  (``"product": null`` sends it back to routing); the product must be an expert of the running
  engine set and the camera a name the ingest can receive (and in ``ingest.cameras`` if that is
  set);
* ``cmd/reload`` (empty payload or a JSON object) asks for the reload SIGHUP does.

Each command, of any kind, gets one event on ``events`` (QoS 1): ``command_accepted`` or
``command_rejected`` with the reason in ``detail``; a JSON ``"id"`` in the command is echoed.
paho's callback only queues the message (bounded: a flood costs only the messages past
``MAX_WAITING``, each reported); one thread carries the commands out, none of which can end it.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from moleflow.config import Config, ConfigError
from moleflow.names import camera_products, name_problem

log = logging.getLogger("moleflow.commands")
MAX_PAYLOAD = 4096      # a command is a few dozen bytes
MAX_WAITING = 64        # commands queued while one is carried out


def parse_products(pairs: Sequence[str]) -> dict[str, str]:
    """``["cam0=bottle", ...]`` -> ``{"cam0": "bottle"}`` (a ConfigError naming the key)."""
    try:
        return camera_products(pairs)
    except ValueError as exc:
        raise ConfigError(f"ingest.products: {exc}") from exc


def check_products(cfg: Config, experts: Sequence[str]) -> None:
    """Every product of ``ingest.products`` must be an expert of the engine set: a ConfigError
    naming the camera, the product and the experts otherwise (start, reload and
    ``serve --validate-config``)."""
    for camera, product in parse_products(cfg.ingest.products).items():
        if product not in experts:
            raise ConfigError(f"ingest.products: camera {camera!r} is set to product "
                              f"{product!r}, which is not an expert of the engine set "
                              f"({', '.join(experts) or 'none'})")


class CameraProducts:
    """The camera -> product table: from the config, changed by ``cmd/product``."""

    def __init__(self, pairs: Sequence[str]) -> None:
        self._table = parse_products(pairs)
        self._lock = threading.Lock()

    def get(self, camera: str) -> str | None:
        with self._lock:
            return self._table.get(camera)

    def set(self, camera: str, product: str | None) -> None:
        with self._lock:
            if product is None:
                self._table.pop(camera, None)
            else:
                self._table[camera] = product

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            return dict(self._table)

    def hints(self, cameras: Sequence[str], hints: Sequence[str | None],
              experts: Any) -> tuple[list[str | None], list[str]]:
        """Each frame's hint, its camera's product where it has none; and the problems (a
        camera product that is not an expert of ``experts``: that frame is routed)."""
        out, problems = [], []
        for camera, hint in zip(cameras, hints):
            product = None if hint is not None else self.get(camera)
            if product is not None and product not in experts:
                problems.append(f"camera {camera}: product {product!r} is not an expert of the "
                                "running engine set; routed instead")
                product = None
            out.append(hint if hint is not None else product)
        return out, problems


class Commands:
    """Subscribes ``<root>/cmd/+`` through the publisher and carries the commands out."""

    def __init__(self, cfg: Config, publisher: Any, products: CameraProducts,
                 experts: Callable[[], list[str]], reload: Callable[[], None],
                 metrics: Any) -> None:
        self.cfg, self.publisher, self.products = cfg, publisher, products
        self.experts, self.reload, self.metrics = experts, reload, metrics
        self.root = f"{cfg.mqtt.prefix}/{cfg.mqtt.device_id}/cmd"
        self._waiting: collections.deque[tuple[str, bytes, bool]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._work, name="commands", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.publisher.subscribe(f"{self.root}/+", self._on_message)

    def stop(self) -> None:
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _on_message(self, client, userdata, msg) -> None:
        """paho's network thread: queue the command, never raise, never publish."""
        try:
            with self._lock:
                full = len(self._waiting) >= MAX_WAITING
                if not full:
                    self._waiting.append((msg.topic, bytes(msg.payload[:MAX_PAYLOAD + 1]),
                                          bool(msg.retain)))
            if full:
                self.metrics.inc("commands", result="dropped")
            self._wake.set()
        except Exception:  # noqa: BLE001 - an exception here would end paho's thread
            log.exception("command callback")

    def _work(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            while True:
                with self._lock:
                    if not self._waiting:
                        break
                    topic, payload, retained = self._waiting.popleft()
                try:
                    self.handle(topic, payload, retained)
                except Exception as exc:  # noqa: BLE001 - no command may end this thread
                    log.exception("command on %s", topic)
                    self._ack(topic.rsplit("/", 1)[-1][:64], None,
                              f"internal error: {type(exc).__name__}: {exc}")

    def handle(self, topic: str, payload: bytes, retained: bool = False) -> dict:
        """Carry out one command; publish and return its acknowledgement event."""
        name = topic.rsplit("/", 1)[-1][:64]
        body, problem = self._parse(payload)
        ident = body.get("id") if isinstance(body, dict) else None
        if ident is not None and (not isinstance(ident, (str, int)) or isinstance(ident, bool)
                                  or len(str(ident)) > 64):
            ident, problem = None, problem or "id must be a string or an integer (64 at most)"
        if retained:
            problem = "retained command ignored (publish commands without the retain flag)"
        if problem is None and name == "product":
            return self._product(body, ident)
        if problem is None and name == "reload":
            return self._reload(body, ident)
        if problem is None:
            problem = f"unknown command {name!r} (known: product, reload)"
        return self._ack(name, ident, problem)

    @staticmethod
    def _parse(payload: bytes) -> tuple[Any, str | None]:
        if len(payload) > MAX_PAYLOAD:
            return None, f"payload over {MAX_PAYLOAD} bytes"
        if not payload.strip():
            return {}, None
        try:
            body = json.loads(payload, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            return None, f"payload is not JSON ({str(exc)[:120] or type(exc).__name__})"
        if not isinstance(body, dict):
            return None, f"payload must be a JSON object, got {type(body).__name__}"
        return body, None

    def _product(self, body: dict, ident: Any) -> dict:
        unknown = sorted(set(body) - {"camera", "product", "id"})
        camera, product = body.get("camera"), body.get("product", "")
        problem = (f"unknown key {unknown[0][:64]!r} (known: camera, product, id)" if unknown
                   else "camera is missing" if camera is None
                   else name_problem(camera, "camera")
                   or ("product is missing (null: back to routing)" if product == "" else None)
                   or (None if product is None else name_problem(product, "product")))
        ingest = self.cfg.ingest
        experts = self.experts()
        if problem is None and ingest.cameras and camera not in ingest.cameras:
            problem = f"camera {camera!r} is not in ingest.cameras ({', '.join(ingest.cameras)})"
        if problem is None and product is not None and product not in experts:
            problem = (f"product {product!r} is not an expert of the running engine set "
                       f"({', '.join(experts)})")
        if (problem is None and product is not None and self.products.get(camera) is None
                and len(self.products.snapshot()) >= ingest.max_cameras):
            problem = f"ingest.max_cameras ({ingest.max_cameras}) cameras already have a product"
        if problem is not None:
            return self._ack("product", ident, problem, camera=camera)
        self.products.set(camera, product)
        log.info("camera %s: product %s", camera, product or "routed")
        return self._ack("product", ident, None, camera=camera, product=product)

    def _reload(self, body: dict, ident: Any) -> dict:
        unknown = sorted(set(body) - {"id"})
        if unknown:
            return self._ack("reload", ident, f"unknown key {unknown[0][:64]!r} (known: id)")
        self.reload()
        return self._ack("reload", ident, None)

    def _ack(self, command: str, ident: Any, problem: str | None, camera: Any = None,
             product: Any = "") -> dict:
        accepted = problem is None
        event: dict[str, Any] = {"event": "command_accepted" if accepted else "command_rejected",
                                 "command": command, "time": time.time()}
        if ident is not None:
            event["id"] = ident
        if isinstance(camera, str) and name_problem(camera, "camera") is None:
            event["camera"] = camera
        if accepted and command == "product":
            event["product"] = product
            event["detail"] = (f"camera {camera}: scored by expert {product}" if product
                               else f"camera {camera}: routed")
        elif accepted:
            event["detail"] = "reload requested (engines_reloaded or reload_failed follows)"
        else:
            event["detail"] = problem
            log.warning("command %s rejected: %s", command, problem)
        self.metrics.inc("commands", result="accepted" if accepted else "rejected")
        self.publisher.send("events", event, qos=1)
        return event


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")
