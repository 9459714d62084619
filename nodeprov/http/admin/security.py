"""Admin sessions, CSRF tokens, the login throttle (per-address delays) and known devices.

Sessions live in memory (a restart logs everyone out): the cookie carries only a random
id; with the ledger on PostgreSQL (several processes serve one node) the id is signed, so
every process accepts it, and a restart keeps logins. Each session has its own CSRF
token, required on every POST and compared in constant time. Before login the form is
protected by a double-submit cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nodeprov.http.auth import address_key

SESSION_COOKIE = "nodeprov_admin"
LOGIN_COOKIE = "nodeprov_admin_login"
DEVICE_COOKIE = "nodeprov_admin_device"
MAX_SESSIONS = 64


def same(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two secrets (False if either is missing or empty)."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass
class Session:
    id: str
    csrf: str
    expires_at: float
    data: dict[str, Any] = field(default_factory=dict)  # e.g. a pending melt quote


class Sessions:
    """Server-side sessions keyed by a random cookie value.

    With ``key`` (several processes serve one node: ``start --workers``, several machines)
    a session id is also signed: ``<nonce>.<expiry unix time>.<hmac>``, its CSRF token an
    HMAC of it, so any process with the same key accepts a login made at another one.
    What a session keeps (``data``, e.g. a payout quote awaiting confirmation) and a
    logout stay in the process that saw them; the logged-out browser drops its cookie.
    """

    def __init__(
        self,
        seconds: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        key: bytes | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.seconds = seconds
        self.clock = clock
        self.wall = wall
        self._key = key
        self._by_id: dict[str, Session] = {}
        self._dropped: dict[str, float] = {}  # signed ids logged out here -> their expiry

    def _mac(self, payload: str) -> str:
        assert self._key is not None
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def _csrf(self, session_id: str) -> str:
        return self._mac("csrf\0" + session_id)

    def create(self) -> Session:
        now = self.clock()
        self._by_id = {k: s for k, s in self._by_id.items() if s.expires_at > now}
        while len(self._by_id) >= MAX_SESSIONS:  # drop the oldest (dicts keep insertion order)
            del self._by_id[next(iter(self._by_id))]
        if self._key is None:
            session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        else:
            payload = f"{secrets.token_urlsafe(24)}.{int(self.wall()) + self.seconds}"
            session_id = f"{payload}.{self._mac(payload)}"
            csrf = self._csrf(session_id)
        session = Session(session_id, csrf, now + self.seconds)
        self._by_id[session.id] = session
        return session

    def _adopt(self, session_id: str) -> Session | None:
        """A session signed by another process with the same key (None if not valid)."""
        if self._key is None or session_id.count(".") != 2 or session_id in self._dropped:
            return None
        nonce, expiry, mac = session_id.split(".")
        if not expiry.isdigit() or not same(mac, self._mac(f"{nonce}.{expiry}")):
            return None
        left = int(expiry) - self.wall()
        if left <= 0:
            return None
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[next(iter(self._by_id))]
        session = Session(session_id, self._csrf(session_id), self.clock() + left)
        self._by_id[session_id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id) or self._adopt(session_id)
        if session is None:
            return None
        if session.expires_at <= self.clock():
            del self._by_id[session_id]
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            session = self._by_id.pop(session_id, None)
            if self._key is not None and session is not None:
                now = self.clock()
                self._dropped = {k: t for k, t in self._dropped.items() if t > now}
                self._dropped[session_id] = session.expires_at


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0


class Throttle:
    """Login throttle: per address a delay that grows, never a lockout; a flood mode.

    After ``per_ip`` failures from one address (IPv6: one /64) each further attempt from it
    waits ``delay_seconds`` before its password is checked, doubling with every failure up
    to ``max_delay``, and the address gets one check at a time: guessing stays slow, yet a
    right password is always checked, so clients that share an address (a same-host proxy,
    a Tor onion service) cannot lock its owner out. Past ``global_limit`` failures from
    everywhere the node is under a flood (:meth:`flooded`): a login that finds every
    password check busy is refused at once instead of queueing. A failure older than
    ``window`` seconds is forgotten.
    """

    def __init__(
        self,
        *,
        per_ip: int = 5,
        global_limit: int = 50,
        delay_seconds: float = 1.0,
        max_delay: float = 30.0,
        window: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_ip, self.global_limit = per_ip, global_limit
        self.delay_seconds, self.max_delay, self.window = delay_seconds, max_delay, window
        self.clock = clock
        self._ips: dict[str, _Failures] = {}
        self._all = _Failures()
        self._checking: set[str] = set()

    def begin(self, ip: str) -> bool:
        """Claim ``ip``'s one password check at a time (False: one is running already).

        Without it one address could queue many guesses before its first failure counts.
        """
        key = address_key(ip)
        if key in self._checking:
            return False
        self._checking.add(key)
        return True

    def end(self, ip: str) -> None:
        self._checking.discard(address_key(ip))

    def delay(self, ip: str) -> float:
        """Seconds ``ip``'s next attempt waits before its password is checked (0: none)."""
        failures = self._ips.get(address_key(ip))
        if failures is None or self.clock() - failures.last > self.window:
            return 0.0
        if failures.count < self.per_ip:
            return 0.0
        extra = min(failures.count - self.per_ip, 32)  # bounds the power, not the delay
        return float(min(self.max_delay, self.delay_seconds * 2.0**extra))

    def flooded(self) -> bool:
        """Whether failures from everywhere passed ``global_limit`` within the window."""
        if self.clock() - self._all.last > self.window:
            return False
        return self._all.count >= self.global_limit

    @staticmethod
    def _bump(failures: _Failures, now: float, window: float) -> None:
        if now - failures.last > window:
            failures.count = 0
        failures.count += 1
        failures.last = now

    def failed(self, ip: str) -> None:
        now = self.clock()
        if len(self._ips) > 10_000:  # forget stale entries so a spray cannot grow memory
            self._ips = {k: v for k, v in self._ips.items() if now - v.last <= self.window}
        self._bump(self._ips.setdefault(address_key(ip), _Failures()), now, self.window)
        self._bump(self._all, now, self.window)

    def succeeded(self, ip: str) -> None:
        self._ips.pop(address_key(ip), None)


class KnownDevices:
    """Browsers that logged in before carry a signed cookie that lets them past the address
    throttle and the flood refusal: the owner's browser is never kept out by what others
    sharing (or spoofing) its address do.

    The cookie is ``<id>.<expiry>.<hmac>``, keyed by the password hash, so a new password
    forgets every device. ``per_device`` wrong passwords sent with one cookie make it count
    for nothing (a stolen cookie buys a few guesses, not a way past the throttle).
    """

    def __init__(
        self,
        secret: str,
        *,
        seconds: int = 90 * 24 * 3600,
        per_device: int = 5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = hashlib.sha256(b"nodeprov admin device\0" + secret.encode()).digest()
        self.seconds, self.per_device, self.clock = seconds, per_device, clock
        self._failures: dict[str, int] = {}

    def _mac(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        """A new device cookie value."""
        payload = f"{secrets.token_urlsafe(16)}.{int(self.clock()) + self.seconds}"
        return f"{payload}.{self._mac(payload)}"

    def check(self, value: str | None) -> str | None:
        """The device id of a valid, unexpired cookie that has not failed too often."""
        if not value or value.count(".") != 2:
            return None
        device, expiry, mac = value.split(".")
        if not same(mac, self._mac(f"{device}.{expiry}")) or not expiry.isdigit():
            return None
        if int(expiry) <= self.clock() or self._failures.get(device, 0) >= self.per_device:
            return None
        return device

    def failed(self, device: str) -> None:
        if len(self._failures) > 10_000:
            self._failures = {k: v for k, v in self._failures.items() if v >= self.per_device}
        self._failures[device] = self._failures.get(device, 0) + 1

    def succeeded(self, device: str) -> None:
        self._failures.pop(device, None)
