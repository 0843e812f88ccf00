"""Circuit breaking: the pure state machine, the async breaker, its middleware and registry."""
