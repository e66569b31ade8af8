"""ratelimit: Envoy global rate-limit service (RLS) sidecar — shared budgets counted in Redis."""
