"""MoLE-Flow Edge: continual visual anomaly detection, trained on a workstation, served on the edge.

This package is the torch-free core every side shares (version, errors, configuration, camera
conditions, data reading, scoring maths, the engine-set manifest, calibrated decisions,
evaluation measures). The sides install beneath it from the design card's top-level folders:
``moleflow.train`` (``train/``), ``moleflow.engines`` (``engines/``), ``moleflow.calibration``
(``calibration/``), ``moleflow.edge`` (``edge/``) and ``moleflow.devtools`` (``devtools/``); the
command line, ``moleflow.cli``, sits on top. Import contracts: ``tests/test_imports.py``.
"""

__version__ = "0.2.0"
