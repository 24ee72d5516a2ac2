"""Shipped scorecards (YAML): see atp.scorecard."""
