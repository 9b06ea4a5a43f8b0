"""The control API's request bodies: each is parsed into a record here, once, and anything
wrong with it (a missing, unknown or invalid field) is an ApiError 400 that names the field."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from postcopy.destination.readahead import DEFAULT_BASE
from postcopy.destination.vcpu_priority import POSTCOPY_VCPU_NICE
from postcopy.source.page_workers import DEFAULT_POLL_US, MAX_POLL_US
from vmm.guest.workloads import WORKLOADS
from vmm.machine import MachineConfig, MachineError
from vmm.memory import GuestMemoryError, parse_size
from vmm.priority import MAX_NICE

FaultModeChoice = Literal["exit", "classic", "auto"]
FAULT_MODES: Final = ("exit", "classic", "auto")
MAX_TOKEN_LEN: Final = 1024
MAX_URL_LEN: Final = 2048
MAX_AFTER_S: Final = 3600.0
MAX_READAHEAD: Final = 256
MAX_SEED: Final = (1 << 63) - 1
MAX_PATH_LEN: Final = 4096
# RFC 6750's b64token: what a bearer token may hold (it goes into an HTTP header as is).
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MAX_RETRY_DEADLINE_S: Final = 3600.0


class ApiError(Exception):
    """A request the service refuses; ``code`` is the HTTP status of the answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Fields:
    """Takes the fields of one JSON object by name; ``done()`` refuses whatever is left."""

    def __init__(self, body: Any, what: str) -> None:
        if not isinstance(body, dict):
            raise ApiError(400, f"{what}: the body must be a JSON object, got {type(body).__name__}")
        self._body = dict(body)
        self._what = what

    def _bad(self, name: str, why: str) -> ApiError:
        return ApiError(400, f"{self._what}: field {name!r} {why}")

    def take(self, name: str, required: bool) -> Any:
        if name not in self._body:
            if required:
                raise self._bad(name, "is required")
            return None
        return self._body.pop(name)

    def integer(self, name: str, default: int | None, lo: int, hi: int) -> int:
        value = self.take(name, default is None)
        if value is None:
            assert default is not None
            return default
        if type(value) is not int or not lo <= value <= hi:
            raise self._bad(name, f"must be an integer from {lo} to {hi}, got {value!r}")
        return value

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        value = self.take(name, False)
        if value is None:
            return default
        if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
            raise self._bad(name, f"must be a number from {lo} to {hi}, got {value!r}")
        return float(value)

    def text(self, name: str, *, required: bool, max_len: int) -> str | None:
        value = self.take(name, required)
        if value is None:
            return None
        if type(value) is not str or not value or len(value) > max_len:
            raise self._bad(name, f"must be a non-empty string of at most {max_len} characters")
        return value

    def token(self, name: str, *, required: bool) -> str | None:
        """A bearer token: RFC 6750 b64token characters only (it is sent in a header)."""
        value = self.text(name, required=required, max_len=MAX_TOKEN_LEN)
        if value is not None and not _TOKEN_RE.fullmatch(value):
            raise self._bad(name, "must hold only the characters A-Z a-z 0-9 - . _ ~ + / (then any '=')")
        return value

    def path(self, name: str) -> str | None:
        """A file or directory path on the VMM's host (optional)."""
        value = self.text(name, required=False, max_len=MAX_PATH_LEN)
        if value is not None and "\0" in value:
            raise self._bad(name, "must not contain NUL")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.take(name, False)
        if value is None:
            return default
        if type(value) is not bool:
            raise self._bad(name, f"must be true or false, got {value!r}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.take(name, False)
        if value is None:
            return default
        if value not in choices:
            raise self._bad(name, f"must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def url(self, name: str, *, required: bool) -> str | None:
        value = self.text(name, required=required, max_len=MAX_URL_LEN)
        if value is not None and not value.startswith(("http://", "https://")):
            raise self._bad(name, f"must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/") if value is not None else None

    def nested(self, name: str) -> _Fields | None:
        value = self.take(name, False)
        return None if value is None else _Fields(value, f"{self._what}: {name}")

    def done(self) -> None:
        if self._body:
            raise ApiError(400, f"{self._what}: unknown field(s) {', '.join(sorted(map(repr, self._body)))}")


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port); ValueError says what is wrong."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"want HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


@dataclass(slots=True, frozen=True)
class VmSpec:
    """PUT /v1/vm: the guest to boot."""

    mem_bytes: int
    vcpus: int
    workload: str
    seed: int
    state_dir: str | None = None  # guest RAM in DIR/ram (tmpfs), the header saved there at switchover
    prefill: float = 0.0  # fraction of the data region written before the guest starts (memtouch)

    @classmethod
    def parse(cls, body: Any) -> VmSpec:
        f = _Fields(body, "PUT /v1/vm")
        mem = f.take("mem", False)
        try:
            mem_bytes = 256 << 20 if mem is None else mem if type(mem) is int else parse_size(str(mem))
        except GuestMemoryError as e:
            raise ApiError(400, f"PUT /v1/vm: field 'mem': {e}") from None
        vcpus = f.integer("vcpus", 1, 1, 1 << 16)
        workload = f.choice("workload", tuple(WORKLOADS), "memtouch")
        seed = f.integer("seed", 1, 0, MAX_SEED)
        state_dir = f.path("state_dir")
        prefill = f.number("prefill", 0.0, 0.0, 1.0)
        f.done()
        if prefill and workload != "memtouch":
            raise ApiError(400, f"PUT /v1/vm: field 'prefill' applies only to workload memtouch, not {workload}")
        try:
            MachineConfig(mem_bytes, vcpus).validate()
        except MachineError as e:
            raise ApiError(400, f"PUT /v1/vm: {e}") from None
        return cls(mem_bytes, vcpus, workload, seed, state_dir, prefill)


@dataclass(slots=True, frozen=True)
class OutgoingSpec:
    """PUT /v1/migration/outgoing: where the page server listens and the token it wants; TLS
    with a certificate and key; or ``resume``: serve again, from its state directory, a
    migration whose page server died (on a VMM without a VM; the token comes from there).
    ``page_workers``: plain TCP page sockets served by a process each (PageServer);
    ``page_poll_us``: how long such a process polls for the next request of a client that
    polls for its answers (?poll=1) before it sleeps."""

    host: str
    port: int
    token: str | None
    advertise_url: str | None
    tls_cert: str | None = None
    tls_key: str | None = None
    resume: str | None = None
    page_workers: bool = True
    page_poll_us: int = DEFAULT_POLL_US

    @classmethod
    def parse(cls, body: Any) -> OutgoingSpec:
        f = _Fields(body, "PUT /v1/migration/outgoing")
        listen = f.text("listen", required=True, max_len=MAX_URL_LEN)
        resume = f.path("resume")
        token = f.token("token", required=resume is None)
        advertise_url = f.url("advertise_url", required=False)
        tls_cert, tls_key = f.path("tls_cert"), f.path("tls_key")
        page_workers = f.flag("page_workers", True)
        page_poll_us = f.integer("page_poll_us", DEFAULT_POLL_US, 0, MAX_POLL_US)
        f.done()
        if (tls_cert is None) != (tls_key is None):
            raise ApiError(400, "PUT /v1/migration/outgoing: fields 'tls_cert' and 'tls_key' go together")
        if resume is not None and token is not None:
            raise ApiError(400, "PUT /v1/migration/outgoing: 'resume' takes the token from the state directory: "
                                "give no 'token'")
        if advertise_url is not None and advertise_url.startswith("https://") != (tls_cert is not None):
            raise ApiError(400, "PUT /v1/migration/outgoing: 'advertise_url' must be https:// exactly when "
                                "'tls_cert' is given")
        assert listen is not None
        try:
            host, port = parse_listen(listen)
        except ValueError as e:
            raise ApiError(400, f"PUT /v1/migration/outgoing: field 'listen': {e}") from None
        return cls(host, port, token, advertise_url, tls_cert, tls_key, resume, page_workers, page_poll_us)


@dataclass(slots=True, frozen=True)
class SourceCheck:
    """The guest's verification sweep on the source, made before the migration."""

    ok: bool
    pages: int | None
    errors: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "pages": self.pages, "errors": self.errors}


@dataclass(slots=True, frozen=True)
class IncomingSpec:
    """PUT /v1/migration/incoming: the page server to pull the guest from, and how."""

    source_url: str
    token: str
    fault_mode: FaultModeChoice
    after_s: float
    readahead: int
    source_check: SourceCheck | None
    timeline: bool  # the report carries the timeline (Destination.metrics()), for report.html
    tls_ca: str | None = None  # reach the page server over TLS, trusting only this CA
    retry_deadline_s: float | None = None  # how long one outage of the page server may last
    vcpu_nice: int = POSTCOPY_VCPU_NICE  # the vCPU threads' nice value while memory is missing
    readahead_max: int = MAX_READAHEAD  # the largest window a scanning vCPU's readahead grows to

    @classmethod
    def parse(cls, body: Any) -> IncomingSpec:
        what = "PUT /v1/migration/incoming"
        f = _Fields(body, what)
        source_url = f.url("source_url", required=True)
        token = f.token("token", required=True)
        fault_mode = f.choice("fault_mode", FAULT_MODES, "exit")
        after_s = f.number("after_s", 1.0, 0.0, MAX_AFTER_S)
        readahead = f.integer("readahead", DEFAULT_BASE, 1, MAX_READAHEAD)
        readahead_max = f.integer("readahead_max", MAX_READAHEAD, 1, MAX_READAHEAD)
        timeline = f.take("timeline", False)
        if timeline is None:
            timeline = False
        elif type(timeline) is not bool:
            raise ApiError(400, f"{what}: field 'timeline' must be true or false")
        tls_ca = f.path("tls_ca")
        retry_deadline = f.number("retry_deadline_s", -1.0, 0.0, MAX_RETRY_DEADLINE_S)
        vcpu_nice = f.integer("vcpu_nice", POSTCOPY_VCPU_NICE, 0, MAX_NICE)
        check = f.nested("source_check")
        f.done()
        assert source_url is not None
        if readahead_max < readahead:
            raise ApiError(400, f"{what}: 'readahead_max' ({readahead_max}) is below 'readahead' ({readahead})")
        if source_url.startswith("https://") != (tls_ca is not None):
            raise ApiError(400, f"{what}: 'source_url' must be https:// exactly when 'tls_ca' is given")
        source_check = None
        if check is not None:
            ok = check.take("ok", True)
            if type(ok) is not bool:
                raise ApiError(400, f"{what}: field 'source_check.ok' must be true or false")
            pages = check.integer("pages", -1, -1, 1 << 40)
            errors = check.integer("errors", -1, -1, 1 << 40)
            check.take("finished", False)  # POST /v1/vm/sweep's answer may be passed on whole
            check.done()
            source_check = SourceCheck(ok, pages if pages >= 0 else None, errors if errors >= 0 else None)
        assert source_url is not None and token is not None
        return cls(source_url, token, fault_mode, after_s, readahead, source_check, timeline,  # type: ignore[arg-type]
                   tls_ca, retry_deadline if retry_deadline >= 0 else None, vcpu_nice, readahead_max)
