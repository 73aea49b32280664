"""The one typed configuration schema of MoLE-Flow Edge, validated at start.

Each section is a frozen dataclass whose fields carry a description and bounds in their
metadata. ``load_config`` reads ``config.yaml``, rejects unknown keys, checks every value and
names the offending key (``model.lora_rank: must be >= 1, got 0``). Torch-free on purpose: the
edge daemon validates the same file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge.errors import MoleflowError


class ConfigError(MoleflowError, ValueError):
    """A configuration problem, its message naming the key (``section.option``)."""


def opt(default: Any, help: str, *, min: float | None = None, max: float | None = None,
        choices: tuple | None = None, item: type = int, check: str | None = None,
        empty_ok: bool = False) -> Any:
    """A config field with its description and bounds (``item``: element type of a list;
    ``check``: a named value check from ``CHECKS``; ``empty_ok``: a list may be empty)."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "item": item,
            "check": check, "empty_ok": empty_ok}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


PRESETS: dict[str, dict[str, bool]] = {
    "full": {},
    "wo_lora": {"use_lora": False},
    "wo_router": {"use_router": False},
    "wo_adapter": {"use_adapter": False},
    "wo_dia": {"use_dia": False},
    "wo_tail_loss": {"use_tail_loss": False},
}
"""Ablation presets: each switches one component of the full model off."""


@dataclass(frozen=True)
class DataConfig:
    root: str | None = opt(None, "MVTec-layout folder (<class>/train/good, <class>/test/<defect>, "
                                 "<class>/ground_truth/<defect>/*_mask.png); --data overrides")
    image_size: int = opt(256, "square input size in pixels; images are resized to it",
                          min=32, max=2048)


@dataclass(frozen=True)
class BackboneConfig:
    name: str = opt("tf_efficientnet_lite0", "timm model name of the frozen feature extractor")
    weights: str | None = opt(None, "local weights file (state dict / safetensors); null: the "
                                    "packaged ImageNet weights (tf_efficientnet_lite0 only)")
    out_indices: list = opt([2, 3], "feature stages to use (timm feature indices; 2,3 = stride 8, 16)")
    local_avg: int = opt(3, "neighbourhood average kernel applied to each stage (1 = none)",
                         min=1, max=9)
    standardise_light: bool = opt(False, "each frame shifted to zero mean and scaled to a fixed "
                                         "contrast before the backbone, so that a camera's gain, "
                                         "exposure and contrast changes cancel (off: on the dev "
                                         "classes it ranks better but its calibrated thresholds "
                                         "flag fewer defects, see docs/robustness.md)")


@dataclass(frozen=True)
class ModelConfig:
    preset: str = opt("full", "ablation preset", choices=tuple(PRESETS))
    coupling_blocks: int = opt(6, "shared FrEIA AllInOneBlocks (base flow)", min=1, max=32)
    dia_blocks: int = opt(2, "task-specific affine coupling blocks after the base flow",
                          min=0, max=8)
    clamp: float = opt(1.9, "soft clamp of the coupling log-scales", min=0.1, max=10.0)
    hidden_ratio: float = opt(1.0, "subnet hidden width as a multiple of the feature width",
                              min=0.125, max=8.0)
    lora_rank: int = opt(64, "LoRA rank r", min=1, max=1024)
    lora_alpha: float = opt(64.0, "LoRA alpha of every product after the first; its adapter is "
                            "scaled by alpha / rank (1 at the default rank)", min=0.0)
    lora_alpha_first: float = opt(1.0, "LoRA alpha of the first product, whose adapter trains "
                                  "together with the shared base (research scale 1/64)", min=0.0)
    scale_context_kernel: int = opt(5, "depthwise kernel of the coupling scale context (0 = off)",
                                    min=0, max=9)
    spatial_context_kernel: int = opt(0, "depthwise kernel of the shared spatial mixer (0 = off)",
                                      min=0, max=9)
    pos_embedding: bool = opt(True, "add a fixed 2D sinusoidal positional encoding")
    adapter_layernorm: bool = opt(True, "LayerNorm over channels inside the task input adapter")
    whitening: str = opt("channel", "task input whitening: per-channel std, or full (ZCA)",
                         choices=("channel", "full"))
    whitening_shrinkage: float = opt(1e-3, "full whitening: covariance shrinkage towards its "
                                           "mean eigenvalue", min=0.0, max=1.0)
    use_lora: bool = opt(True, "per-task LoRA in the coupling subnets (preset may switch off)")
    use_router: bool = opt(True, "route by Mahalanobis distance; false = oracle task id")
    use_adapter: bool = opt(True, "per-task input adapter (whitening + FiLM)")
    use_dia: bool = opt(True, "per-task DIA coupling blocks")
    use_tail_loss: bool = opt(True, "tail-aware loss term on each image's top patch NLLs")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = opt(20, "epochs per task", min=1, max=1000)
    batch_size: int = opt(8, "images per batch of each product after the first (smaller "
                             "batches: more steps for the expert's few parameters)",
                          min=1, max=1024)
    batch_size_first: int = opt(16, "images per batch of the first product, whose training "
                                     "fits the shared base", min=1, max=1024)
    lr: float = opt(4e-3, "peak learning rate (AdamW) of each product after the first, whose "
                          "expert alone trains", min=0.0, max=1.0)
    lr_first: float = opt(1e-3, "peak learning rate of the first product, whose training fits "
                                "the shared base", min=0.0, max=1.0)
    min_lr_ratio: float = opt(0.01, "cosine schedule ends at lr * min_lr_ratio", min=0.0, max=1.0)
    warmup_epochs: int = opt(2, "linear warm-up epochs for tasks after the first", min=0)
    weight_decay: float = opt(0.01, "AdamW weight decay", min=0.0)
    grad_clip: float = opt(0.5, "gradient-norm clip", min=0.0)
    tail_weight: float = opt(0.7, "weight of the tail term (1 - it weighs the mean NLL)",
                             min=0.0, max=1.0)
    tail_ratio: float = opt(0.02, "fraction of each image's patches in the tail term",
                            min=0.0, max=1.0)
    logdet_weight: float = opt(1e-4, "weight of the mean squared log-determinant", min=0.0)
    feature_noise: float = opt(0.0, "std of Gaussian noise added to the flow input while "
                                    "training each product after the first", min=0.0)
    feature_noise_first: float = opt(0.4, "the same while training the first product, whose "
                                          "training fits the shared base (keeps it from "
                                          "memorising patches)", min=0.0)
    augment_views: int = opt(4, "random views of each training image besides the image itself "
                                "(camera jitter, light, blur, sensor noise, JPEG), features cached "
                                "per view; each epoch trains every image on one view drawn at "
                                "random (0 = no augmentation)", min=0, max=32)
    augment_jpeg_min: int = opt(60, "views are JPEG-encoded (4 in 5) at a quality drawn from this "
                                    "to 100", min=1, max=100)
    augment_photometric: float = opt(0.1, "views' brightness and contrast gains drawn in 1 +- "
                                          "this (with backbone.standardise_light, which cancels "
                                          "them, a contrast gain in 1 +- this is applied to the "
                                          "standardised input instead)", min=0.0, max=0.9)
    augment_noise: float = opt(3.0, "views' sensor-noise std drawn up to this (grey levels)",
                               min=0.0, max=50.0)
    augment_blur: float = opt(1.0, "a third of views defocused, Gaussian sigma drawn up to this "
                                   "(pixels at 256 px, scaled with data.image_size)",
                              min=0.0, max=10.0)
    augment_shift: float = opt(4.0, "views shifted by up to this many pixels on each axis (at "
                                     "256 px, scaled with data.image_size)",
                               min=0.0, max=64.0)
    augment_rotate: float = opt(3.0, "views rotated by up to this many degrees", min=0.0,
                                max=45.0)
    seed: int = opt(0, "random seed", min=0)
    threads: int = opt(0, "torch CPU threads (0 = all cores)", min=0, max=256)
    cache_features: bool = opt(True, "cache backbone features per task in <run>/cache")
    val_fraction: float = opt(0.1, "fraction of each class's train/good images held out from "
                                   "training, for calibration (thresholds, false-alarm rate)",
                              min=0.0, max=0.5)

    def augmentation(self):
        """The random views these settings describe (None: augmentation off)."""
        if self.augment_views == 0:
            return None
        from engines.conditions import Augmentation
        return Augmentation(jpeg_min=self.augment_jpeg_min, photometric=self.augment_photometric,
                            noise=self.augment_noise, blur=self.augment_blur,
                            shift=self.augment_shift, rotate=self.augment_rotate)


@dataclass(frozen=True)
class EvalConfig:
    top_k: int = opt(3, "image score = mean of the top-k patch scores", min=1)
    image_score: str = opt("standardised", "patch scores the image score averages: 'nll' (raw "
                           "patch NLL) or 'standardised' (NLL minus its mean, over its std, at "
                           "that grid position on the expert's training images)",
                           choices=("standardised", "nll"))
    smoothing_sigma: float = opt(4.0, "Gaussian sigma (pixels) of the anomaly map", min=0.0)
    anomaly_map: str = opt("likelihood", "patch values the anomaly map smooths: 'likelihood' "
                           "(1 - exp(-NLL/D), one minus the likelihood per feature dimension, "
                           "as anomalib's FastFlow and CFlow) or 'nll' (the patch NLL)",
                           choices=("likelihood", "nll"))
    aupro_max_fpr: float = opt(0.3, "FPR limit of AUPRO", min=0.01, max=1.0)
    overlays_per_class: int = opt(4, "heat-map overlay images written per class", min=0)
    batch_size: int = opt(32, "images per scoring batch", min=1)


@dataclass(frozen=True)
class RouterConfig:
    shrinkage: str = opt("ledoit_wolf", "covariance estimator", choices=("ledoit_wolf", "fixed"))
    fixed_shrinkage: float = opt(0.1, "shrinkage towards the scaled identity when 'fixed'",
                                 min=0.0, max=1.0)
    ridge: float = opt(1e-5, "added to the covariance diagonal", min=0.0)


@dataclass(frozen=True)
class CalibrationConfig:
    false_alarm_rate: float = opt(0.01, "target fraction of normal frames raised as alarms "
                                        "(sets each expert's threshold)", min=1e-4, max=0.5)
    unknown_rate: float = opt(0.005, "tail of a product's own held-out frames that each "
                                     "unknown-product limit starts from (see the two below)",
                              min=1e-4, max=0.5)
    min_images: int = opt(8, "fewest held-out normal images an expert is calibrated from",
                          min=3)
    codec: str = opt("jpeg:90", "what the held-out images pass through before thresholds and "
                     "limits are fitted, as the line's frames do: 'lossless' or 'jpeg:Q' "
                     "(OpenCV's encoder at quality Q, as imagezmq's send_jpg)",
                     check="codec")
    unknown_distance_factor: float = opt(
        4.0, "a frame is an unknown product only beyond this many times the routing-distance "
        "limit fitted at unknown_rate (defective and compressed frames of a known product move "
        "a few times as far; another product, ten times and more)", min=1.0, max=1000.0)
    unknown_typicality: float = opt(
        5.0, "... and only when its typicality (median standardised patch score under its "
        "expert) is at least this far above the held-out images' median: most of the frame is "
        "unlike the product, not a local defect", min=0.0)


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
class SpoolConfig:
    path: str = opt("/var/lib/moleflow/alarms.sqlite", "SQLite file where alarms wait while the "
                                                       "broker is away")
    max_alarms: int = opt(100000, "alarms kept at most (oldest dropped and counted beyond)",
                          min=10)


@dataclass(frozen=True)
class MetricsConfig:
    port: int = opt(9108, "Prometheus /metrics and /healthz port (0 = off)", min=0, max=65535)
    bind: str = opt("127.0.0.1", "address the metrics endpoint listens on")


@dataclass(frozen=True)
class LoggingConfig:
    level: str = opt("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    json: bool = opt(True, "one JSON object per log line (journald-friendly)")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    engines: EnginesConfig = field(default_factory=EnginesConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def resolved_model(self) -> ModelConfig:
        """The model section with its preset's switches applied."""
        return dataclasses.replace(self.model, **PRESETS[self.model.preset])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _codec_problem(value: str) -> str | None:
    from engines.conditions import ConditionError, parse_condition
    try:
        cond = parse_condition(value)
    except ConditionError as exc:
        return str(exc)
    if cond.kind not in ("lossless", "jpeg"):
        return f"must be 'lossless' or 'jpeg:Q' (Q 1..100), got {value!r}"
    return None


def _topic_level_problem(value: str) -> str | None:
    """One MQTT topic level: subscribers' wildcards and separators would make the daemon's
    topics collide with other devices' or be unpublishable."""
    bad = sorted({c for c in value if c in "/+#" or not c.isprintable() or c.isspace()})
    if not value or bad:
        return f"must be one MQTT topic level without {'/+#'} or spaces, got {value!r}"
    return None


def _topic_problem(value: str) -> str | None:
    levels = value.split("/")
    if any(_topic_level_problem(level) for level in levels):
        return (f"must be MQTT topic levels joined by '/', without wildcards (+ #), spaces "
                f"or empty levels, got {value!r}")
    return None


def meta_empty_ok(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("empty_ok"))


CHECKS = {"codec": _codec_problem, "topic_level": _topic_level_problem,
          "topic": _topic_problem}


def _check_value(key: str, f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """Check one value against its type hint and bounds; return it normalised."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required (got null)")
    base = next(a for a in args if a is not type(None)) if optional else hint
    base = typing.get_origin(base) or base
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
    elif base is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
    elif base is list:
        item = f.metadata.get("item", int)
        if not isinstance(value, list) or not (value or meta_empty_ok(f)) or not all(
                isinstance(v, item) and not isinstance(v, bool) for v in value):
            kind = "integers" if item is int else "strings"
            what = "a list" if meta_empty_ok(f) else "a non-empty list"
            raise ConfigError(f"{key}: must be {what} of {kind}, got {value!r}")
    meta = f.metadata
    if meta.get("check"):
        problem = CHECKS[meta["check"]](value)
        if problem:
            raise ConfigError(f"{key}: {problem}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, meta['choices']))}; "
                          f"got {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{key}: must be >= {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{key}: must be <= {meta['max']}, got {value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: must be a mapping of options, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown option (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], raw.get(name), key)
        elif name in raw:
            values[name] = _check_value(key, f, hints[name], raw[name])
    return cls(**values)


def parse_config(raw: dict[str, Any] | None) -> Config:
    """Validate a config mapping (as read from YAML) into a ``Config``."""
    return _build(Config, raw, "")


def load_config(path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (defaults when None), apply ``{"section.option": value}`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        section, _, option = dotted.partition(".")
        node = raw.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{section}: must be a mapping of options, got {node!r}")
        node[option] = value
    return parse_config(raw)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, description) of every option, for docs and the config.yaml test."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key)
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((key, default, f.metadata.get("help", "")))
    return rows


def documented_yaml() -> str:
    """The default configuration as commented YAML: what ``config.yaml`` at the root holds."""
    lines = ["# MoLE-Flow Edge configuration: every option with its default and meaning.",
             "# Validated at start (unknown keys and bad values are reported with their key).",
             "# Command-line flags override these keys, e.g. --epochs, --preset, "
             "--set train.lr=1e-4.", ""]
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(hints[section.name]):
            d = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if d is None or isinstance(d, bool):
                value = {None: "null", True: "true", False: "false"}[d]
            elif isinstance(d, list):
                value = f"[{', '.join(repr(v) if isinstance(v, str) else str(v) for v in d)}]"
            elif isinstance(d, str) and (not d or d[0] in "*&!|>%@`'\"{[" or ": " in d):
                value = repr(d)
            else:
                value = repr(d) if isinstance(d, float) else str(d)
            m = f.metadata
            extra = []
            if m.get("choices"):
                extra.append("one of: " + ", ".join(m["choices"]))
            if m.get("min") is not None or m.get("max") is not None:
                hi = m.get("max") if m.get("max") is not None else ""
                extra.append(f"range: {m.get('min', '')}..{hi}")
            comment = m["help"] + (f" ({'; '.join(extra)})" if extra else "")
            lines.append(f"  {f.name}: {value}  # {comment}")
        lines.append("")
    return "\n".join(lines)
