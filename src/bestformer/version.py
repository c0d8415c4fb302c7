"""The package version, at the ground floor so that every module can stamp the files it writes with it."""

__version__ = "0.2.0"
