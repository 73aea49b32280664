"""The edge side's sections: cameras, engines, MQTT, spool, evidence, metrics, logging."""

from __future__ import annotations

from dataclasses import dataclass

from moleflow.config.options import opt


@dataclass(frozen=True)
class IngestConfig:
    endpoints: list = opt(["rep+tcp://127.0.0.1:5555"], "camera sockets as pattern+address: rep "
                          "(binds; imagezmq's default REQ senders), pull (binds; PUSH senders), "
                          "sub (connects to a PUB sender's address). Loopback by default: "
                          "cameras on other hosts need 0.0.0.0 and should use CURVE "
                          "(curve_secret_key)", item=str)
    max_message_bytes: int = opt(32 << 20, "largest frame message accepted; larger ones are "
                                 "dropped and reported", min=1024)
    max_side: int = opt(8192, "largest frame width or height accepted", min=16)
    max_pixels: int = opt(25_000_000, "largest frame area (width x height) accepted, checked "
                          "before decoding", min=256)
    queue_size: int = opt(16, "frames waiting to be scored; when full the oldest is dropped",
                          min=1, max=10000)
    max_batch: int = opt(4, "frames one scoring worker takes together when several wait",
                         min=1, max=64)
    cameras: list = opt([], "camera names accepted (empty: any, up to max_cameras); frames "
                        "from others are refused and reported", item=str, empty_ok=True)
    max_cameras: int = opt(64, "distinct camera names accepted when 'cameras' is empty; later "
                           "names are refused and reported (bounds the metric series)",
                           min=1, max=10000)
    max_connections: int = opt(256, "open camera connections at most over all sockets; "
                               "more are refused at the handshake and reported", min=1)
    curve_secret_key: str | None = opt(None, "ZeroMQ CURVE: this server's secret key file "
                                       "(moleflow keys); null: no encryption or client "
                                       "authentication")
    curve_clients: str | None = opt(None, "ZeroMQ CURVE: folder of the allowed cameras' public "
                                    "key files (*.key)")
    products: list = opt([], "camera=product pairs: that camera's frames are scored by that "
                         "expert instead of routed (a frame's own product hint still wins); "
                         "changed at run time on <prefix>/<device_id>/cmd/product",
                         item=str, empty_ok=True, check="camera_products")


@dataclass(frozen=True)
class EnginesConfig:
    path: str | None = opt(None, "engine-set folder (manifest.json) the daemon serves")
    backend: str = opt("onnxruntime", "runtime back end", choices=("onnxruntime", "tensorrt"))
    precision: str = opt("fp32", "which graphs to run (tensorrt: the built plans' precision)",
                         choices=("fp32", "fp16"))
    workers: int = opt(0, "scoring threads, each taking its own batch (0 = one per CPU core; "
                       "tensorrt always runs one)", min=0, max=256)
    threads: int = opt(0, "onnxruntime threads per graph run (0 = CPU cores / workers)",
                       min=0, max=256)


@dataclass(frozen=True)
class MqttConfig:
    host: str = opt("127.0.0.1", "MQTT broker host")
    port: int = opt(1883, "MQTT broker port", min=1, max=65535)
    prefix: str = opt("moleflow", "topic root: <prefix>/<device_id>/...", check="topic")
    device_id: str = opt("edge-1", "this device's name in the topics (one topic level)",
                         check="topic_level")
    username: str | None = opt(None, "broker user name (null: anonymous)")
    password_env: str = opt("MOLEFLOW_MQTT_PASSWORD", "environment variable holding the broker "
                                                      "password (set it in the systemd "
                                                      "environment file)")
    tls: bool = opt(False, "connect with TLS")
    ca_file: str | None = opt(None, "CA certificate for TLS (null: the system's)")
    cert_file: str | None = opt(None, "TLS client certificate (PEM) for brokers that "
                                "authenticate clients by certificate")
    key_file: str | None = opt(None, "TLS client private key (PEM) for cert_file")
    keepalive: int = opt(30, "MQTT keep-alive in seconds", min=5, max=3600)
    map_interval: float = opt(1.0, "seconds between anomaly-map PNGs per camera (0 = no maps)",
                              min=0.0)


@dataclass(frozen=True)
class SparkplugConfig:
    enabled: bool = opt(False, "also publish Sparkplug B (spBv1.0/...) on the MQTT broker, on a "
                        "connection of its own (needs the 'sparkplug' extra)")
    group_id: str = opt("moleflow", "Sparkplug group id (one topic level)", check="topic_level")
    edge_node_id: str | None = opt(None, "Sparkplug edge node id (null: mqtt.device_id)",
                                   check="topic_level")
    min_interval: float = opt(0.0, "seconds between a camera's DDATA messages (0 = one per "
                              "scored frame); anomalous frames are always sent", min=0.0)


@dataclass(frozen=True)
class SpoolConfig:
    path: str = opt("/var/lib/moleflow/alarms.sqlite", "SQLite file where alarms wait while the "
                                                       "broker is away")
    max_alarms: int = opt(100000, "alarms kept at most (oldest dropped and counted beyond)",
                          min=10)


@dataclass(frozen=True)
class EvidenceConfig:
    folder: str = opt("/var/lib/moleflow/evidence", "folder where each alarm's frame and its "
                      "overlay are kept as JPEG (served at /evidence/<name>); empty string: "
                      "no evidence files")
    max_files: int = opt(2000, "evidence files kept at most (two per alarm); the oldest alarm's "
                         "files go first", min=2)
    max_age_s: float = opt(7 * 86400.0, "evidence older than this is deleted (seconds)",
                           min=1.0)
    max_bytes: int = opt(500 << 20, "evidence files take at most this many bytes together",
                         min=1 << 20)
    publish_snapshot: bool = opt(False, "also publish each alarm's overlay JPEG on "
                                 "<camera>/snapshot (QoS 0)")
    jpeg_quality: int = opt(85, "JPEG quality of the evidence images", min=10, max=100)


@dataclass(frozen=True)
class MetricsConfig:
    port: int = opt(9108, "HTTP port of Prometheus /metrics, /healthz and the read-only web "
                    "page / (0 = off)", min=0, max=65535)
    bind: str = opt("127.0.0.1", "address the HTTP endpoint (metrics, health, web page) "
                    "listens on; it has no login: 0.0.0.0 shows it to the whole network")


@dataclass(frozen=True)
class LoggingConfig:
    level: str = opt("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    json: bool = opt(True, "one JSON object per log line (journald-friendly)")
