"""A CPython of its own inside this process, for a thread that must not share the GIL.

KVM serves a VM's vCPUs to one process, and Python 3.11 has one GIL per process: two vCPU
threads that run their fault loops in Python hand it to each other at every ioctl. A
PrivateInterpreter is a second copy of libpython (and with it of libc) loaded with
``dlmopen(LM_ID_NEWLM)`` into a link-map namespace of its own, initialized once, and entered by
a thread of this interpreter for as long as it likes: while that thread runs Python there, it
holds the private GIL and not this one. The two interpreters share memory, not objects:
addresses and fds travel as numbers (docs/performance.md, A GIL per vCPU thread on Python 3.11).

glibc only, and libpython built as a shared library; ``unavailable()`` says why not elsewhere.
Three things of a second libc in one process need care, each found as a crash or a hang:
- pthread keys: every libc copy hands out key indexes from 0, into the one per-thread array of
  ``struct pthread`` that they all find through %fs. So this libc holds the first
  RESERVED_KEYS indexes, never written, and each private libc first burns the indexes this one
  had used: the private keys then land in the held range.
- ctype tables: a libc sets up its thread-local ctype pointers only on the threads it starts;
  a thread of this interpreter calls the private libc's ``__ctype_init`` before it enters.
- unloading: a namespace is never unloaded, and glibc has 16. Interpreters are kept for the
  process in a pool, and a thread enters one private interpreter only (two of them use the same
  key indexes). Several threads may enter one: the threads pinned to one CPU share it.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sysconfig
import threading
from typing import Any

__all__ = ["InterpreterUnavailable", "PrivateInterpreter", "PrivateInterpreterError", "unavailable", "acquire",
           "release"]

LM_ID_NEWLM, RTLD_NOW = -1, 2
# Key indexes this libc holds for the private ones. Below 32: the first block of struct
# pthread's key array, which is never freed; a second-level block would be freed at thread
# exit by the libc that did not allocate it.
RESERVED_KEYS = 24
# The most private interpreters a process loads: glibc has 16 namespaces, the first is ours,
# and every libc copy takes static TLS.
MAX_INTERPRETERS = 8
ERROR_BYTES = 16 * 1024  # a failed run's traceback, as much of it as fits


class InterpreterUnavailable(Exception):
    """No private interpreter here: the message says why."""


class PrivateInterpreterError(Exception):
    """Code run in a private interpreter raised: the message is its traceback."""


_dl = ctypes.CDLL(None)


def _libpython() -> str:
    return os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")


def unavailable() -> str | None:
    """Why this process cannot load a private interpreter, or None where it can."""
    if platform.libc_ver()[0] != "glibc" or not hasattr(_dl, "dlmopen"):
        return "needs glibc's dlmopen"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return "needs libpython as a shared library (this Python is linked statically)"
    if not os.path.exists(_libpython()):
        return f"libpython not found at {_libpython()}"
    return None


_setup_lock = threading.Lock()
_first_free_key = -1  # this libc's first key index not in use when the keys were reserved


def _new_key(create: Any) -> int:
    key = ctypes.c_uint()
    if create(ctypes.byref(key), None):
        raise InterpreterUnavailable("pthread_key_create failed")
    return key.value


def _reserve_keys() -> int:
    """Hold this libc's key indexes up to RESERVED_KEYS (once); the first one it held."""
    global _first_free_key
    with _setup_lock:
        if _first_free_key < 0:
            create = _dl.pthread_key_create
            create.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            first = _new_key(create)
            if first > RESERVED_KEYS // 2:
                raise InterpreterUnavailable(f"this process already uses {first} pthread keys")
            while _new_key(create) < RESERVED_KEYS - 1:
                pass
            _first_free_key = first
        return _first_free_key


# What every private interpreter defines first: a runner that keeps its failures.
_PREAMBLE = """
import ctypes, traceback
def __run__(code, err_address, err_size):
    try:
        exec(compile(code, "<private>", "exec"), globals())
    except BaseException:
        text = traceback.format_exc().encode("utf-8", "replace")[:err_size - 1] + b"\\0"
        ctypes.memmove(err_address, text, len(text))
"""


class PrivateInterpreter:
    """One private interpreter, loaded and initialized on a thread of its own."""

    def __init__(self) -> None:
        why = unavailable()
        if why is not None:
            raise InterpreterUnavailable(why)
        first_free = _reserve_keys()
        self._error = ctypes.create_string_buffer(ERROR_BYTES)
        self._running = threading.Lock()
        self._attached: dict[int, tuple[int, int]] = {}  # thread ident -> (its gilstate, its thread state)
        failure: list[BaseException] = []
        loader = threading.Thread(target=self._load, args=(first_free, failure), name="private-interpreter")
        loader.start()
        loader.join()
        if failure:
            raise failure[0]

    def _load(self, first_free: int, failure: list[BaseException]) -> None:
        try:
            _dl.dlmopen.restype, _dl.dlmopen.argtypes = ctypes.c_void_p, [ctypes.c_long, ctypes.c_char_p, ctypes.c_int]
            _dl.dlsym.restype, _dl.dlsym.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]
            _dl.dlerror.restype = ctypes.c_char_p
            handle = _dl.dlmopen(LM_ID_NEWLM, _libpython().encode(), RTLD_NOW)
            if not handle:
                raise InterpreterUnavailable(f"dlmopen of {_libpython()}: {(_dl.dlerror() or b'').decode()}")

            def fn(name: bytes, restype: Any, *argtypes: Any) -> Any:
                address = _dl.dlsym(handle, name)
                if not address:
                    raise InterpreterUnavailable(f"{name.decode()} is not in the private namespace")
                return ctypes.CFUNCTYPE(restype, *argtypes)(address)
            create = fn(b"pthread_key_create", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
            while _new_key(create) < first_free:
                pass
            self._ctype_init = fn(b"__ctype_init", None)
            self._ctype_init()
            fn(b"Py_InitializeEx", None, ctypes.c_int)(0)  # 0: no signal handlers of its own
            self._run_string = fn(b"PyRun_SimpleString", ctypes.c_int, ctypes.c_char_p)
            self._ensure = fn(b"PyGILState_Ensure", ctypes.c_int)
            self._release = fn(b"PyGILState_Release", None, ctypes.c_int)
            ok = self._run_string(_PREAMBLE.encode()) == 0
            # Where the private keys landed: inside the held range, or this is not safe.
            last = _new_key(create)
            self._save = fn(b"PyEval_SaveThread", ctypes.c_void_p)
            self._restore = fn(b"PyEval_RestoreThread", None, ctypes.c_void_p)
            self._save()  # its GIL goes to the threads that enter
            if not ok:
                raise InterpreterUnavailable("the private interpreter could not define its runner")
            if last >= RESERVED_KEYS:
                raise InterpreterUnavailable(f"the private interpreter's pthread keys reach index {last}, "
                                             f"past the {RESERVED_KEYS} held for it")
        except BaseException as e:  # noqa: BLE001 (raised on the thread that asked)
            failure.append(e)

    def run(self, code: str) -> None:
        """Run ``code`` in this interpreter's ``__main__``, on the calling thread, under its own
        GIL (this interpreter's GIL is free meanwhile). Raises PrivateInterpreterError with the
        code's traceback if it raised."""
        with self._running:  # one error buffer: the threads that share it run one at a time
            self._error.value = b""
            self._ctype_init()
            gil = self._ensure()
            try:
                failed = self._run_string(
                    f"__run__({code!r}, {ctypes.addressof(self._error)}, {ERROR_BYTES})".encode())
            finally:
                self._release(gil)
            error = self._error.value
        if failed:
            raise PrivateInterpreterError("the private interpreter's runner failed (its traceback is on stderr)")
        if error:
            raise PrivateInterpreterError(error.decode("utf-8", "replace"))


    def attach(self) -> None:
        """Keep a thread state of this interpreter on the calling thread until ``detach``. A
        thread without one gets a new one at every entry (PyGILState_Ensure creates it, and its
        Release deletes it): a ctypes callback exported by this interpreter then costs ~11 us
        a call here, and ~0.3 us with one kept."""
        self._ctype_init()
        gil = self._ensure()
        self._attached[threading.get_ident()] = (gil, self._save())

    def detach(self) -> None:
        """Drop what ``attach`` kept on the calling thread (it must have attached)."""
        gil, state = self._attached.pop(threading.get_ident())
        self._restore(state)
        self._release(gil)


_pool: list[PrivateInterpreter] = []
_free: list[PrivateInterpreter] = []
_users: dict[PrivateInterpreter, int] = {}  # the ones in use: how many acquired each
_by_cpu: dict[int, PrivateInterpreter] = {}  # the ones in use for the threads pinned to a CPU


def acquire(cpu: int | None = None) -> PrivateInterpreter:
    """A private interpreter for the calling thread's use until release(). Threads pinned to
    one host CPU (``cpu``) share one: they never run at once, so one GIL costs them nothing,
    and each interpreter costs ~18 MiB (docs/performance.md). Else one used before if any is
    free, or a new one (at most MAX_INTERPRETERS in the process). Where all are in use, a
    CPU's threads share the least used one: two CPUs' threads on one GIL, rather than on the
    process's with every other thread."""
    with _setup_lock:
        interp = _by_cpu.get(cpu) if cpu is not None else None
        if interp is None and _free:
            interp = _free.pop()
        if interp is None and len(_pool) >= MAX_INTERPRETERS:
            if cpu is None or not _users:
                raise InterpreterUnavailable(f"all {MAX_INTERPRETERS} private interpreters are in use")
            interp = min(_users, key=_users.__getitem__)
        if interp is not None:
            return _take(interp, cpu)
    interp = PrivateInterpreter()  # loading takes ~50 ms: not under the lock
    with _setup_lock:
        _pool.append(interp)
        if cpu is not None and cpu in _by_cpu:  # another thread of that CPU loaded one meanwhile
            _free.append(interp)
            interp = _by_cpu[cpu]
        return _take(interp, cpu)


def _take(interp: PrivateInterpreter, cpu: int | None) -> PrivateInterpreter:
    _users[interp] = _users.get(interp, 0) + 1
    if cpu is not None:
        _by_cpu[cpu] = interp
    return interp


def release(interp: PrivateInterpreter) -> None:
    """Give back what acquire() gave: free for later threads once every user has given it
    back. A thread that entered it must be done with it."""
    with _setup_lock:
        users = _users.get(interp, 0) - 1
        if users > 0:
            _users[interp] = users
            return
        _users.pop(interp, None)
        for cpu in [c for c, i in _by_cpu.items() if i is interp]:
            del _by_cpu[cpu]
        if interp in _pool and interp not in _free:
            _free.append(interp)
