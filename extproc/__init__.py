"""extproc: Envoy ext_proc sidecar — API version transforms and protocol translation of bodies."""
