"""fineflow: pure ASGI middleware for distributed rate limiting and circuit breaking."""
__version__ = "0.1.0"
