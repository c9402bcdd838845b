"""pistreaming: low-latency camera streaming to web browsers (MPEG-1 over WebSockets)."""

__version__ = "0.1.0"
