"""The version of pagedkv, in the one place it is written."""

__version__ = "0.1.0"
