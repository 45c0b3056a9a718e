"""kinema: an open video generation engine."""

__version__ = "0.1.0"
