"""Goal-list language: schema, YAML loading, institution overlays, resolution, evaluation."""
