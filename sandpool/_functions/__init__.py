"""Cloudpickled callables on a warm pool: remote functions, streaming map, the pool, its slots and
calls, bulk transfer and serialization."""
