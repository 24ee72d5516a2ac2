"""predictor stage of atp (see ARCHITECTURE.md)."""
