"""Typed, frozen settings: what the node is configured with, as one :class:`Config`.

Built once by the CLI (:func:`nodeprov.config_load.load_config`: a TOML file plus
``NODEPROV_*`` environment overrides, validated) and passed down; nothing reads settings
globally. Numbers with a fraction are ``Decimal``/``Fraction`` so no float reaches money.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from nodeprov.core.db_base import (
    POSTGRES_URL_PREFIXES,
    SQLITE_URL_PREFIX,
    url_without_password,
)
from nodeprov.core.key_secret import SECRET_FILE
from nodeprov.core.money import Unit

ENV_PREFIX = "NODEPROV_"
Currency = Literal["msat", "usd"]
CURRENCIES: tuple[Currency, ...] = ("msat", "usd")
DAY = 86_400
MULTI = ("upstreams", "models")  # the two top-level keys that are not a single section


@dataclass(frozen=True)
class Rate:
    """A price in msat or in USD; exact (``Fraction``), converted at pricing time."""

    amount: Fraction
    currency: Currency


@dataclass(frozen=True)
class ModelPrice:
    """What one model costs; every rate is optional and defaults to free."""

    request: Rate | None = None
    input_per_1m: Rate | None = None
    output_per_1m: Rate | None = None
    image: Mapping[str, Rate] = field(default_factory=lambda: MappingProxyType({}))
    audio_per_second: Rate | None = None
    speech_per_1m_chars: Rate | None = None
    context_tokens: int = 128_000
    max_output_tokens: int = 16_384

    def rates(self) -> tuple[Rate, ...]:
        """Every rate that is set, image rates included."""
        scalar = (self.request, self.input_per_1m, self.output_per_1m)
        more = (self.audio_per_second, self.speech_per_1m_chars, *self.image.values())
        return tuple(r for r in (*scalar, *more) if r is not None)


@dataclass(frozen=True)
class NodeSection:
    name: str = "nodeprov"
    description: str = "LLM access paid with Cashu eCash"
    data_dir: Path = Path("./data")
    http_url: str = ""
    onion_url: str = ""
    # The API-key secret as 64 hex digits, instead of data_dir/api_key.secret: machines that
    # share the books must derive the same keys. Give it by env (NODEPROV_NODE__API_KEY_SECRET).
    api_key_secret: str = field(default="", repr=False)


@dataclass(frozen=True)
class HttpSection:
    host: str = "127.0.0.1"
    port: int = 8000
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 10 * 1024 * 1024
    header_timeout_seconds: int = 10
    body_idle_timeout_seconds: int = 30
    # The whole body must arrive within this (a byte a second never pauses long enough).
    body_timeout_seconds: int = 120
    # Request line plus headers; past it the answer is 431 and the connection closes.
    max_header_bytes: int = 64 * 1024
    # An idle keep-alive connection is closed after this; longer than client pools keep theirs
    # (Node's fetch 4 s, httpx 5 s), or a client reusing one races the close.
    keepalive_timeout_seconds: int = 75
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (IPs or networks).
    forwarded_allow_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class NostrSection:
    relays: tuple[str, ...] = ()
    dm_relays: tuple[str, ...] = ()
    key_file: str = "nostr.key"
    # The node's secret key (nsec or hex), instead of key_file; never written to disk. Give
    # it by env (NODEPROV_NOSTR__KEY) so that several machines answer as one npub.
    key: str = field(default="", repr=False)
    accept_nip04: bool = True
    default_model: str = ""
    chat_history_turns: int = 6
    # Largest incoming DM text (bytes, decrypted) a job may be; larger gets request_too_large.
    max_content_bytes: int = 262_144
    rate_limit_per_minute: int = 20
    max_concurrent_jobs_per_sender: int = 2


@dataclass(frozen=True)
class WalletSection:
    mints: tuple[str, ...] = ()
    units: tuple[Unit, ...] = ("sat", "msat")
    mint_timeout_seconds: Decimal = Decimal(10)
    refund_expired: bool = True
    # Let key refunds reach Lightning addresses on private or loopback hosts (a private network).
    refund_private_hosts: bool = False
    expiry_check_seconds: int = 600
    # The largest invoice POST /v1/wallet/lightning creates, in sat.
    lightning_max_sat: int = 1_000_000
    # Unpaid invoices open at once (anyone may ask for one; each is polled at the mint).
    lightning_max_open_quotes: int = 1000


@dataclass(frozen=True)
class PaymentsSection:
    # Run an X-Cashu (or DM) token's mint swap beside the upstream call; output waits for it.
    overlap_swap: bool = True
    # Upstream calls one client (address, npub) may have started before their swap landed.
    overlap_per_client: int = 2


@dataclass(frozen=True)
class LedgerSection:
    hold_timeout_seconds: int = 120
    # Where the books live: "" is the SQLite file in data_dir; "sqlite:///path" names
    # another file; "postgresql://user@host:port/db" shares one database between workers
    # and machines (README "Scale out").
    url: str = ""
    pool_size: int = 8  # PostgreSQL connections per process


@dataclass(frozen=True)
class RateSource:
    """An HTTP JSON endpoint and the dotted path to the BTC/USD number in it."""

    url: str
    path: str


@dataclass(frozen=True)
class PricingSection:
    fee_multiplier: Fraction = Fraction(1)
    btc_usd_sources: tuple[RateSource, ...] = ()
    btc_usd_fallback: Decimal = Decimal(0)
    btc_usd_max_age_seconds: int = 3600
    btc_usd_refresh_seconds: int = 300


@dataclass(frozen=True)
class AdminSection:
    password_hash: str = ""  # empty: /admin/ is disabled
    session_seconds: int = 12 * 3600


@dataclass(frozen=True)
class PayoutsSection:
    lightning_address: str = ""  # empty: no automatic payouts
    threshold_msat: int = 1_000_000
    interval_seconds: int = 3600


@dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str
    api_key: str = ""
    models: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    discover_models: bool = False
    timeout_seconds: Decimal = Decimal(120)
    # Open connections (each carries one request or stream at a time) to this upstream.
    max_connections: int = 2048
    # How long a request waits for a connection when all are busy; then 503 upstream_busy.
    pool_wait_seconds: Decimal = Decimal(5)


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    http: HttpSection = field(default_factory=HttpSection)
    nostr: NostrSection = field(default_factory=NostrSection)
    wallet: WalletSection = field(default_factory=WalletSection)
    ledger: LedgerSection = field(default_factory=LedgerSection)
    payments: PaymentsSection = field(default_factory=PaymentsSection)
    pricing: PricingSection = field(default_factory=PricingSection)
    admin: AdminSection = field(default_factory=AdminSection)
    payouts: PayoutsSection = field(default_factory=PayoutsSection)
    upstreams: tuple[Upstream, ...] = ()
    models: Mapping[str, ModelPrice] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def ledger_path(self) -> Path:
        """The SQLite ledger file: ``ledger.url``'s path (``sqlite:////abs`` or relative to
        the data dir, as ``sqlite:///ledger.db``), else ``ledger.sqlite3`` in the data dir."""
        if self.ledger.url.startswith(SQLITE_URL_PREFIX):
            return self.node.data_dir / Path(self.ledger.url[len(SQLITE_URL_PREFIX) :]).expanduser()
        return self.node.data_dir / "ledger.sqlite3"

    @property
    def ledger_url(self) -> str:
        """The ledger database as a URL: ``sqlite:///...`` or ``postgresql://...``."""
        if self.ledger_on_postgres:
            return self.ledger.url
        return SQLITE_URL_PREFIX + str(self.ledger_path)

    @property
    def ledger_shown(self) -> str:
        """Where the books are, to print: the SQLite file, or the URL without its password."""
        if not self.ledger_on_postgres:
            return str(self.ledger_path)
        return url_without_password(self.ledger.url, mask="***")

    @property
    def ledger_on_postgres(self) -> bool:
        return self.ledger.url.startswith(POSTGRES_URL_PREFIXES)

    @property
    def api_key_secret_path(self) -> Path:
        """The secret API keys are derived with (``core.key_secret``), 0600 in the data dir."""
        return self.node.data_dir / SECRET_FILE

    @property
    def nostr_key_path(self) -> Path:
        """``nostr.key_file``, relative to ``node.data_dir`` unless absolute."""
        return self.node.data_dir / Path(self.nostr.key_file).expanduser()
