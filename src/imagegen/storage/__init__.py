"""The output store: server-chosen names, embedded metadata, catalog, retention, disk usage."""
