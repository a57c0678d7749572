"""The AUTOMATIC1111 web UI dialect under /sdapi/v1 (routes, request models, samplers, translation)."""
