"""Offline work that is not part of the atp library (not in the wheel): training-data
generation, training and evaluation scripts, and the committed state of long training runs
(``runs/``). Run the scripts from the repository root with ``python -m training.<...>``."""
