"""RedisStorage: rate-limit state in Redis or Valkey, standalone or Cluster."""
