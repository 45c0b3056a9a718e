"""``kinema serve``: the HTTP API and web page on one port (FastAPI + uvicorn).

Wired into ``kinema.cli`` with ``add_serve(sub)``; also runnable alone as
``python -m kinema.serve.cli [--host ...] [--port ...] ...``.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import math
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "kinema" / "serve"


def add_serve(sub: Any) -> None:
    from kinema.cli import add_device_args, add_lora_arg

    p = sub.add_parser("serve", help="OpenAI-compatible Videos API and web page")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="model folder or name (default: kinema-tiny)")
    p.add_argument("--data-dir", type=Path, default=None, help="job queue and outputs")
    p.add_argument("--api-key", default=os.environ.get("KINEMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (or $KINEMA_API_KEY)")  # fmt: skip
    add_device_args(p, quiet=False)
    add_lora_arg(p)
    p.add_argument("--max-queue", type=int, default=32, help="queued + running jobs before 429")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="per uploaded file")
    p.add_argument("--max-seconds", type=float, default=60.0, help="longest clip a request gets")
    p.add_argument("--retention-hours", type=float, default=168.0, help="then jobs expire")
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="a job's estimated peak beyond the weights (default: free memory "
                   "once the model is loaded); larger requests get 400")  # fmt: skip
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    p.set_defaults(run=run_serve)


def settings_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~kinema.serve.app.ServeSettings` of parsed arguments (ValueError if bad)."""
    from kinema.serve.app import ServeSettings

    if not 0 <= args.port <= 65535:
        raise ValueError(f"port {args.port} must be in 0..65535")
    for name in ("max_queue", "max_upload_mb", "max_seconds", "retention_hours"):
        if not math.isfinite(value := getattr(args, name)) or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be > 0 (and finite)")
    if args.retention_hours * 3600 < 1:  # it was kept as 0 s: every video gone as it completed
        raise ValueError(f"--retention-hours {args.retention_hours:g} is under a second; "
                         f"valid: >= {1 / 3600:.6f} (one second)")  # fmt: skip
    from kinema.offload import check_policy

    check_policy(args.offload, "--offload")
    gb = args.max_memory_gb
    if gb is not None and not (math.isfinite(gb) and gb > 0):
        raise ValueError(f"--max-memory-gb {gb} must be > 0 (and finite)")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key must not be empty")
    return ServeSettings(
        data_dir=(args.data_dir or default_data_dir()).expanduser(), model=args.model,
        device=args.device, dtype=args.dtype, offload=args.offload, compile=args.compile,
        api_key=args.api_key, lora=tuple(args.lora),
        max_queue=args.max_queue,
        max_upload_bytes=int(args.max_upload_mb * 2**20), max_seconds=args.max_seconds,
        retention_s=int(args.retention_hours * 3600),
        max_memory_bytes=None if gb is None else int(gb * 2**30),
    )  # fmt: skip


def check_address(host: str, port: int) -> int:
    """Raise ValueError unless this machine can listen on ``host``:``port`` (an unknown host,
    or a port another server holds), before the model is loaded. Returns the port: for port
    0, one the system has free."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ValueError(f"--host {host!r} is not an address here ({err.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as err:
            taken = err.errno == errno.EADDRINUSE
            hint = "another server holds it: choose another --port" if taken else (
                "is --host an address of this machine?"
            )  # fmt: skip
            raise ValueError(f"cannot listen on {host}:{port}: {err.strerror} ({hint})") from None
        return probe.getsockname()[1]


def check_data_dir(data_dir: Path) -> None:
    """Raise ValueError, before the model loads, for a --data-dir the server could not keep
    its jobs in: a file, not writable, or holding a ``jobs`` / ``staging`` that is not a
    folder or a ``jobs.sqlite3`` that is not SQLite."""
    from kinema.io.paths import check_folder

    check_folder(data_dir, "--data-dir")
    for sub in ("jobs", "staging"):
        if (data_dir / sub).exists() and not (data_dir / sub).is_dir():
            raise ValueError(f"--data-dir {data_dir} holds a file named {sub}, where the server "
                             "keeps a folder: move it away or give another --data-dir")  # fmt: skip
    db = data_dir / "jobs.sqlite3"
    if db.exists():
        try:
            with db.open("rb") as f:
                sqlite = f.read(16) == b"SQLite format 3\x00"
        except OSError as err:
            message = f"--data-dir {data_dir}: cannot read {db.name}: {err.strerror}"
            raise ValueError(message) from None
        if not sqlite and db.stat().st_size:
            raise ValueError(f"{db} is not a kinema job database (not SQLite): move it away or "
                             "give another --data-dir")  # fmt: skip


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kinema.serve.app import create_app

    settings = settings_from_args(args)
    check_data_dir(settings.data_dir)
    port = check_address(args.host, args.port)  # --port 0: the free one, printed below
    if not is_loopback(args.host) and settings.api_key is None:
        print(f"kinema: warning: serving on {args.host} without --api-key", file=sys.stderr)
    app = create_app(settings)
    print(f"kinema: serving {settings.model_id} on http://{args.host}:{port} "
          f"(data in {settings.data_dir})", file=sys.stderr)  # fmt: skip
    uvicorn.run(app, host=args.host, port=port, log_level=args.log_level)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kinema.serve.cli ARGS``: the same as ``kinema serve ARGS``."""
    from kinema.cli import Parser, fail

    parser = Parser(prog="kinema")
    add_serve(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.run(args)
    except ValueError as err:
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)


if __name__ == "__main__":
    raise SystemExit(main())
