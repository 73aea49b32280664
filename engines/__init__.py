"""engines package (see docs/architecture.md)."""
