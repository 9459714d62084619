"""The one exception tree of nodeprov.

Every error a client can cause or see carries what each channel needs to report it:
an HTTP status, an OpenAI-style ``type`` and ``code``, and a human message. The HTTP
channel renders :meth:`NodeprovError.to_openai`, the Nostr channel :meth:`to_dm`.

Where Routstr's clients branch on an error, its ``type`` (and ``code``) is the one they read:
``insufficient_quota``/``insufficient_balance`` (402: top up and retry), ``token_already_spent``
(drop the token), ``mint_unreachable`` (try another mint).
"""

from __future__ import annotations

from typing import Any, ClassVar


def openai_error(type_: str, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope; every HTTP error body of the node has this shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class NodeprovError(Exception):
    """Base of every error nodeprov raises on purpose."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return openai_error(self.type, self.code, self.message, self.details.get("param"))

    def to_dm(self) -> dict[str, Any]:
        """The ``error`` object of a DM job reply."""
        return {"type": self.type, "code": self.code, "message": self.message}


class ConfigError(NodeprovError):
    """The configuration is invalid; the message names the key and why."""

    code = "config_error"


# --- requests -------------------------------------------------------------------------


class InvalidRequest(NodeprovError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    """The prompt is larger than the model's context window (refused before any hold)."""

    code = "context_length_exceeded"


class RequestTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class UnknownModel(InvalidRequest):
    status = 404
    code = "model_not_found"


# --- authentication and payment -------------------------------------------------------


class Unauthorized(NodeprovError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(NodeprovError):
    """The credential is valid but may not do this."""

    status = 403
    type = "permission_error"
    code = "forbidden"


class ChildKeyNotAllowed(Forbidden):
    """A child key asked for what only its parent key may do (move money, make keys)."""

    code = "child_key_not_allowed"


class PaymentError(NodeprovError):
    """A problem with the money a client offered."""

    status = 400
    type = "invalid_request_error"
    code = "payment_error"


class InvalidToken(PaymentError):
    code = "invalid_token"


class UntrustedMint(PaymentError):
    code = "untrusted_mint"


class UnsupportedUnit(PaymentError):
    code = "unsupported_unit"


class TokenTooSmall(PaymentError):
    """Zero value, or input fees that eat the whole amount."""

    code = "token_too_small"


class TokenAlreadySpent(PaymentError):
    """The mint says the proofs are spent (NUT error 11001), or we saw this token before."""

    type = "token_already_spent"
    code = "token_already_spent"


class InsufficientBalance(PaymentError):
    """Too little money for the job's hold (an account, a pubkey, or no payment at all)."""

    status = 402
    type = "insufficient_quota"
    code = "insufficient_balance"

    @classmethod
    def of(cls, available_msat: int, required_msat: int, hint: str = "") -> InsufficientBalance:
        """The payer has ``available_msat`` and needs ``required_msat``: the message clients
        parse ("Current: X sats, Required: Y sats", X floored, Y rounded up), with both amounts
        exact in the details."""
        required_sats = -(-required_msat // 1000)
        return cls(
            f"Insufficient balance. Current: {max(0, available_msat) // 1000} sats, "
            f"Required: {required_sats} sats ({max(0, available_msat)} msat available, "
            f"{required_msat} msat required){hint}",
            available_msat=available_msat,
            required_msat=required_msat,
        )

    def suggest_max_tokens(self, name: str, value: int) -> InsufficientBalance:
        """The same refusal, saying that ``name`` (``max_tokens``) at most ``value`` fits."""
        return type(self)(
            f"{self.message} With {name} at most {value} the request would fit.",
            **{**self.details, "max_tokens": value},
        )


class PaymentTooSmall(InsufficientBalance):
    """A per-request token (``X-Cashu``, a DM job's ``cashu``) worth less than the job's
    maximum cost: refused before any swap (NUT-24: 400), so it is still the sender's.

    A subclass of :class:`InsufficientBalance` so that channels attach a payment request
    for the whole ``required_msat`` (``available_msat`` is 0: nothing was taken)."""

    status = 400
    type = "invalid_request_error"
    code = "token_too_small"

    @classmethod
    def for_token(cls, value_msat: int, fee: int, unit: str, required_msat: int) -> PaymentTooSmall:
        """The token is worth ``value_msat`` after the mint's input ``fee`` (in ``unit``)."""
        value = value_msat // 1000 if unit == "sat" else value_msat
        after = f" after the mint's input fee of {fee} {unit}" if fee else ""
        return cls(
            f"Insufficient payment. Current: {max(0, value_msat) // 1000} sats, "
            f"Required: {-(-required_msat // 1000)} sats: the token is worth {value} {unit}"
            f" ({max(0, value_msat)} msat){after}, the request may cost up to {required_msat}"
            " msat. The token was not redeemed: it is still yours.",
            available_msat=0,
            required_msat=required_msat,
            token_msat=value_msat,
        )


class AccountExpired(PaymentError):
    status = 401
    code = "account_expired"


class RefundPending(PaymentError):
    """A payment's change is asked for while its job still runs (Routstr's 425: retry)."""

    status = 425
    code = "refund_pending"
    retryable = True

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, retry_after=2, **details)


class NothingToRefund(PaymentError):
    """A refund of an account or payment that holds nothing (Routstr's "No balance to refund")."""

    code = "no_balance"

    def __init__(self, message: str = "No balance to refund", **details: Any) -> None:
        super().__init__(message, **details)


# --- the node's dependencies ----------------------------------------------------------


class MintError(NodeprovError):
    """The mint rejected an operation; ``mint_code`` is the NUT error code if it sent one."""

    status = 502
    type = "mint_error"
    code = "mint_error"

    def __init__(self, message: str, mint_code: int | None = None, **details: Any) -> None:
        super().__init__(message, mint_code=mint_code, **details)
        self.mint_code = mint_code


class WithdrawalTooLarge(MintError):
    """No single pool (one mint and unit) can pay the amount: the node's holdings, not a
    mint failure, so the client's answer is a 400 saying the most it can have now."""

    status = 400
    type = "invalid_request_error"
    code = "withdrawal_too_large"


class MintUnavailable(MintError):
    """The mint could not be reached or timed out; nothing was lost, try again."""

    status = 503
    type = "mint_unreachable"
    code = "mint_unavailable"
    retryable = True


class PriceUnavailable(NodeprovError):
    """No exchange rate recent enough to price in USD; pricing refuses rather than guesses."""

    status = 503
    type = "server_error"
    code = "price_unavailable"
    retryable = True


class UpstreamError(NodeprovError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "upstream_unavailable"
    retryable = True


class UpstreamRateLimited(UpstreamUnavailable):
    """The upstream answered 429: passed on as 429 with ``Retry-After`` (``retry_after``
    in the details, a default when the upstream gave none), so SDKs back off and retry."""

    status = 429
    code = "rate_limit_exceeded"


class UpstreamBusy(UpstreamUnavailable):
    """Every connection the node may open to the upstream stayed in use for the whole pool
    wait (``[[upstreams]] max_connections``, ``pool_wait_seconds``): 503 with ``Retry-After``."""

    code = "upstream_busy"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    retryable = True


class LedgerError(NodeprovError):
    """An internal inconsistency in the books; never expected, always logged."""

    code = "ledger_error"


class ProofsBusy(NodeprovError):
    """Other processes took the proofs a payment out of the pool needed, again and again."""

    status = 503
    code = "proofs_busy"
    retryable = True


# --- Nostr protocol (sans-I/O codecs in nodeprov.protocol) ------------------------------


class ProtocolError(InvalidRequest):
    """A Nostr event, payload or DM job message that is malformed or fails verification."""

    code = "protocol_error"


class InvalidEvent(ProtocolError):
    """An event whose shape, id or signature is wrong, or whose kind is not the expected one."""

    code = "invalid_event"


class InvalidKey(ProtocolError):
    """A secret key, public key or bech32 entity that is not valid."""

    code = "invalid_key"


class DecryptionError(ProtocolError):
    """A NIP-04/NIP-44 payload that cannot be decrypted (bad MAC, padding, version, size)."""

    code = "decryption_failed"


class InvalidJobMessage(ProtocolError):
    """A ``nodeprov/1`` DM job message that is not valid (type, id, endpoint, fields)."""

    code = "invalid_job_message"
