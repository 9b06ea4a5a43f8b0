"""Private interpreters (vmm/interp.py): a GIL of their own, memory shared by address, failures
raised with their traceback, and this interpreter's own thread state left as it was."""
from __future__ import annotations

import ctypes
import sys
import threading
import time

import pytest

from vmm import interp

pytestmark = pytest.mark.skipif(interp.unavailable() is not None, reason=f"no private interpreter here: {interp.unavailable()}")


@pytest.fixture
def private() -> interp.PrivateInterpreter:
    p = interp.acquire()
    yield p
    interp.release(p)


def test_code_runs_there_and_writes_this_interpreters_memory_by_address(private: interp.PrivateInterpreter) -> None:
    out = bytearray(8)
    address = ctypes.addressof(ctypes.c_char.from_buffer(out))
    private.run(f"import ctypes, sys\nctypes.memmove({address}, sys.version.split()[0].encode()[:8], "
                f"len(sys.version.split()[0][:8]))")
    assert out.rstrip(b"\0").decode() == sys.version.split()[0][:8]
    private.run("state = 41")
    private.run("state += 1\nassert state == 42")  # its __main__ lives on between runs


def test_a_failure_there_is_raised_here_with_its_traceback(private: interp.PrivateInterpreter) -> None:
    with pytest.raises(interp.PrivateInterpreterError, match=r"(?s)Traceback.*ZeroDivisionError"):
        private.run("x = 1\ny = x // 0")
    private.run("assert 1 + 1 == 2")  # and it is usable after


def test_it_holds_a_gil_of_its_own(private: interp.PrivateInterpreter) -> None:
    """A thread spins in the private interpreter until this interpreter's thread sets a flag.
    With one GIL and a switch interval of 100 s, the flag could not be set until the spinner
    gave it up: here it is set at once."""
    flag = (ctypes.c_int64 * 1)()
    done = threading.Event()

    def spin() -> None:
        private.run(f"import ctypes\nflag = ctypes.c_int64.from_address({ctypes.addressof(flag)})\n"
                    "while not flag.value:\n    pass")
        done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        spinner = threading.Thread(target=spin)
        spinner.start()
        time.sleep(0.2)  # it is spinning by now
        flag[0] = 1
        assert done.wait(10), "the private spinner held this interpreter's GIL"
        spinner.join(10)
    finally:
        sys.setswitchinterval(old)


def test_two_of_them_run_at_once_on_two_threads() -> None:
    """Each of two threads spins in its own private interpreter until the other has started."""
    a, b = interp.acquire(), interp.acquire()
    try:
        assert a is not b
        flags = (ctypes.c_int64 * 2)()
        base = ctypes.addressof(flags)
        failures: list[BaseException] = []

        def side(p: interp.PrivateInterpreter, mine: int, theirs: int) -> None:
            try:
                p.run(f"import ctypes, time\nmine = ctypes.c_int64.from_address({base + 8 * mine})\n"
                      f"theirs = ctypes.c_int64.from_address({base + 8 * theirs})\n"
                      "mine.value = 1\nt = time.monotonic()\n"
                      "while not theirs.value:\n    assert time.monotonic() - t < 10, 'the other never ran'")
            except BaseException as e:  # noqa: BLE001
                failures.append(e)
        threads = [threading.Thread(target=side, args=(a, 0, 1)), threading.Thread(target=side, args=(b, 1, 0))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not failures
    finally:
        interp.release(a)
        interp.release(b)


def test_this_interpreters_thread_state_survives_a_run_on_the_same_thread(private: interp.PrivateInterpreter) -> None:
    """After a run on this thread, a ctypes callback (which finds this thread's state through
    this libc's pthread key) and a threading.local still work: the private keys took other slots."""
    local = threading.local()
    local.value = "mine"
    private.run("import threading\nt = threading.local()\nt.value = 'theirs'")
    seen: list[int] = []
    callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))(
        lambda x, y: seen.append(1) or (x[0] > y[0]) - (x[0] < y[0]))
    values = (ctypes.c_int * 4)(3, 1, 2, 0)
    libc = ctypes.CDLL(None)
    libc.qsort(values, 4, ctypes.sizeof(ctypes.c_int), callback)
    assert list(values) == [0, 1, 2, 3] and seen
    assert local.value == "mine"


def test_a_released_interpreter_is_handed_out_again() -> None:
    p = interp.acquire()
    p.run("marker = 'kept'")
    interp.release(p)
    q = interp.acquire()
    try:
        assert q is p
        q.run("assert marker == 'kept'")
    finally:
        interp.release(q)


def test_where_it_cannot_load_it_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interp, "_libpython", lambda: "/nonexistent/libpython3.11.so.1.0")
    assert "not found" in (interp.unavailable() or "")
    with pytest.raises(interp.InterpreterUnavailable, match="not found"):
        interp.PrivateInterpreter()


def test_a_callback_it_exports_runs_under_its_gil_on_an_attached_thread(private: interp.PrivateInterpreter) -> None:
    """What the vCPU threads do: attach once, then enter an exported function by its address
    (ctypes releases this interpreter's GIL for the call) as often as they like."""
    slots = (ctypes.c_int64 * 2)()
    private.run(f"import ctypes\nslots = (ctypes.c_int64 * 2).from_address({ctypes.addressof(slots)})\n"
                "def step():\n    slots[0] += 1\n    return slots[0] * 10\n"
                "STEP = ctypes.CFUNCTYPE(ctypes.c_int64)(step)\n"
                "slots[1] = ctypes.cast(STEP, ctypes.c_void_p).value")
    step = ctypes.CFUNCTYPE(ctypes.c_int64)(slots[1])
    got: list[int] = []

    def caller() -> None:
        private.attach()
        try:
            got.extend(step() for _ in range(1000))
        finally:
            private.detach()
    t = threading.Thread(target=caller)
    t.start()
    t.join(20)
    assert got == [10 * i for i in range(1, 1001)]


def test_the_threads_of_one_cpu_share_an_interpreter_until_the_last_gives_it_back() -> None:
    """Threads pinned to one CPU never run at once: one GIL costs them nothing, and each
    interpreter costs ~18 MiB. Another CPU's threads get another."""
    a, b = interp.acquire(cpu=0), interp.acquire(cpu=0)
    c = interp.acquire(cpu=1)
    released = False
    try:
        assert a is b and c is not a
        interp.release(a)
        assert a not in interp._free  # b still has it
        assert interp.acquire(cpu=0) is a  # and a thread of that CPU gets it again
        interp.release(a)
        interp.release(b)
        released = True
        assert a in interp._free
        d = interp.acquire(cpu=1)  # c's, not the free one
        assert d is c
        interp.release(d)
    finally:
        if not released:
            interp.release(a)
            interp.release(b)
        interp.release(c)
    assert c in interp._free


def test_two_threads_run_in_one_interpreter_each_with_its_own_thread_state() -> None:
    """The vCPU threads of one CPU each keep a thread state of the interpreter they share
    (attach) and enter it in turn; a run from each sees the other's __main__."""
    p = interp.acquire(cpu=0)
    q = interp.acquire(cpu=0)
    failures: list[BaseException] = []
    try:
        assert p is q
        p.run("import threading\nseen = set()")

        def side() -> None:
            try:
                p.attach()
                try:
                    for _ in range(50):
                        p.run("seen.add(threading.get_native_id())")
                finally:
                    p.detach()
            except BaseException as e:  # noqa: BLE001
                failures.append(e)
        threads = [threading.Thread(target=side) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not failures
        p.run("assert len(seen) == 2, seen")
    finally:
        interp.release(p)
        interp.release(q)


def test_with_every_interpreter_in_use_a_cpu_shares_the_least_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with more CPUs than MAX_INTERPRETERS: a CPU without one shares the least used
    (two CPUs' threads on one GIL) rather than running on the process's; a thread that names
    no CPU gets none."""
    users = dict(interp._users)
    held = [interp.acquire(cpu=1000), interp.acquire(cpu=1001)]
    extra: list[interp.PrivateInterpreter] = []
    try:
        while interp._free:  # every one in use
            extra.append(interp.acquire(cpu=1002 + len(extra)))
        monkeypatch.setattr(interp, "MAX_INTERPRETERS", len(interp._pool))
        held.append(interp.acquire(cpu=1000))  # CPU 1000's twice: 1001's is the least used
        shared = interp.acquire(cpu=2000)
        held.append(shared)
        assert shared is not held[0] and interp._users[shared] == 2
        assert interp.acquire(cpu=2000) is shared  # and CPU 2000's next thread finds it
        held.append(shared)
        with pytest.raises(interp.InterpreterUnavailable, match="in use"):
            interp.acquire()
    finally:
        for p in held + extra:
            interp.release(p)
    assert interp._users == users and not {1000, 1001, 2000} & set(interp._by_cpu)
