"""calibration package (see ARCHITECTURE.md)."""
