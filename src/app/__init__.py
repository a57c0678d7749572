"""`app`: the operator spec's start command, `uvicorn app.main:app --host 0.0.0.0 --port 7860`, runs
unchanged. The service itself is the `imagegen` package; `app.main` only re-exports its app."""
