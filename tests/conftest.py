"""Shared fixtures: real mints, a real relay, real tokens.

Session fixtures start their server on first use only (a test that does not ask for them does
not pay for them) and always stop it at the end of the session, also when tests fail.

- ``mint``      nutshell mint, FakeWallet, sat + msat keysets, input_fee_ppk=0
- ``fee_mint``  the same with input_fee_ppk=100
- ``relay``     nostr-relay (sqlite); ``relay.stop()`` / ``relay.start()`` keep the port. A test
                that stops the shared relay need not restart it: the next test that asks for
                ``relay`` gets it running again.
- ``make_token``   ``await make_token(amount, unit="sat", mint=None, version=4) -> str``
- ``token_factory``  ``token_factory(mint=None, unit="sat") -> TokenFactory`` (a private wallet)
- ``relay_factory`` / ``mint_factory``  private servers for tests that kill or break them
- ``tcp_proxy``  ``tcp_proxy(url, delay=0.0, connect_delay=0.0) -> TcpProxy`` (started)
- ``postgres_server``  a throwaway PostgreSQL (tests/support/postgres.py) for the session;
                skips without the binaries unless ``NODEPROV_REQUIRE_POSTGRES=1``
- ``postgres_url``  a fresh empty database on it for one test (dropped afterwards)
- ``ledger_url``  parametrized ``sqlite`` / ``postgresql``: a ledger URL for either backend
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, settings

from tests.support import ledger_backends
from tests.support.cashu_client import TokenFactory, import_cashu
from tests.support.postgres import (
    MISSING_MESSAGE,
    PostgresServer,
    find_bin_dir,
    postgres_required,
)
from tests.support.services import MintHandle, RelayHandle, start_mint, start_relay
from tests.support.tcp_proxy import TcpProxy

MintRef = MintHandle | str | None

# Property tests run the same examples every time: derandomize (examples derive from the test,
# not a random seed or the local example database), and no per-example deadline or "too slow"
# health check, which fail by chance on a busy machine. Loaded here, before the test modules
# are imported, so their own @settings(...) inherit it.
settings.register_profile(
    "deterministic",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("deterministic")


# ------------------------------------------------------------------------------- servers


@pytest.fixture(scope="session")
def mint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MintHandle]:
    """A nutshell mint without input fees (sat + msat)."""
    handle = start_mint(input_fee_ppk=0, workdir=tmp_path_factory.mktemp("mint"))
    try:
        yield handle
    finally:
        handle.close()


@pytest.fixture(scope="session")
def fee_mint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MintHandle]:
    """A nutshell mint with input_fee_ppk=100 on both keysets (nutshell's default fee)."""
    handle = start_mint(input_fee_ppk=100, workdir=tmp_path_factory.mktemp("fee_mint"))
    try:
        yield handle
    finally:
        handle.close()


@pytest.fixture(scope="session")
def _relay_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayHandle]:
    handle = start_relay(workdir=tmp_path_factory.mktemp("relay"))
    try:
        yield handle
    finally:
        handle.close()


@pytest.fixture(scope="session")
def relay(_relay_session: RelayHandle) -> RelayHandle:
    """The shared nostr-relay (ws://127.0.0.1:PORT), max_event_size 262144."""
    return _relay_session


@pytest.fixture(autouse=True)
def _shared_relay_running(request: pytest.FixtureRequest) -> None:
    """Restart the shared relay before a test that uses it, if an earlier test stopped it."""
    if "_relay_session" in request.fixturenames:
        handle: RelayHandle = request.getfixturevalue("_relay_session")
        if not handle.running:
            handle.start()


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[Callable[..., RelayHandle]]:
    """``relay_factory(**start_relay_kwargs)``: a private relay, stopped after the test."""
    started: list[RelayHandle] = []

    def make(**kwargs: Any) -> RelayHandle:
        kwargs.setdefault("workdir", tmp_path / f"relay{len(started)}")
        handle = start_relay(**kwargs)
        started.append(handle)
        return handle

    try:
        yield make
    finally:
        for handle in started:
            handle.close()


@pytest.fixture
def mint_factory(tmp_path: Path) -> Iterator[Callable[..., MintHandle]]:
    """``mint_factory(input_fee_ppk=0, **kwargs)``: a private mint, stopped after the test."""
    started: list[MintHandle] = []

    def make(**kwargs: Any) -> MintHandle:
        kwargs.setdefault("workdir", tmp_path / f"mint{len(started)}")
        handle = start_mint(**kwargs)
        started.append(handle)
        return handle

    try:
        yield make
    finally:
        for handle in started:
            handle.close()


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[..., TcpProxy]]:
    """``tcp_proxy(url, delay=0.0, connect_delay=0.0)``: a started proxy, closed after the test."""
    proxies: list[TcpProxy] = []

    def make(url: str, **kwargs: Any) -> TcpProxy:
        proxy = TcpProxy.to_url(url, **kwargs).start()
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()


@pytest.fixture(scope="session")
def postgres_bin_dir() -> Path:
    """Where initdb/postgres live; skips without them (fails if NODEPROV_REQUIRE_POSTGRES=1)."""
    found = find_bin_dir()
    if found is None:
        if postgres_required():
            pytest.fail(f"NODEPROV_REQUIRE_POSTGRES=1 but {MISSING_MESSAGE}", pytrace=False)
        pytest.skip(MISSING_MESSAGE)
    return found


@pytest.fixture(scope="session")
def postgres_server(
    postgres_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL for the session (fsync off), always stopped at the end."""
    server = PostgresServer.start(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """``postgresql://postgres@127.0.0.1:PORT/NAME``: a fresh empty database for one test."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        # Keeps the session's disk use flat; a test's leftover sessions are ended first.
        postgres_server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A ledger URL for each backend: a SQLite file in tmp_path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return "sqlite:///" + str(tmp_path / "ledger.sqlite3")
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test once per engine: ledgers named by a file path (``ledger_target``) live in
    that file, or each in a fresh PostgreSQL database (see ``tests/support/ledger_backends``).
    A suite opts in with ``pytestmark = pytest.mark.usefixtures("ledger_backend")``."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    targets = ledger_backends.PostgresTargets(request.getfixturevalue("postgres_server"))
    ledger_backends.use(targets)
    try:
        yield "postgresql"
    finally:
        ledger_backends.use(None)
        targets.drop_all()


# -------------------------------------------------------------------------------- tokens


def _mint_url(request: pytest.FixtureRequest, mint: MintRef) -> str:
    if mint is None:
        default: MintHandle = request.getfixturevalue("mint")
        return default.url
    return mint if isinstance(mint, str) else mint.url


class TokenMaker:
    """The ``make_token`` fixture: one cached TokenFactory per (mint, unit) for the session."""

    def __init__(
        self,
        request: pytest.FixtureRequest,
        cache: dict[tuple[str, str], TokenFactory],
        data_dir: Path,
    ) -> None:
        self._request = request
        self._cache = cache
        self._data_dir = data_dir

    def factory(self, mint: MintRef = None, unit: str = "sat") -> TokenFactory:
        url = _mint_url(self._request, mint).rstrip("/")
        key = (url, unit)
        if key not in self._cache:
            self._cache[key] = TokenFactory(url, unit, self._data_dir / f"w{len(self._cache)}")
        return self._cache[key]

    async def __call__(
        self, amount: int, unit: str = "sat", mint: MintRef = None, version: int = 4
    ) -> str:
        return await self.factory(mint, unit).token(amount, version=version)

    def _factory_for(self, token: str) -> TokenFactory:
        parsed = import_cashu().deserialize_token_from_string(token)
        return self.factory(parsed.mint, parsed.unit or "sat")

    async def redeem(self, token: str) -> int:
        """Receive ``token`` (e.g. change from the node) into the test wallet of its mint/unit."""
        return await self._factory_for(token).redeem(token)

    async def proof_states(self, token: str) -> list[str]:
        """NUT-07 states ("UNSPENT"/"SPENT"/"PENDING") of the token's proofs."""
        return await self._factory_for(token).proof_states(token)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def _token_factory_cache(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[dict[tuple[str, str], TokenFactory]]:
    cache: dict[tuple[str, str], TokenFactory] = {}
    try:
        yield cache
    finally:
        for factory in cache.values():
            await factory.aclose()


@pytest.fixture
def make_token(
    request: pytest.FixtureRequest,
    _token_factory_cache: dict[tuple[str, str], TokenFactory],
    tmp_path_factory: pytest.TempPathFactory,
) -> TokenMaker:
    """``await make_token(amount, unit="sat", mint=None, version=4) -> "cashuB…"``.

    ``mint`` is a MintHandle or URL (default: the ``mint`` fixture). Also
    ``make_token.redeem(token)``, ``make_token.proof_states(token)``,
    ``make_token.factory(mint, unit)``.
    """
    base = tmp_path_factory.getbasetemp() / "token-wallets"
    return TokenMaker(request, _token_factory_cache, base)


TokenFactoryMaker = Callable[..., TokenFactory]


@pytest_asyncio.fixture(loop_scope="session")
async def token_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[TokenFactoryMaker]:
    """``token_factory(mint=None, unit="sat") -> TokenFactory`` with its own fresh wallet."""
    made: list[TokenFactory] = []

    def make(mint: MintRef = None, unit: str = "sat") -> TokenFactory:
        factory = TokenFactory(_mint_url(request, mint), unit, tmp_path / f"wallet{len(made)}")
        made.append(factory)
        return factory

    try:
        yield make
    finally:
        for factory in made:
            await factory.aclose()
