"""calibration package (see docs/architecture.md)."""
