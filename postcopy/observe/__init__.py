"""Seeing a migration: per-fault records, sampled series, the timeline dict, Prometheus metrics.

Everything here is gathered cheaply on the hot path (appends to typed arrays owned by one
thread) and turned into JSON-able arrays or exposition text only when someone asks."""
