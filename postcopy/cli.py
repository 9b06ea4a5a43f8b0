"""`postcopy`: the post-copy migration commands. Each is a client of the VMMs' control API
(docs/api.md): the migration itself runs inside a VMM, never here.

    postcopy migrate  migrate a guest between two running VMMs (`vmm serve`), through their APIs
    postcopy demo     two local VMMs, one migration of a running memtouch guest, the report
    postcopy source   a VMM in this process: run a guest and serve its pages (the source)
    postcopy dest     a VMM in this process: pull a running guest from a source, keep it running
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

from postcopy.destination.readahead import DEFAULT_BASE
from postcopy.logs import LOG_FORMAT_ENV, LOG_FORMATS, VERBOSE_ENV, setup_logging
from postcopy.progress import ProgressLine
from vmm.memory import GuestMemoryError, parse_size
from vmm.priority import MAX_NICE

TOKEN_ENV = "POSTCOPY_TOKEN"
READAHEAD_HELP = (f"base readahead window in pages (default {DEFAULT_BASE}): what a fault that starts no scan brings, its "
                  "page and the missing ones behind it (1: its page alone); a scan's windows double from there")
READAHEAD_MAX_HELP = "the largest readahead window in pages (default 256); 1, with --readahead 1: one page a fault"


def _token(args: argparse.Namespace, create: bool, announce: bool = True) -> str:
    """The migration token: --token-file (created, mode 0600, if missing and ``create``), else
    $POSTCOPY_TOKEN, else a new one (announced on stderr when the other side needs it)."""
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
    if env_token := os.environ.get(TOKEN_ENV):
        return env_token
    if not create:
        raise SystemExit(f"postcopy: error: give the migration token with --token-file or ${TOKEN_ENV}")
    token = secrets.token_urlsafe(32)
    if announce:
        print(f"migration token (give it to the destination): {token}", file=sys.stderr)
    return token


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


def _api_token(args: argparse.Namespace) -> str | None:
    """The control API's bearer token (--api-token-file), if the VMMs want one."""
    if not getattr(args, "api_token_file", None):
        return None
    try:
        with open(args.api_token_file) as f:
            return f.read().strip() or None
    except OSError as e:
        raise SystemExit(f"postcopy: error: cannot read --api-token-file: {e}") from None


def _api_address(text: str) -> str:
    """unix:/path, http://host:port or tcp:HOST:PORT, as ApiClient takes them."""
    if not text.startswith(("unix:", "http://", "https://", "tcp:")):
        raise SystemExit(f"postcopy: error: an API address is unix:/path or http://host:port, got {text!r}")
    return text


def _progress(args: argparse.Namespace) -> ProgressLine:
    return ProgressLine(sys.stderr, enabled=False if args.json else None)


def _print_report(args: argparse.Namespace, report: dict[str, Any]) -> int:
    from postcopy.demo import render
    print(json.dumps(report) if args.json else render(report))
    written = _write_report(args.command, getattr(args, "report", None), report)
    return 0 if report["verified"] and written else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from postcopy.chaos import schedule_from
    from postcopy.demo import DemoError, run_demo
    from postcopy.destination.retry import RetryPolicy
    try:
        chaos = schedule_from(args) if args.chaos else None
    except ValueError as e:
        print(f"postcopy demo: error: {e}", file=sys.stderr)
        return 2
    try:
        report = uvloop.run(run_demo(parse_size(args.mem), args.vcpus, args.fault_mode, warmup_s=args.warmup,
                                     after_s=args.after, seed=args.seed, readahead_base=args.readahead,
                                     progress=_progress(args), timeline=args.report is not None,
                                     chaos=chaos, retry=RetryPolicy(deadline_s=args.retry_deadline),
                                     vcpu_nice=args.vcpu_nice, readahead_max=args.readahead_max))
    except DemoError as e:
        print(f"postcopy demo: error: {e}", file=sys.stderr)
        return 1
    return _print_report(args, report)


def cmd_migrate(args: argparse.Namespace) -> int:
    from postcopy.api.client import ApiClient
    from postcopy.orchestrate import MigrateOptions, OrchestrationError, run_migration
    opts = MigrateOptions(
        token=_token(args, create=True, announce=False), page_listen=args.page_listen, page_url=args.page_url,
        fault_mode=args.fault_mode, create=args.create, mem=args.mem, vcpus=args.vcpus, seed=args.seed,
        warmup_s=args.warmup, after_s=args.after, readahead=args.readahead, readahead_max=args.readahead_max,
        timeout_s=args.timeout,
        timeline=args.report is not None, state_dir=args.state_dir, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_ca=args.tls_ca, retry_deadline_s=args.retry_deadline, vcpu_nice=args.vcpu_nice)
    api_token = _api_token(args)

    async def run() -> dict[str, Any]:
        async with ApiClient(_api_address(args.source_api), api_token) as source, \
                ApiClient(_api_address(args.dest_api), api_token) as dest:
            return await run_migration(source, dest, opts, _progress(args))

    try:
        report = uvloop.run(run())
    except OrchestrationError as e:
        print(f"postcopy migrate: error: {e}", file=sys.stderr)
        return 1
    return _print_report(args, report)


def cmd_source(args: argparse.Namespace) -> int:
    """A VMM in this process: PUT /v1/vm, PUT /v1/migration/outgoing, wait for the destination."""
    from postcopy.api.client import ApiClientError
    from postcopy.api.server import local_vmm
    from postcopy.orchestrate import OrchestrationError, follow
    _tls_pair(args)
    # Resuming: the token and everything else come from the state directory.
    token = None if args.resume else _token(args, create=True)

    async def run() -> dict[str, Any]:
        async with local_vmm() as vmm:
            if not args.resume:
                await vmm.create_vm(args.mem, args.vcpus, "memtouch", args.seed, state_dir=args.state_dir)
            url = (await vmm.outgoing(args.listen, token, args.advertise_url, tls_cert=args.tls_cert,
                                      tls_key=args.tls_key, resume=args.resume,
                                      page_workers=None if args.page_workers else False,
                                      page_poll_us=args.page_poll_us))["url"]
            if args.ready_json:
                print(json.dumps({"event": "ready", "url": url, "pid": os.getpid()}), flush=True)
            else:
                print(f"source ready at {url}; waiting for a destination", file=sys.stderr, flush=True)
            return await follow(vmm, float("inf"))

    try:
        status = uvloop.run(run())
    except (ApiClientError, OrchestrationError) as e:
        print(f"postcopy source: error: {e}", file=sys.stderr)
        return 1
    if status["state"] != "completed":
        print(f"postcopy source: error: the migration {status['state']}: {'; '.join(status['errors'])}",
              file=sys.stderr)
        return 1
    # With --ready-json a second line, the summary, follows the ready line.
    print(json.dumps({"event": "summary", **status["report"]}) if args.ready_json else json.dumps(status["report"]),
          flush=True)
    return 0


def _tls_pair(args: argparse.Namespace) -> None:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit(f"postcopy {args.command}: error: --tls-cert and --tls-key go together")


def _retry_args(parser: argparse.ArgumentParser) -> None:
    from postcopy.destination.retry import DEFAULT_DEADLINE_S
    parser.add_argument("--retry-deadline", type=float, default=DEFAULT_DEADLINE_S, metavar="SECONDS",
                        help="how long one outage of the page server may last before the migration fails")


def _tls_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", help="the page server speaks TLS with this certificate (PEM) ...")
    parser.add_argument("--tls-key", help="... and this private key (PEM)")


def _tls_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca", help="reach the page server over TLS, trusting only this CA certificate (PEM)")


def _nice(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= MAX_NICE:
        raise argparse.ArgumentTypeError(f"a nice value from 0 to {MAX_NICE}, not {value!r}")
    return int(value)


def _poll_us(value: str) -> int:
    from postcopy.source.page_workers import MAX_POLL_US
    if not value.isdigit() or not 0 <= int(value) <= MAX_POLL_US:
        raise argparse.ArgumentTypeError(f"microseconds from 0 to {MAX_POLL_US}, not {value!r}")
    return int(value)


def _vcpu_nice_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vcpu-nice", type=_nice, metavar=f"0-{MAX_NICE}",
                        help="the destination's vCPUs run guest code at this nice value until every page is present, "
                             "leaving the CPU to the transfer (default 10; 0: as they are)")


def _state_dir_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", metavar="DIR",
                        help="keep guest RAM in DIR/ram (use tmpfs, e.g. /dev/shm/...) and save the header there at "
                             "the switchover, so that `postcopy source --resume DIR` can take over")


def cmd_dest(args: argparse.Namespace) -> int:
    """A VMM in this process: PUT /v1/migration/incoming, follow it, print the report."""
    from postcopy.api.client import ApiClientError
    from postcopy.api.server import local_vmm
    from postcopy.orchestrate import OrchestrationError, follow
    token = _token(args, create=False)

    async def run() -> dict[str, Any]:
        async with local_vmm() as vmm:
            await vmm.incoming(args.source.rstrip("/"), token, fault_mode=args.fault_mode, after_s=args.after,
                               readahead=args.readahead, timeline=args.report is not None, tls_ca=args.tls_ca,
                               retry_deadline_s=args.retry_deadline, vcpu_nice=args.vcpu_nice,
                               readahead_max=args.readahead_max)
            return await follow(vmm, args.timeout, _progress(args))

    try:
        status = uvloop.run(run())
    except (ApiClientError, OrchestrationError) as e:
        print(f"postcopy dest: error: {e}", file=sys.stderr)
        return 1
    if status["report"] is None:
        print(f"postcopy dest: error: the migration failed: {'; '.join(status['errors'])}", file=sys.stderr)
        return 1
    return _print_report(args, status["report"])


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
    from postcopy.chaos import schedule_args
    from postcopy.source.page_workers import DEFAULT_POLL_US, MAX_POLL_US
    d = sub.add_parser("demo", help="migrate a running guest over loopback and report")
    d.add_argument("--mem", default="256M")
    d.add_argument("--vcpus", type=int, default=2)
    d.add_argument("--fault-mode", choices=modes, default="exit")
    d.add_argument("--warmup", type=float, default=1.0, help="seconds the guest runs on the source first")
    d.add_argument("--after", type=float, default=1.0, help="seconds it runs on the destination before the check")
    d.add_argument("--readahead", type=int, default=DEFAULT_BASE, help=READAHEAD_HELP)
    d.add_argument("--readahead-max", type=int, default=None, help=READAHEAD_MAX_HELP)
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--json", action="store_true")
    d.add_argument("--report", metavar="DIR", help="also write report.html, timeline.png, report.json into DIR")
    d.add_argument("--chaos", action="store_true", help="migrate through the fault-injection proxy (postcopy/chaos.py)")
    schedule_args(d)
    _retry_args(d)
    _vcpu_nice_args(d)
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("migrate", help="migrate a guest between two VMMs through their control APIs")
    m.add_argument("--source-api", required=True, help="the source VMM's API: unix:/path or http://host:port")
    m.add_argument("--dest-api", required=True, help="the destination VMM's API")
    m.add_argument("--create", action="store_true", help="boot a memtouch guest on the source first")
    m.add_argument("--mem", default="256M")
    m.add_argument("--vcpus", type=int, default=2)
    m.add_argument("--seed", type=int, default=7)
    m.add_argument("--page-listen", default="127.0.0.1:0", help="HOST:PORT of the source's page server")
    m.add_argument("--page-url", help="the page server's URL as the destination reaches it (default: as bound)")
    m.add_argument("--fault-mode", choices=modes, default="exit", help="auto: the destination's host decides")
    m.add_argument("--warmup", type=float, default=1.0, help="seconds a created guest runs before the migration")
    m.add_argument("--after", type=float, default=1.0)
    m.add_argument("--readahead", type=int, default=DEFAULT_BASE, help=READAHEAD_HELP)
    m.add_argument("--readahead-max", type=int, default=None, help=READAHEAD_MAX_HELP)
    m.add_argument("--timeout", type=float, default=600.0, help="seconds the migration may take")
    m.add_argument("--token-file", help=f"the migration token (created if missing); else ${TOKEN_ENV}, else a new one")
    m.add_argument("--api-token-file", help="the bearer token of both VMMs' APIs")
    m.add_argument("--json", action="store_true")
    m.add_argument("--report", metavar="DIR", help="also write report.html, timeline.png, report.json into DIR")
    _state_dir_args(m)
    _tls_server_args(m)
    _tls_client_args(m)
    _retry_args(m)
    _vcpu_nice_args(m)
    m.set_defaults(func=cmd_migrate)

    s = sub.add_parser("source", help="run a guest and serve its pages to a destination")
    s.add_argument("--mem", default="256M")
    s.add_argument("--vcpus", type=int, default=2)
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--listen", default="127.0.0.1:7000", help="HOST:PORT of the page server (nowhere else)")
    s.add_argument("--advertise-url", help="the page server's URL as the destination reaches it")
    s.add_argument("--token-file", help=f"the migration token (created if missing); else ${TOKEN_ENV}")
    s.add_argument("--ready-json", action="store_true", help="print one JSON line with the URL when ready")
    s.add_argument("--no-page-workers", dest="page_workers", action="store_false",
                   help="serve each plain page socket on a thread, not in a page worker process of its own")
    s.add_argument("--page-poll-us", type=_poll_us, metavar="US",
                   help=f"how long a page worker polls for the next request of a destination vCPU that "
                        f"polls for its answers, before it sleeps (default {DEFAULT_POLL_US}; 0: never; "
                        f"at most {MAX_POLL_US})")
    _state_dir_args(s)
    s.add_argument("--resume", metavar="DIR", help="serve a migration again from its state directory, "
                                                   "after its page server died (no guest runs here)")
    _tls_server_args(s)
    s.set_defaults(func=cmd_source)

    t = sub.add_parser("dest", help="pull a running guest from a source")
    t.add_argument("--source", required=True, help="the source's URL, e.g. http://10.0.0.1:7000")
    t.add_argument("--token-file")
    t.add_argument("--fault-mode", choices=modes, default="auto")
    t.add_argument("--after", type=float, default=1.0)
    t.add_argument("--readahead", type=int, default=DEFAULT_BASE, help=READAHEAD_HELP)
    t.add_argument("--readahead-max", type=int, default=None, help=READAHEAD_MAX_HELP)
    t.add_argument("--timeout", type=float, default=600.0)
    t.add_argument("--json", action="store_true")
    t.add_argument("--report", metavar="DIR", help="also write report.html, timeline.png, report.json into DIR")
    _tls_client_args(t)
    _retry_args(t)
    _vcpu_nice_args(t)
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
