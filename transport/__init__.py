"""The KV hand-off between the prefill and decode processes: a shared pinned-memory
region with slots, generations, leases and per-layer readiness (docs/transport.md),
plus the gRPC fetch fallback's two halves (transport.fetch).

Import the submodules directly; this package imports neither torch nor grpc.
"""
