"""A fault-injection TCP proxy for the page server: it sits on loopback between a destination
and a source and, on a seeded schedule, drops connections, stalls them, truncates answers and
corrupts answer bytes. It counts what it injected.

The schedule gives every ``every``-th connection (after the first ``skip`` connections) one
fault, the kinds in turn (so a short run still sees each kind), and draws from its seed the number of answer bytes (source -> destination) after which it strikes, and for
a stall its length and whether the stream then resumes or is dropped. ``at_s`` also drops every
open connection at those times after the proxy started. Faults act on the answer stream, where
page data flows: a flipped byte lands in a page (its checksum catches it), a WebSocket frame
header or msgpack framing (the decoder or the stream catches it); the destination sees a
FetchError either way and reconnects.

Run as ``python -m postcopy.chaos --upstream HOST:PORT --listen 127.0.0.1:0``: it prints one
JSON line ``{"event": "ready", "url": ...}``, proxies until SIGTERM, then prints its report.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

import uvloop

FaultKind = Literal["drop", "stall", "truncate", "corrupt"]
FAULT_KINDS: Final[tuple[FaultKind, ...]] = ("drop", "stall", "truncate", "corrupt")
CHUNK: Final = 64 * 1024


@dataclass(slots=True)
class ChaosSchedule:
    seed: int = 1
    every: int = 1  # fault every Nth connection
    skip: int = 0  # the first connections pass untouched
    after_bytes: tuple[int, int] = (64 * 1024, 24 << 20)  # answer bytes before each fault, uniform
    kinds: tuple[FaultKind, ...] = FAULT_KINDS
    stall_s: tuple[float, float] = (0.02, 0.3)
    stall_drop: float = 0.5  # chance that a stall ends in a drop rather than a resume
    at_s: tuple[float, ...] = ()  # drop every open connection at these times
    max_faults: int | None = None  # inject no more than this many
    repeat: bool = True  # a fault that leaves the stream open is followed by another

    def validate(self) -> None:
        if self.every < 1 or self.skip < 0:
            raise ValueError(f"chaos: every must be >= 1 and skip >= 0, got {self.every} and {self.skip}")
        if not 1 <= self.after_bytes[0] <= self.after_bytes[1]:
            raise ValueError(f"chaos: after_bytes must be an ordered range of positive counts, got {self.after_bytes}")
        bad = set(self.kinds) - set(FAULT_KINDS)
        if bad or not self.kinds:
            raise ValueError(f"chaos: fault kinds must be some of {', '.join(FAULT_KINDS)}, got {self.kinds}")


@dataclass(slots=True)
class Fault:
    kind: FaultKind
    at: int  # answer byte offset where it strikes
    stall_s: float = 0.0
    then_drop: bool = False


@dataclass(slots=True)
class ChaosStats:
    connections: int = 0
    bytes_up: int = 0  # destination -> source
    bytes_down: int = 0  # source -> destination
    injected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_KINDS, 0))
    stalls_dropped: int = 0
    dropped_at_times: int = 0
    upstream_refused: int = 0

    @property
    def faults_injected(self) -> int:
        return sum(self.injected.values()) + self.dropped_at_times


class ChaosProxy:
    """Proxies host:port to the upstream, injecting faults on the schedule."""

    def __init__(self, upstream_host: str, upstream_port: int, schedule: ChaosSchedule | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.schedule = schedule or ChaosSchedule()
        self.schedule.validate()
        self.stats = ChaosStats()
        self._rng = random.Random(self.schedule.seed)
        self._server: asyncio.Server | None = None
        self._live: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._timer: asyncio.Task[None] | None = None
        self._planned = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port)
        self._timer = asyncio.get_running_loop().create_task(self._drop_at_times())
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.close()
        for pair in list(self._live):
            _abort(pair)
        if self._server is not None:
            await self._server.wait_closed()

    def report(self) -> dict[str, Any]:
        report = asdict(self.stats)
        report["faults_injected"] = self.stats.faults_injected
        return report

    def _plan(self, index: int, position: int = 0) -> Fault | None:
        """The next fault of connection ``index``, ``after_bytes`` past ``position``."""
        s = self.schedule
        if index < s.skip or (index - s.skip) % s.every:
            return None
        if s.max_faults is not None and self.stats.faults_injected >= s.max_faults:
            return None
        rng = self._rng
        self._planned += 1
        return Fault(kind=s.kinds[(self._planned - 1) % len(s.kinds)], at=position + rng.randint(*s.after_bytes),
                     stall_s=rng.uniform(*s.stall_s), then_drop=rng.random() < s.stall_drop)

    async def _drop_at_times(self) -> None:
        loop = asyncio.get_running_loop()
        begin = loop.time()
        for at in sorted(self.schedule.at_s):
            await asyncio.sleep(max(0.0, begin + at - loop.time()))
            for pair in list(self._live):
                self.stats.dropped_at_times += 1
                _abort(pair)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.stats.connections
        self.stats.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.stats.upstream_refused += 1
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._live.add(pair)
        try:
            up = asyncio.ensure_future(self._pump_up(reader, up_writer))
            down = asyncio.ensure_future(self._pump_down(up_reader, writer, index))
            await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
            up.cancel()
            down.cancel()
        finally:
            self._live.discard(pair)
            _abort(pair)

    async def _pump_up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                self.stats.bytes_up += len(data)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass

    async def _pump_down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        """Answers to the destination, with connection ``index``'s faults; a fault that leaves
        the stream open (a corruption, a stall that resumes) is followed by another."""
        position = 0
        fault = self._plan(index)
        try:
            while data := await reader.read(CHUNK):
                while fault is not None and position + len(data) > fault.at:
                    struck = await self._strike(fault, data, fault.at - position, writer)
                    if struck is None:
                        return  # the connection is dropped
                    if fault.kind == "stall":  # what was sent before the silence
                        sent = len(data) - len(struck)
                        position, self.stats.bytes_down = position + sent, self.stats.bytes_down + sent
                    data = struck
                    fault = self._plan(index, fault.at) if self.schedule.repeat else None
                position += len(data)
                self.stats.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass

    async def _strike(self, fault: Fault, data: bytes, offset: int, writer: asyncio.StreamWriter) -> bytes | None:
        """Apply ``fault`` at ``offset`` in ``data``; returns what to forward, None to drop."""
        self.stats.injected[fault.kind] += 1
        if fault.kind == "drop":
            return None
        if fault.kind == "truncate":
            writer.write(data[:offset])
            await writer.drain()
            return None
        if fault.kind == "corrupt":
            flipped = bytearray(data)
            flipped[offset] ^= self._rng.randint(1, 255)
            return bytes(flipped)
        writer.write(data[:offset])  # stall: part of the answer, then silence
        await writer.drain()
        await asyncio.sleep(fault.stall_s)
        if fault.then_drop:
            self.stats.stalls_dropped += 1
            return None
        return data[offset:]


def _abort(pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
    for w in pair:
        w.transport.abort()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"chaos: error: want HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def schedule_args(parser: argparse.ArgumentParser) -> None:
    """The schedule's knobs as command-line options (shared with `postcopy demo --chaos`)."""
    parser.add_argument("--chaos-seed", type=int, default=1)
    parser.add_argument("--chaos-every", type=int, default=1, help="fault every Nth connection")
    parser.add_argument("--chaos-skip", type=int, default=0, help="first connections left alone")
    parser.add_argument("--chaos-after", default="65536:25165824", help="MIN:MAX answer bytes before a fault")
    parser.add_argument("--chaos-kinds", default=",".join(FAULT_KINDS))
    parser.add_argument("--chaos-at", default="", help="comma-separated seconds at which to drop everything")
    parser.add_argument("--chaos-max", type=int, default=None, help="inject at most this many faults")
    parser.add_argument("--chaos-once", action="store_true", help="one fault per connection at most")


def schedule_from(args: argparse.Namespace) -> ChaosSchedule:
    low, _, high = args.chaos_after.partition(":")
    try:
        after_bytes = (int(low), int(high or low))
        at_s = tuple(float(t) for t in args.chaos_at.split(",") if t)
    except ValueError:
        raise ValueError(f"chaos: --chaos-after wants MIN:MAX bytes and --chaos-at seconds, "
                         f"got {args.chaos_after!r} and {args.chaos_at!r}") from None
    schedule = ChaosSchedule(seed=args.chaos_seed, every=args.chaos_every, skip=args.chaos_skip,
                             after_bytes=after_bytes,
                             kinds=tuple(k for k in args.chaos_kinds.split(",") if k),  # type: ignore[misc]
                             at_s=at_s, max_faults=args.chaos_max, repeat=not args.chaos_once)
    schedule.validate()
    return schedule


def schedule_argv(schedule: ChaosSchedule) -> list[str]:
    """The options that give ``schedule`` to ``python -m postcopy.chaos``."""
    argv = ["--chaos-seed", str(schedule.seed), "--chaos-every", str(schedule.every), "--chaos-skip",
            str(schedule.skip), "--chaos-after", f"{schedule.after_bytes[0]}:{schedule.after_bytes[1]}",
            "--chaos-kinds", ",".join(schedule.kinds), "--chaos-at", ",".join(map(str, schedule.at_s))]
    if schedule.max_faults is not None:
        argv += ["--chaos-max", str(schedule.max_faults)]
    if not schedule.repeat:
        argv.append("--chaos-once")
    return argv


async def _serve(args: argparse.Namespace) -> dict[str, Any]:
    proxy = ChaosProxy(*_hostport(args.upstream), schedule_from(args))
    host, port = await proxy.start(*_hostport(args.listen))
    print(json.dumps({"event": "ready", "url": f"http://{host}:{port}"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.close()
    return proxy.report()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="postcopy.chaos", description="Fault-injection proxy for the page server.")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the page server")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept destinations on")
    schedule_args(parser)
    args = parser.parse_args(argv)
    try:
        report = uvloop.run(_serve(args))
    except ValueError as e:
        print(f"chaos: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"event": "report", **report}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
