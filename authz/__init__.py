"""authz: Envoy ext_authz (gRPC) sidecar — who is calling, and may they call this API."""
