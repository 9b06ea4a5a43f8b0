"""The fault-injection proxy (postcopy/chaos.py) against a plain TCP upstream on loopback that
sends a known stream: each fault does exactly what the schedule says, and is counted."""
from __future__ import annotations

import argparse
import asyncio
import random
import time

import pytest

from postcopy.chaos import ChaosProxy, ChaosSchedule, schedule_args, schedule_argv, schedule_from

STREAM = random.Random(1).randbytes(1 << 20)


async def _through_proxy(schedule: ChaosSchedule) -> tuple[bytes, float, ChaosProxy]:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(STREAM)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    proxy = ChaosProxy("127.0.0.1", server.sockets[0].getsockname()[1], schedule)
    host, port = await proxy.start()
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    got = b""
    try:
        while chunk := await reader.read(1 << 16):
            got += chunk
    except ConnectionResetError:
        pass
    took = time.monotonic() - t0
    writer.close()
    await proxy.close()
    server.close()
    return got, took, proxy


def _run(schedule: ChaosSchedule) -> tuple[bytes, float, ChaosProxy]:
    return asyncio.run(_through_proxy(schedule))


def test_drop_and_truncate_cut_the_answer_at_the_scheduled_byte() -> None:
    for kind in ("drop", "truncate"):
        got, _, proxy = _run(ChaosSchedule(kinds=(kind,), after_bytes=(100_000, 100_000)))  # type: ignore[arg-type]
        assert STREAM.startswith(got) and len(got) <= 100_000, kind
        assert proxy.stats.injected[kind] == 1 and proxy.stats.faults_injected == 1
    assert len(got) == 100_000  # truncate forwards exactly up to the byte


def test_corrupt_flips_exactly_one_byte_per_fault_and_keeps_the_stream_open() -> None:
    got, _, proxy = _run(ChaosSchedule(kinds=("corrupt",), after_bytes=(300_000, 300_000)))
    assert len(got) == len(STREAM)
    diffs = [i for i in range(len(got)) if got[i] != STREAM[i]]
    assert diffs == [300_000, 600_000, 900_000] and proxy.stats.injected["corrupt"] == 3


def test_a_stall_that_resumes_delays_the_stream_and_loses_nothing() -> None:
    got, took, proxy = _run(ChaosSchedule(kinds=("stall",), after_bytes=(200_000, 200_000), stall_s=(0.3, 0.3),
                                          stall_drop=0.0, max_faults=1))
    assert got == STREAM and took >= 0.3 and proxy.stats.injected["stall"] == 1 and proxy.stats.stalls_dropped == 0


def test_skip_every_and_max_choose_the_connections_that_get_faults() -> None:
    schedule = ChaosSchedule(every=2, skip=1, kinds=("drop",), after_bytes=(10, 10), max_faults=2)
    proxy = ChaosProxy("127.0.0.1", 1, schedule)
    planned = [proxy._plan(i) is not None for i in range(8)]
    assert planned == [False, True, False, True, False, True, False, True]  # max counts injected, not planned


def test_the_schedule_goes_through_the_command_line_unchanged() -> None:
    schedule = ChaosSchedule(seed=4, every=3, skip=2, after_bytes=(10, 20), kinds=("stall", "corrupt"),
                             at_s=(0.5, 1.5), max_faults=7, repeat=False)
    parser = argparse.ArgumentParser()
    schedule_args(parser)
    again = schedule_from(parser.parse_args(schedule_argv(schedule)))
    assert (again.seed, again.every, again.skip, again.after_bytes, again.kinds, again.at_s, again.max_faults,
            again.repeat) == (4, 3, 2, (10, 20), ("stall", "corrupt"), (0.5, 1.5), 7, False)


@pytest.mark.parametrize("bad", [dict(every=0), dict(after_bytes=(0, 5)), dict(after_bytes=(9, 5)),
                                 dict(kinds=("explode",)), dict(kinds=())])
def test_a_bad_schedule_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="chaos:"):
        ChaosSchedule(**bad).validate()
