"""Rate limiting: quotas, the reference algorithms, the limiter and its middleware."""
