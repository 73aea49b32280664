"""edge package (see docs/architecture.md)."""
