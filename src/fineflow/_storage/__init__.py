"""Rate-limit storages: the protocol, memory, PostgreSQL."""
