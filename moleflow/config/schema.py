"""The one typed configuration schema of MoLE-Flow Edge, validated at start.

Each section is a frozen dataclass whose fields carry a description and bounds in their
metadata. ``load_config`` reads ``config.yaml``, rejects unknown keys, checks every value and
names the offending key (``model.lora_rank: must be >= 1, got 0``). Torch-free on purpose: the
edge daemon validates the same file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moleflow.config.serving import (
    EnginesConfig,
    EvidenceConfig,
    IngestConfig,
    LoggingConfig,
    MetricsConfig,
    MqttConfig,
    SparkplugConfig,
    SpoolConfig,
)
from moleflow.config.training import (
    PRESETS,
    BackboneConfig,
    CalibrationConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RouterConfig,
    TrainConfig,
)


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
    sparkplug: SparkplugConfig = field(default_factory=SparkplugConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def resolved_model(self) -> ModelConfig:
        """The model section with its preset's switches applied."""
        return dataclasses.replace(self.model, **PRESETS[self.model.preset])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
