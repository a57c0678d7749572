"""The `imagegen` command. Cheap to start: nothing here imports torch, and settings are read only
by the commands that need them."""

from __future__ import annotations

import argparse
import errno
import socket
import sys

from imagegen import __version__


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def cmd_serve(args: argparse.Namespace) -> int:
    from imagegen.config import SettingsError, load_settings

    overrides = {key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None}
    try:
        settings = load_settings(**overrides)
    except SettingsError as error:
        print(f"imagegen: {error}", file=sys.stderr)
        return 2
    if _port_in_use(settings.host, settings.port):
        print(
            f"imagegen: port {settings.port} is already in use (a previous instance?). Find the process with "
            f"`lsof -ti:{settings.port}` or `ss -ltnp 'sport = :{settings.port}'`, stop it, or choose "
            "another port with --port / SD_PORT.",
            file=sys.stderr,
        )
        return 1

    import uvicorn

    from imagegen.main import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        access_log=False,  # the service logs one line per request itself (path only, with request id)
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
        proxy_headers=True,
    )
    uvicorn.Server(config).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagegen",
        description="Self-hosted image generation service: Stable Diffusion, FLUX (local) and the BFL API "
        "behind one HTTP API. Settings come from SD_* environment variables and .env.",
    )
    parser.add_argument("--version", action="version", version=f"imagegen {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP service (default 0.0.0.0:7860)")
    serve.add_argument("--host", help="address to bind (overrides SD_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (overrides SD_PORT)")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
