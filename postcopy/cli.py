"""`postcopy`: the post-copy migration commands. Each calls the same code the API does.

    postcopy demo     migrate a running memtouch guest over loopback and report
    postcopy source   run a guest and serve its pages (the migration source)
    postcopy dest     pull a running guest from a source and keep it running
    postcopy doctor   probe this host: KVM, userfaultfd, what a fault exit looks like
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from typing import Any

import uvloop

from postcopy.chaos import schedule_args
from vmm.memory import GuestMemoryError, parse_size

TOKEN_ENV = "POSTCOPY_TOKEN"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _pick_fault_mode(requested: str, quiet: bool) -> str:
    if requested != "auto":
        return requested
    from postcopy import doctor
    report = doctor.diagnose()
    if not quiet:
        print(f"fault mode auto: {report.recommended_fault_mode} ({report.reason})", file=sys.stderr)
    return report.recommended_fault_mode


def _token(args: argparse.Namespace, create: bool) -> str:
    if getattr(args, "token_file", None):
        path = args.token_file
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()
        if not create:
            raise SystemExit(f"postcopy: error: token file {path} does not exist")
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token
    token = os.environ.get(TOKEN_ENV)
    if token:
        return token
    if not create:
        raise SystemExit(f"postcopy: error: give the migration token with --token-file or ${TOKEN_ENV}")
    token = secrets.token_urlsafe(32)
    print(f"migration token (give it to the destination): {token}", file=sys.stderr)
    return token


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"postcopy: error: --listen wants HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def cmd_demo(args: argparse.Namespace) -> int:
    from postcopy.demo import DemoError, render, run_demo
    from postcopy.chaos import schedule_from
    mode = _pick_fault_mode(args.fault_mode, args.json)
    try:
        chaos = schedule_from(args) if args.chaos else None
    except ValueError as e:
        print(f"postcopy demo: error: {e}", file=sys.stderr)
        return 2
    try:
        report = uvloop.run(run_demo(parse_size(args.mem), args.vcpus, mode, warmup_s=args.warmup,  # type: ignore[arg-type]
                                     after_s=args.after, seed=args.seed, readahead_base=args.readahead,
                                     chaos=chaos, retry=_retry_policy(args)))
    except DemoError as e:
        print(f"postcopy demo: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report) if args.json else render(report))
    return 0 if report["verified"] else 1


def _retry_policy(args: argparse.Namespace) -> Any:
    from postcopy.destination.retry import RetryPolicy
    return RetryPolicy(deadline_s=args.retry_deadline)


def cmd_source(args: argparse.Namespace) -> int:
    from postcopy.source.run import SourceError, resume_source, run_source
    from postcopy.source.state_dir import StateDirError
    from postcopy.tls import TlsError, server_context
    host, port = _listen(args.listen)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("postcopy source: error: --tls-cert and --tls-key go together")

    def ready(url: str) -> None:
        if args.ready_json:
            print(json.dumps({"event": "ready", "url": url, "pid": os.getpid()}), flush=True)
        else:
            print(f"source ready at {url}; waiting for a destination", file=sys.stderr, flush=True)

    try:
        tls = server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        if args.resume:  # the token and everything else come from the state directory
            summary: dict[str, Any] = uvloop.run(resume_source(args.resume, host=host, port=port, ssl_context=tls,
                                                               on_ready=ready))
        else:
            summary = uvloop.run(run_source(parse_size(args.mem), args.vcpus, host=host, port=port,
                                            token=_token(args, create=True), seed=args.seed, warmup_s=0.0,
                                            on_ready=ready, state_dir=args.state_dir, ssl_context=tls))
    except (SourceError, StateDirError, TlsError, OSError) as e:
        print(f"postcopy source: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"event": "summary", **summary}) if args.ready_json else json.dumps(summary), flush=True)
    return 0


def cmd_dest(args: argparse.Namespace) -> int:
    from postcopy.demo import render
    from postcopy.destination.run import FetchError, MigrationError, migrate
    from postcopy.tls import TlsError, client_context
    token = _token(args, create=False)
    mode = _pick_fault_mode(args.fault_mode, args.json)
    try:
        tls = client_context(args.tls_ca) if args.tls_ca else None
        report = uvloop.run(migrate(args.source.rstrip("/"), token, mode, after_s=args.after,  # type: ignore[arg-type]
                                    retry=_retry_policy(args), ssl_context=tls))
    except (MigrationError, FetchError, TlsError) as e:
        print(f"postcopy dest: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report) if args.json else render(report))
    return 0 if report["verified"] else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from postcopy import doctor
    report = doctor.diagnose()
    print(json.dumps(doctor.as_dict(report)) if args.json else doctor.render(report))
    return 0 if report.kvm and report.uffd else 1


def _retry_args(parser: argparse.ArgumentParser) -> None:
    from postcopy.destination.retry import DEFAULT_DEADLINE_S
    parser.add_argument("--retry-deadline", type=float, default=DEFAULT_DEADLINE_S, metavar="SECONDS",
                        help="how long one outage of the page server may last before the migration fails")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="postcopy", description="Post-copy live migration of KVM guests.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    modes = ("exit", "classic", "auto")
    d = sub.add_parser("demo", help="migrate a running guest over loopback and report")
    d.add_argument("--mem", default="256M")
    d.add_argument("--vcpus", type=int, default=2)
    d.add_argument("--fault-mode", choices=modes, default="exit")
    d.add_argument("--warmup", type=float, default=1.0, help="seconds the guest runs on the source first")
    d.add_argument("--after", type=float, default=1.0, help="seconds it runs on the destination before the check")
    d.add_argument("--readahead", type=int, default=4, help="base readahead window in pages")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--json", action="store_true")
    d.add_argument("--chaos", action="store_true", help="migrate through the fault-injection proxy (postcopy/chaos.py)")
    schedule_args(d)
    _retry_args(d)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("source", help="run a guest and serve its pages to a destination")
    s.add_argument("--mem", default="256M")
    s.add_argument("--vcpus", type=int, default=2)
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--listen", default="127.0.0.1:7000", help="HOST:PORT of the page server (nowhere else)")
    s.add_argument("--token-file", help=f"the migration token (created if missing); else ${TOKEN_ENV}")
    s.add_argument("--ready-json", action="store_true", help="print one JSON line with the URL when ready")
    s.add_argument("--state-dir", help="keep guest RAM in DIR/ram (use tmpfs, e.g. /dev/shm/...) and save the "
                                       "header there at the switchover, so that --resume DIR can take over")
    s.add_argument("--resume", metavar="DIR", help="serve a migration again from its state directory, "
                                                   "after its page server died (no guest runs here)")
    s.add_argument("--tls-cert", help="serve over TLS with this certificate (PEM) ...")
    s.add_argument("--tls-key", help="... and this private key (PEM)")
    s.set_defaults(func=cmd_source)

    t = sub.add_parser("dest", help="pull a running guest from a source")
    t.add_argument("--source", required=True, help="the source's URL, e.g. http://10.0.0.1:7000")
    t.add_argument("--token-file")
    t.add_argument("--tls-ca", help="reach the source over TLS, trusting only this CA certificate (PEM)")
    t.add_argument("--fault-mode", choices=modes, default="auto")
    t.add_argument("--after", type=float, default=1.0)
    t.add_argument("--json", action="store_true")
    _retry_args(t)
    t.set_defaults(func=cmd_dest)

    o = sub.add_parser("doctor", help="probe this host for what post-copy needs")
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=cmd_doctor)

    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except GuestMemoryError as e:
        print(f"postcopy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
