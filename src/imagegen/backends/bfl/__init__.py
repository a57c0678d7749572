"""The `flux-api` backend: Black Forest Labs' cloud API (backend, HTTP client, per-model rules, key
health). Pure HTTP: no torch here."""
