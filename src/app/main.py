"""`uvicorn app.main:app`: the same application as `uvicorn imagegen.main:app` (see imagegen/main.py).

The app is built on first access, from the environment and .env, exactly as imagegen.main builds it:
importing this module reads no settings."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        import imagegen.main

        application = imagegen.main.app
        globals()["app"] = application
        return application
    raise AttributeError(name)
