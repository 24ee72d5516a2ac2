"""sequencer stage of atp (see ARCHITECTURE.md)."""
