"""Patient import: OpenKBP (npz, CSV folder), DICOM (CT + RTSTRUCT), embedded phantom.

``load_patient(path)`` picks the reader from what the path holds.
"""

from atp.io.loader import load_patient

__all__ = ["load_patient"]
