"""ASGI plumbing both sides share: types, problem+json early responses."""
