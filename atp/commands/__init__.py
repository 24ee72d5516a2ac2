"""CLI subcommands, one module each (the top floor: may import every stage)."""
