"""The OpenAI Images dialect under /v1 (routes and request/response models)."""
