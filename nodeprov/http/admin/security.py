"""Admin sessions, CSRF tokens and the login throttle (per client address; global slowdown).

Sessions live in memory (a restart logs everyone out): the cookie carries only a random
id. Each session has its own CSRF token, required on every POST and compared in
constant time. Before login the form is protected by a double-submit cookie.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SESSION_COOKIE = "nodeprov_admin"
LOGIN_COOKIE = "nodeprov_admin_login"
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
    """Server-side sessions keyed by a random cookie value."""

    def __init__(self, seconds: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._by_id: dict[str, Session] = {}

    def create(self) -> Session:
        now = self.clock()
        self._by_id = {k: s for k, s in self._by_id.items() if s.expires_at > now}
        while len(self._by_id) >= MAX_SESSIONS:  # drop the oldest (dicts keep insertion order)
            del self._by_id[next(iter(self._by_id))]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + self.seconds)
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self.clock():
            del self._by_id[session_id]
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._by_id.pop(session_id, None)


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


def address_key(host: str) -> str:
    """The unit an address is throttled by: an IPv4 address, an IPv6 /64 (one site's LAN)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Throttle:
    """Login throttle: a lockout per client address, a global slowdown that never locks.

    ``per_ip`` failures from one address (IPv6: one /64) lock that address for
    ``lock_seconds``, doubling with every further failure up to ``max_lock``; a locked
    address is refused before its password is checked. Failures from everywhere only slow
    checking down: past ``global_limit`` of them the login holds its password-check slot
    for ``slow_seconds`` after each wrong password, which caps the guesses per second
    the whole world gets, while a right password from an address that is not locked is
    always let in. A failure older than ``window`` seconds is forgotten.
    """

    def __init__(
        self,
        *,
        per_ip: int = 5,
        global_limit: int = 50,
        lock_seconds: float = 60.0,
        max_lock: float = 3600.0,
        window: float = 900.0,
        slow_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_ip, self.global_limit = per_ip, global_limit
        self.lock_seconds, self.max_lock, self.window = lock_seconds, max_lock, window
        self.slow_seconds = slow_seconds
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

    def retry_after(self, ip: str) -> float:
        """Seconds until ``ip`` may try again (0: it may try now). Never global."""
        failures = self._ips.get(address_key(ip))
        return 0.0 if failures is None else max(0.0, failures.locked_until - self.clock())

    def slowdown(self) -> float:
        """Seconds to hold the check slot after a wrong password (0 unless under a flood)."""
        if self.clock() - self._all.last > self.window:
            return 0.0
        return self.slow_seconds if self._all.count >= self.global_limit else 0.0

    def _bump(self, failures: _Failures, limit: int, now: float) -> None:
        if now - failures.last > self.window:
            failures.count = 0
        failures.count += 1
        failures.last = now
        if failures.count >= limit:
            extra = failures.count - limit
            failures.locked_until = now + min(self.max_lock, self.lock_seconds * 2**extra)

    def failed(self, ip: str) -> None:
        now = self.clock()
        if len(self._ips) > 10_000:  # forget stale entries so a spray cannot grow memory
            self._ips = {k: v for k, v in self._ips.items() if now - v.last <= self.window}
        self._bump(self._ips.setdefault(address_key(ip), _Failures()), self.per_ip, now)
        if now - self._all.last > self.window:
            self._all.count = 0
        self._all.count += 1
        self._all.last = now

    def succeeded(self, ip: str) -> None:
        self._ips.pop(address_key(ip), None)
