"""The package version, read by setup.cfg and written into every output's provenance."""

__version__ = "0.1.0"
