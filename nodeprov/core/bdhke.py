"""Blind Diffie-Hellman key exchange (NUT-00) and DLEQ proofs (NUT-12) for the wallet.

The only module that imports ``cashu``, and only its crypto subpackage: unlike
``cashu.core.settings`` (pulled in by most of the package) it reads no .env file and
leaves ``sys.tracebacklimit`` alone.
"""

from __future__ import annotations

import functools

from cashu.core.crypto import b_dhke
from cashu.core.crypto.secp import PrivateKey, PublicKey

from nodeprov.protocol.cashu_token import Proof

__all__ = [
    "PublicKey",
    "blind",
    "hash_to_curve_hex",
    "point",
    "unblind",
    "verify_proof_dleq",
    "verify_signature_dleq",
]


def blind(secret: str) -> tuple[str, str]:
    """``B_ = hash_to_curve(secret) + r*G`` with a fresh random ``r``; returns (B_, r) hex."""
    B_, r = b_dhke.step1_alice(secret)
    return B_.format().hex(), r.to_hex()


def unblind(C_: str, r: str, A: PublicKey) -> str:
    """``C = C_ - r*A``: the mint's signature on our secret, unblinded (hex)."""
    C = b_dhke.step3_alice(point(C_), PrivateKey(bytes.fromhex(r)), A)
    return str(C.format().hex())


def hash_to_curve_hex(secret: str) -> str:
    """``Y = hash_to_curve(secret)``: how NUT-07 identifies a proof without revealing it."""
    return str(b_dhke.hash_to_curve(secret.encode()).format().hex())


def verify_signature_dleq(B_: str, C_: str, e: str, s: str, A: PublicKey) -> bool:
    """NUT-12: the mint proves ``C_ = a*B_`` for the same ``a`` as ``A = a*G``."""
    try:
        return bool(b_dhke.alice_verify_dleq(point(B_), point(C_), _scalar(e), _scalar(s), A))
    except ValueError:
        return False


def verify_proof_dleq(proof: Proof, A: PublicKey) -> bool:
    """NUT-12 for a received proof: rebuild ``B_``/``C_`` from ``secret``, ``r`` and ``C``."""
    dleq = proof.dleq
    if dleq is None:
        return True
    try:
        return bool(
            b_dhke.carol_verify_dleq(
                proof.secret, _scalar(dleq.r), point(proof.C), _scalar(dleq.e), _scalar(dleq.s), A
            )
        )
    except ValueError:
        return False


@functools.lru_cache(maxsize=4096)
def point(hex_text: str) -> PublicKey:
    """A curve point from hex; cached, since a mint's keys are parsed on every signature."""
    return PublicKey(bytes.fromhex(hex_text))


def _scalar(hex_text: str) -> PrivateKey:
    return PrivateKey(bytes.fromhex(hex_text))
