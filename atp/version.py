"""atp's version, importable by any module without importing the package facade."""

__version__ = "0.1.0"
