"""The admin password store, the login throttle, sessions and the money text (no servers)."""

from __future__ import annotations

import asyncio
import re
import stat
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from nodeprov.admin_password import (
    check_hash,
    hash_password,
    load_or_create,
    password_file,
    set_password,
    verify_password,
)
from nodeprov.config import AdminSection, Config, NodeSection
from nodeprov.config_load import load_config
from nodeprov.core.admin_queries import channel_of
from nodeprov.errors import ConfigError
from nodeprov.http.admin import build_admin_app
from nodeprov.http.admin.format import parse_sat, sat_text
from nodeprov.http.admin.security import KnownDevices, Sessions, Throttle, same
from tests.support.waiting import until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def config_in(tmp_path: Path, password_hash: str = "") -> Config:
    return Config(
        node=NodeSection(data_dir=tmp_path / "data"),
        admin=AdminSection(password_hash=password_hash),
    )


@pytest.mark.parametrize("scheme", ["scrypt", "pbkdf2_sha256"])
def test_hash_and_verify(scheme: str) -> None:
    encoded = hash_password("s3cret-password", scheme)
    assert encoded.startswith(f"{scheme}$")
    check_hash(encoded)
    assert verify_password("s3cret-password", encoded)
    assert not verify_password("s3cret-passwore", encoded)
    assert hash_password("s3cret-password", scheme) != encoded  # salted
    tampered = encoded[:-2] + ("AA" if encoded[-2:] != "AA" else "BB")
    assert not verify_password("s3cret-password", tampered)


def test_malformed_hashes_never_verify() -> None:
    salt_key = "c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5"
    bad_hashes = (
        "",
        "plaintext",
        "scrypt$14$8$1$AAAA",
        f"scrypt$99$8$1${salt_key}",
        f"scrypt$20$32$1${salt_key}",  # would need gigabytes
        f"pbkdf2_sha256$10${salt_key}",
        "md5$abc$def",
    )
    for bad in bad_hashes:
        with pytest.raises(ValueError):
            check_hash(bad)
        assert not verify_password("anything", bad)
    with pytest.raises(ValueError, match="at least 8"):
        hash_password("short")


def test_first_start_generates_a_password_once(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    encoded, generated = load_or_create(config)
    assert generated is not None and len(generated) >= 20
    assert verify_password(generated, encoded)
    path = password_file(config)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == encoded
    assert load_or_create(config) == (encoded, None)  # not shown again


def test_config_hash_wins_and_set_password_replaces_the_file(tmp_path: Path) -> None:
    configured = hash_password("from-the-config", "pbkdf2_sha256")
    assert load_or_create(config_in(tmp_path, configured)) == (configured, None)
    assert not password_file(config_in(tmp_path)).exists()
    config = config_in(tmp_path)
    encoded = set_password(config, "a new password")
    assert load_or_create(config) == (encoded, None)
    assert stat.S_IMODE(password_file(config).stat().st_mode) == 0o600
    password_file(config).write_text("garbage\n")
    with pytest.raises(ConfigError, match="set-password"):
        load_or_create(config)
    with pytest.raises(ConfigError, match=r"admin\.password_hash"):
        load_or_create(config_in(tmp_path, "scrypt$broken"))


def test_config_accepts_the_hash_format(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    encoded = hash_password("from-the-config")
    file.write_text(
        f'[wallet]\nmints = ["http://127.0.0.1:1"]\n[admin]\npassword_hash = "{encoded}"\n'
    )
    assert load_config(file, {}, require_upstream=False).admin.password_hash == encoded


def test_generated_password_is_printed_once(tmp_path: Path, capsys: Any) -> None:
    config = config_in(tmp_path)
    build_admin_app(object(), config)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "Admin dashboard password" in err
    plaintext = err.split("stored hashed): ")[1].split()[0]
    assert verify_password(plaintext, password_file(config).read_text().strip())
    build_admin_app(object(), config)  # type: ignore[arg-type]
    assert "password" not in capsys.readouterr().err


def test_throttle_delays_a_failing_address_and_backs_off() -> None:
    clock = Clock()
    throttle = Throttle(per_ip=3, global_limit=100, delay_seconds=2, max_delay=5, clock=clock)
    for _ in range(2):
        throttle.failed("1.1.1.1")
    assert throttle.delay("1.1.1.1") == 0
    throttle.failed("1.1.1.1")
    assert throttle.delay("1.1.1.1") == 2
    assert throttle.delay("2.2.2.2") == 0  # other clients are not affected
    throttle.failed("1.1.1.1")  # one more failure doubles the delay
    assert throttle.delay("1.1.1.1") == 4
    for _ in range(100):
        throttle.failed("1.1.1.1")
    assert throttle.delay("1.1.1.1") == 5  # up to the cap: slow, never shut
    clock.now += 10_000  # failures outside the window are forgotten
    assert throttle.delay("1.1.1.1") == 0
    throttle.failed("1.1.1.1")
    throttle.succeeded("1.1.1.1")
    assert throttle.delay("1.1.1.1") == 0


def test_a_spray_from_many_addresses_is_a_flood_but_delays_no_address() -> None:
    clock = Clock()
    throttle = Throttle(per_ip=5, global_limit=10, clock=clock)
    assert not throttle.flooded()
    for i in range(200):
        throttle.failed(f"10.0.{i}.1")  # a spray: one failure per address
    assert throttle.delay("192.168.1.1") == 0  # nobody else is slowed
    assert throttle.delay("10.0.7.1") == 0  # nor the sprayers, one guess each
    assert throttle.flooded()
    clock.now += 10_000
    assert not throttle.flooded()


def test_an_ipv6_64_is_one_address_and_checks_are_one_at_a_time() -> None:
    throttle = Throttle(per_ip=3, delay_seconds=1, clock=Clock())
    for i in range(3):
        throttle.failed(f"2001:db8:1:2::{i + 1:x}")  # three hosts of one /64
    assert throttle.delay("2001:db8:1:2:ffff::9") == 1
    assert throttle.delay("2001:db8:1:3::1") == 0
    assert throttle.begin("10.1.1.1") and not throttle.begin("10.1.1.1")
    assert throttle.begin("10.1.1.2")
    throttle.end("10.1.1.1")
    assert throttle.begin("10.1.1.1")


def test_a_known_device_cookie_is_signed_and_expires() -> None:
    clock = Clock()
    devices = KnownDevices("scrypt$the-hash", seconds=100, per_device=2, clock=clock)
    cookie = devices.issue()
    device = devices.check(cookie)
    assert device is not None
    assert devices.check(cookie[:-1] + ("0" if cookie[-1] != "0" else "1")) is None
    assert KnownDevices("scrypt$another-hash", clock=clock).check(cookie) is None
    devices.failed(device)
    devices.failed(device)  # a cookie sent with wrong passwords stops counting
    assert devices.check(cookie) is None
    fresh = devices.issue()
    clock.now += 101
    assert devices.check(fresh) is None


ADDRESSES = [f"198.51.{i // 200}.{i % 200 + 1}" for i in range(30)]


async def _login(http: httpx.AsyncClient, password: str, **headers: str) -> httpx.Response:
    page = await http.get("/login", headers=headers)
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match, page.text
    return await http.post("/login", data={"csrf": match[1], "password": password}, headers=headers)


def _client_from(app: Any, host: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(host, 40000))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://node")


async def _login_from(app: Any, host: str, password: str) -> httpx.Response:
    async with _client_from(app, host) as http:
        return await _login(http, password)


def _admin_app(tmp_path: Path) -> tuple[Any, Any, list[float]]:
    """The admin app, its state and the delays it asked for (recorded, not waited)."""
    app = build_admin_app(
        object(),  # type: ignore[arg-type]
        config_in(tmp_path),
        password_hash=hash_password("the-right-one"),
    )
    admin = app.state.admin
    slept: list[float] = []

    async def no_wait(seconds: float) -> None:
        slept.append(seconds)

    admin.sleep = no_wait
    return app, admin, slept


async def test_a_login_flood_from_many_addresses_never_locks_out_the_right_password(
    tmp_path: Path,
) -> None:
    """30 addresses guess 8 times each (240 tries, far past the global limit of 50)."""
    app, admin, slept = _admin_app(tmp_path)
    codes: dict[int, int] = {}
    for attempt in range(8):
        for host in ADDRESSES:
            code = (await _login_from(app, host, f"guess-{attempt}")).status_code
            codes[code] = codes.get(code, 0) + 1
    # Every guess was checked; past 5 failures an address's guesses waited, longer each time.
    assert codes == {401: 8 * len(ADDRESSES)}
    throttle = admin.throttle
    assert slept == [throttle.delay_seconds * 2**i for i in range(3) for _ in ADDRESSES]
    # The owner, from an address of its own, gets in at the first try, and without delay.
    slept.clear()
    owner = await _login_from(app, "203.0.113.7", "the-right-one")
    assert owner.status_code == 303 and "nodeprov_admin=" in owner.headers["set-cookie"]
    assert slept == []
    # Also over IPv6, and a wrong password from a fresh address is a plain 401.
    assert (await _login_from(app, "2001:db8::7", "the-right-one")).status_code == 303
    assert (await _login_from(app, "203.0.113.8", "typo")).status_code == 401
    # From a flooding address the right password still gets in, after that address's delay.
    assert (await _login_from(app, ADDRESSES[0], "the-right-one")).status_code == 303
    assert slept[-1] == throttle.delay_seconds * 2**3


async def test_the_owner_sharing_an_address_with_a_guesser_is_never_locked_out(
    tmp_path: Path,
) -> None:
    """Behind a same-host proxy or an onion service every client is 127.0.0.1: guesses
    slow that address down, but the right password is still checked and let in, and a
    browser that logged in before skips the delay altogether."""
    app, admin, slept = _admin_app(tmp_path)
    async with _client_from(app, "127.0.0.1") as owner:
        assert (await _login(owner, "the-right-one")).status_code == 303
        assert owner.cookies.get("nodeprov_admin_device")
        owner.cookies.delete("nodeprov_admin")  # the session ended; the device is remembered
        async with _client_from(app, "127.0.0.1") as guesser:
            for i in range(12):
                assert (await _login(guesser, f"guess-{i}")).status_code == 401
            assert slept and slept[-1] == admin.throttle.max_delay  # guessing stays slow
            slept.clear()
            # The owner's browser: in at once, however many guesses came from its address.
            assert (await _login(owner, "the-right-one")).status_code == 303
            assert slept == []
            # A new browser of the owner's: in too, after the address's delay.
            r = await _login(guesser, "the-right-one")
            assert r.status_code == 303 and slept == [admin.throttle.max_delay]


class Gate:
    """A password check that blocks until opened (the KDF, made as slow as a test needs)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.running = 0

    def __call__(self, password: str, password_hash: str) -> bool:
        self.running += 1
        assert self.open.wait(60)  # a guard against hanging the suite, not a timing assertion
        return verify_password(password, password_hash)


async def test_under_a_flood_busy_checks_refuse_at_once_instead_of_queueing(
    tmp_path: Path,
) -> None:
    """No guess waits for a check slot under a flood: while both slots run the KDF, more
    guesses get 429 at once (nothing queues in front of the owner), a known browser still
    waits for the next free slot, and once the slots free up the owner gets in."""
    app, admin, _ = _admin_app(tmp_path)
    async with _client_from(app, "192.0.2.7") as owner:
        assert (await _login(owner, "the-right-one")).status_code == 303  # a known browser
        owner.cookies.delete("nodeprov_admin")
        for i in range(admin.throttle.global_limit):
            assert (await _login_from(app, f"198.51.100.{i + 1}", "guess")).status_code == 401
        assert admin.throttle.flooded()
        gate = Gate()
        admin.verify = gate
        busy = [asyncio.create_task(_login_from(app, f"203.0.113.{i}", "guess")) for i in (1, 2)]
        await until(lambda: gate.running == 2)
        flood = [_login_from(app, f"203.0.{i // 200}.{i % 200 + 1}", "guess") for i in range(40)]
        refused = await asyncio.gather(*flood)  # returns while both slots are still blocked
        assert {r.status_code for r in refused} == {429}
        assert all(r.headers["Retry-After"] == "1" for r in refused)
        known = asyncio.create_task(_login(owner, "the-right-one"))
        gate.open.set()
        assert (await known).status_code == 303
        assert {r.status_code for r in await asyncio.gather(*busy)} == {401}
    assert (await _login_from(app, "192.0.2.8", "the-right-one")).status_code == 303


def test_sessions_expire_and_are_bounded() -> None:
    clock = Clock()
    sessions = Sessions(60, clock=clock)
    first = sessions.create()
    assert sessions.get(first.id) is first and first.csrf != first.id
    assert sessions.get("nope") is None and sessions.get(None) is None
    clock.now += 61
    assert sessions.get(first.id) is None
    made = [sessions.create() for _ in range(100)]
    assert sessions.get(made[0].id) is None and sessions.get(made[-1].id) is made[-1]
    sessions.drop(made[-1].id)
    assert sessions.get(made[-1].id) is None
    assert same("abc", "abc") and not same("abc", "abd") and not same("", "") and not same(None, "")


def test_a_signed_session_made_by_one_process_holds_at_another_with_the_same_key() -> None:
    clock, wall = Clock(), Clock()
    wall.now = 1_800_000_000.0
    key = b"k" * 32
    here = Sessions(60, clock=clock, key=key, wall=wall)
    there = Sessions(60, clock=clock, key=key, wall=wall)
    made = here.create()
    seen = there.get(made.id)
    assert seen is not None and seen.csrf == made.csrf  # the CSRF token holds there too
    assert Sessions(60, clock=clock, key=b"x" * 32, wall=wall).get(made.id) is None
    nonce, expiry, mac = made.id.split(".")
    assert there.get(f"{nonce}.{int(expiry) + 999}.{mac}") is None  # a longer life: refused
    there.drop(made.id)
    assert there.get(made.id) is None  # logged out here stays logged out here
    wall.now += 61
    assert Sessions(60, clock=clock, key=key, wall=wall).get(made.id) is None  # expired


def test_money_text_is_exact() -> None:
    assert sat_text(0) == "0.000 sat"
    assert sat_text(1_234_567) == "1,234.567 sat"
    assert sat_text(-1060) == "-1.060 sat"
    assert parse_sat("") is None and parse_sat(" 12 ") == 12_000
    assert parse_sat("0.001") == 1 and parse_sat("12.5") == 12_500
    for bad in ("-1", "1.2345", "1e3", "0", "abc", "1,5"):
        with pytest.raises(ValueError):
            parse_sat(bad)


def test_channel_inference() -> None:
    assert channel_of("key:ab", "gpt-4o") == ("gpt-4o", "http")
    assert channel_of("npub:ab", "gpt-4o") == ("gpt-4o", "nostr")
    assert channel_of("req:ab", "nostr:gpt-4o") == ("gpt-4o", "nostr")
    assert channel_of("key:ab", "org/model:free") == ("org/model:free", "http")
