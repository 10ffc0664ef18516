"""`python -m demos [--host H] [--port P] [--allow-host NAME ...]`: serve the five demo MCP servers."""

import argparse
import os

import uvicorn

from demos.app import SERVERS, build_app


def main() -> None:
    """Parse the command line and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m demos", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "3011")), help="default: $PORT or 3011")
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also accept requests whose Host is NAME:<port> (loopback names always are); repeatable",
    )
    args = parser.parse_args()
    for name in SERVERS:
        print(f"{name}: http://{args.host}:{args.port}/{name}/mcp", flush=True)
    uvicorn.run(build_app(args.allow_host), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
