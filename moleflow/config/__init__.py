"""The one typed configuration of MoLE-Flow Edge (torch-free: the daemon validates the same file).

``options`` (``opt``, ``ConfigError``) → ``training`` / ``serving`` sections → ``schema.Config``
→ ``loading`` (YAML, overrides, checks, the documented default file).
"""

from moleflow.config.loading import describe, documented_yaml, load_config, parse_config
from moleflow.config.options import ConfigError, opt
from moleflow.config.schema import Config
from moleflow.config.serving import (EnginesConfig, EvidenceConfig, IngestConfig, LoggingConfig,
                                     MetricsConfig, MqttConfig, SpoolConfig)
from moleflow.config.training import (PRESETS, BackboneConfig, CalibrationConfig, DataConfig,
                                      EvalConfig, ModelConfig, RouterConfig, TrainConfig)

__all__ = ["PRESETS", "BackboneConfig", "CalibrationConfig", "Config", "ConfigError", "DataConfig",
           "EnginesConfig", "EvalConfig", "EvidenceConfig", "IngestConfig", "LoggingConfig",
           "MetricsConfig", "ModelConfig", "MqttConfig", "RouterConfig", "SpoolConfig",
           "TrainConfig", "describe", "documented_yaml", "load_config", "opt", "parse_config"]
