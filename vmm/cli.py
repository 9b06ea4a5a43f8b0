"""`vmm run`: boot a guest workload on KVM, show its console and progress, print a summary.
`vmm serve`: run this VMM as a service with a control API (postcopy.api, imported lazily)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

from vmm.guest import workloads
from vmm.guest.workloads import WorkloadError
from vmm.machine import Machine, MachineConfig, MachineError
from vmm.memory import GuestMemoryError, parse_size

SWEEP_TIMEOUT_S = 60.0


@dataclass(slots=True)
class RunSummary:
    workload: str
    vcpus: int
    guest_mib: int
    seconds: float
    pages_verified: int
    errors: int
    swept_pages: int  # pages verified by the final sweep over all of guest data
    guest_exceptions: int
    ok: bool
    error: str | None = None

    def line(self) -> str:
        status = "ok" if self.ok else f"FAILED: {self.error}"
        return (f"{self.workload}: {self.vcpus} vCPU(s), {self.guest_mib} MiB, {self.seconds:.1f} s: "
                f"{self.pages_verified} pages verified, {self.swept_pages} swept, {self.errors} errors: {status}")


def run(workload: str, mem_bytes: int, vcpus: int, seconds: float, seed: int, *, show: bool = True,
        backing: str = "anon") -> RunSummary:
    program, params = workloads.plan(workload, mem_bytes, vcpus, seed)
    console = (lambda line: print(f"[guest] {line}", file=sys.stderr)) if show else None
    machine = Machine.create(MachineConfig(mem_bytes, vcpus, backing), console=console)  # type: ignore[arg-type]
    try:
        machine.boot(program, params)
        machine.start()
        start = time.monotonic()
        last = 0
        while (elapsed := time.monotonic() - start) < seconds and not machine.failures():
            machine.run_for(min(1.0, seconds - elapsed))
            if show:
                now = machine.services.verified
                print(f"  t={time.monotonic() - start:5.1f}s  verified {now:>10}  (+{now - last}/s)  "
                      f"errors {machine.services.errors}", file=sys.stderr)
                last = now
            if machine.services.stop_requested.is_set():
                break
        swept = 0
        if workloads.WORKLOADS[workload].verifies and not machine.failures():
            if not machine.services.sweep(SWEEP_TIMEOUT_S):
                raise MachineError(f"the guest did not finish its verification sweep in {SWEEP_TIMEOUT_S:.0f} s")
            swept = sum(p.sweep_pages for p in machine.services.progress)
        elapsed = time.monotonic() - start
        machine.pause()
        error = None
        try:
            machine.check()
        except MachineError as e:
            error = str(e)
        s = machine.services
        errors = s.errors + sum(p.sweep_errors for p in s.progress)
        return RunSummary(workload, vcpus, mem_bytes >> 20, round(elapsed, 3), s.verified, errors, swept,
                          len(s.exceptions), ok=error is None and errors == 0, error=error)
    finally:
        machine.close()


def _read_token_file(path: str) -> str:
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as e:
        raise SystemExit(f"vmm serve: error: cannot read --api-token-file: {e}") from None
    if not token:
        raise SystemExit(f"vmm serve: error: --api-token-file {path} is empty")
    return token


def serve(args: argparse.Namespace) -> int:
    import uvloop

    from postcopy.api.server import ApiAddress, ApiStartError
    from postcopy.api.server import serve as serve_api
    try:
        address = ApiAddress.parse(args.api)
        token = _read_token_file(args.api_token_file) if args.api_token_file else None
        if address.is_tcp and token is None and not args.insecure_api:
            raise ApiStartError("a TCP API needs --api-token-file (or --insecure-api to serve it to anyone "
                                "who can reach the port)")
    except ApiStartError as e:
        print(f"vmm serve: error: {e}", file=sys.stderr)
        return 2

    def ready(api: str) -> None:
        if args.ready_json:
            print(json.dumps({"event": "ready", "api": api}), flush=True)
        else:
            print(f"vmm: API at {api}", file=sys.stderr, flush=True)

    console = (lambda line: print(f"[guest] {line}", file=sys.stderr)) if args.console else None
    try:
        uvloop.run(serve_api(address, token, on_ready=ready, console=console))
    except ApiStartError as e:
        print(f"vmm serve: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmm", description="A small KVM VMM that runs guest workloads.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("serve", help="serve a control API (docs/api.md): create, run and migrate one VM")
    v.add_argument("--api", help="unix:/path/api.sock (default: under $XDG_RUNTIME_DIR or /run, "
                                 "postcopy-vmm/api.sock) or tcp:HOST:PORT")
    v.add_argument("--api-token-file", help="a file holding the API's bearer token (required for tcp)")
    v.add_argument("--insecure-api", action="store_true", help="allow a TCP API without a token")
    v.add_argument("--ready-json", action="store_true",
                   help='print one line {"event":"ready","api":ADDR} on stdout when serving')
    v.add_argument("--console", action="store_true", help="show the guest's serial console on stderr")
    v.add_argument("-v", "--verbose", action="store_true")
    v.add_argument("--log-format", choices=("text", "json"),
                   help="text (default), or json: one JSON object per line ($POSTCOPY_LOG_FORMAT)")
    r = sub.add_parser("run", help="boot a workload and let it run")
    r.add_argument("--mem", default="256M", help="guest RAM, e.g. 256M or 1G (a multiple of 4 KiB)")
    r.add_argument("--vcpus", type=int, default=1)
    r.add_argument("--workload", default="memtouch", help=f"one of: {', '.join(workloads.WORKLOADS)}")
    r.add_argument("--seconds", type=float, default=5.0)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--backing", choices=("anon", "memfd"), default="anon")
    r.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    r.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "serve":
        # The service logs as `postcopy` does, and as the process that started it asked (env).
        from postcopy.logs import LOG_FORMAT_ENV, VERBOSE_ENV, setup_logging
        fmt = args.log_format or os.environ.get(LOG_FORMAT_ENV) or "text"
        if fmt not in ("text", "json"):
            parser.error(f"${LOG_FORMAT_ENV}={fmt!r}: choose text or json")
        setup_logging(args.verbose or os.environ.get(VERBOSE_ENV) == "1", fmt)  # type: ignore[arg-type]
        return serve(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        mem = parse_size(args.mem)
        summary = run(args.workload, mem, args.vcpus, args.seconds, args.seed, show=not args.json, backing=args.backing)
    except (WorkloadError, MachineError, GuestMemoryError) as e:
        print(f"vmm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vmm: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(asdict(summary)))
    else:
        print(summary.line())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
