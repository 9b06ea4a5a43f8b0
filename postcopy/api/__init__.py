"""The VMM's control API: `vmm serve` (server.py) over a VmmService (service.py), its request
records (models.py) and its client (client.py). Documented in docs/api.md."""
