"""The `imagegen` subcommands. cli.py imports each one only when it runs, so `imagegen --help`
never pays for torch, FastAPI or httpx."""
