"""The HTTP edge: thin routes translating HTTP to engine calls. Never imports torch."""
