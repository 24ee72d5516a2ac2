"""optimizer stage of atp (see ARCHITECTURE.md)."""
