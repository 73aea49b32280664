"""The workstation side's sections: data, backbone, model, training, evaluation, routing and
calibration."""

from __future__ import annotations

from dataclasses import dataclass

from moleflow.config.options import opt

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
        from moleflow.conditions import Augmentation
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
    light_retry: float = opt(2.0, "a frame whose light (mean grey or contrast) lies more than "
                             "this many spreads from its expert's training frames is scored "
                             "again brought to their typical light, and the lower score counts "
                             "(a camera's gain or contrast drift); 0: off. Needs image_score "
                             "'standardised' (the reference is kept with its statistics)",
                             min=0.0)
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
