"""asyncflow: stream processing on asyncio (public API is re-exported here)."""

__version__ = "0.1.0"
