"""nvr-guard: retention and export enforcement for video-recorder hosts."""

__version__ = "0.1.0"
