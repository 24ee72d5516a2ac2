"""Patient import: OpenKBP (npz, CSV folder), DICOM (CT + RTSTRUCT), embedded phantom.

``load_patient(path)`` picks the reader from what the path holds.
"""

__all__ = ["load_patient"]


def __getattr__(name):
    if name == "load_patient":
        # lazy: CLI start-up -- the readers import pydicom (~0.1 s, seconds on a loaded
        # machine), which importing a submodule (atp.io.openkbp, ...) does not need
        from atp.io.loader import load_patient
        return load_patient
    raise AttributeError(f"module 'atp.io' has no attribute {name!r}")
