"""edge package (see ARCHITECTURE.md)."""
