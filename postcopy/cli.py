"""`postcopy`: the post-copy migration commands. Each calls the same code the API does.

    postcopy demo     migrate a running memtouch guest over loopback and report
    postcopy source   run a guest and serve its pages (the migration source)
    postcopy dest     pull a running guest from a source and keep it running
    postcopy doctor   probe this host: KVM, userfaultfd, what a fault exit looks like
    postcopy bench    page-in rates against the host's C limit, fetch latency, stream, migration
    postcopy report   render a saved JSON report (with its timeline) as report.html + timeline.png
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

from postcopy.logs import LOG_FORMAT_ENV, LOG_FORMATS, VERBOSE_ENV, setup_logging
from vmm.memory import GuestMemoryError, parse_size

TOKEN_ENV = "POSTCOPY_TOKEN"


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


def _write_report(command: str, out: str | None, report: dict[str, Any]) -> bool:
    """Write report.json, report.html and timeline.png into ``out`` (if given); False on error."""
    if out is None:
        return True
    from postcopy.report import ReportError, write_report
    try:
        paths = write_report(out, report)
    except (ReportError, OSError) as e:
        print(f"postcopy {command}: error: cannot write the report to {out}: {e}", file=sys.stderr)
        return False
    logging.getLogger("postcopy.report").info("report written to %s", out, extra={
        "event": "report_written", **{name: str(path) for name, path in paths.items()}})
    return True


def cmd_demo(args: argparse.Namespace) -> int:
    from postcopy.demo import DemoError, render, run_demo
    mode = _pick_fault_mode(args.fault_mode, args.json)
    try:
        report = uvloop.run(run_demo(parse_size(args.mem), args.vcpus, mode, warmup_s=args.warmup,  # type: ignore[arg-type]
                                     after_s=args.after, seed=args.seed, readahead_base=args.readahead,
                                     timeline=args.report is not None))
    except DemoError as e:
        print(f"postcopy demo: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report) if args.json else render(report))
    written = _write_report("demo", args.report, report)
    return 0 if report["verified"] and written else 1


def cmd_source(args: argparse.Namespace) -> int:
    from postcopy.source.run import run_source
    host, port = _listen(args.listen)
    token = _token(args, create=True)

    def ready(url: str) -> None:
        if args.ready_json:
            print(json.dumps({"event": "ready", "url": url, "pid": os.getpid()}), flush=True)
        else:
            print(f"source ready at {url}; waiting for a destination", file=sys.stderr, flush=True)

    summary: dict[str, Any] = uvloop.run(run_source(parse_size(args.mem), args.vcpus, host=host, port=port, token=token,
                                                    seed=args.seed, warmup_s=0.0, on_ready=ready))
    if not args.ready_json:
        print(json.dumps(summary))
    return 0


def cmd_dest(args: argparse.Namespace) -> int:
    from postcopy.demo import render
    from postcopy.destination.run import FetchError, MigrationError, migrate
    token = _token(args, create=False)
    mode = _pick_fault_mode(args.fault_mode, args.json)
    try:
        report = uvloop.run(migrate(args.source.rstrip("/"), token, mode, after_s=args.after,  # type: ignore[arg-type]
                                    timeline=args.report is not None))
    except (MigrationError, FetchError) as e:
        print(f"postcopy dest: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report) if args.json else render(report))
    written = _write_report("dest", args.report, report)
    return 0 if report["verified"] and written else 1


def cmd_report(args: argparse.Namespace) -> int:
    try:
        with open(args.report_json) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        print(f"postcopy report: error: cannot read {args.report_json}: {e}", file=sys.stderr)
        return 1
    if not isinstance(report, dict):
        print(f"postcopy report: error: {args.report_json} holds no report object", file=sys.stderr)
        return 1
    return 0 if _write_report("report", args.out, report) else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from postcopy import doctor
    report = doctor.diagnose()
    print(json.dumps(doctor.as_dict(report)) if args.json else doctor.render(report))
    return 0 if report.kvm and report.uffd else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from postcopy.bench import runner
    return runner.main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="postcopy", description="Post-copy live migration of KVM guests.")
    parser.add_argument("-v", "--verbose", action="store_true", default=os.environ.get(VERBOSE_ENV) == "1",
                        help="log at INFO (else WARNING)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=os.environ.get(LOG_FORMAT_ENV) or "text",
                        help="text, or json: one JSON object per line (ts, level, logger, event, fields)")
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
    d.add_argument("--report", metavar="DIR", help="also write report.html, timeline.png, report.json into DIR")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("source", help="run a guest and serve its pages to a destination")
    s.add_argument("--mem", default="256M")
    s.add_argument("--vcpus", type=int, default=2)
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--listen", default="127.0.0.1:7000", help="HOST:PORT of the page server (nowhere else)")
    s.add_argument("--token-file", help=f"the migration token (created if missing); else ${TOKEN_ENV}")
    s.add_argument("--ready-json", action="store_true", help="print one JSON line with the URL when ready")
    s.set_defaults(func=cmd_source)

    t = sub.add_parser("dest", help="pull a running guest from a source")
    t.add_argument("--source", required=True, help="the source's URL, e.g. http://10.0.0.1:7000")
    t.add_argument("--token-file")
    t.add_argument("--fault-mode", choices=modes, default="auto")
    t.add_argument("--after", type=float, default=1.0)
    t.add_argument("--json", action="store_true")
    t.add_argument("--report", metavar="DIR", help="also write report.html, timeline.png, report.json into DIR")
    t.set_defaults(func=cmd_dest)

    r = sub.add_parser("report", help="render a saved JSON report as report.html and timeline.png")
    r.add_argument("report_json", metavar="REPORT.json", help="a report printed by demo/dest --json with --report")
    r.add_argument("--out", required=True, metavar="DIR")
    r.set_defaults(func=cmd_report)

    o = sub.add_parser("doctor", help="probe this host for what post-copy needs")
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=cmd_doctor)

    from postcopy.bench.runner import add_arguments as bench_arguments
    b = sub.add_parser("bench", help="measure page-in, fetch, stream and migration side by side")
    bench_arguments(b)
    b.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    if args.log_format not in LOG_FORMATS:  # a default from the environment: argparse does not check it
        parser.error(f"${LOG_FORMAT_ENV}={args.log_format!r}: choose one of {', '.join(LOG_FORMATS)}")
    setup_logging(args.verbose, args.log_format)
    try:
        return int(args.func(args))
    except GuestMemoryError as e:
        print(f"postcopy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
