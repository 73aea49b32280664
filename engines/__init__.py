"""engines package (see ARCHITECTURE.md)."""
