"""MONAI Label's optional auth, made to work with PyJWT 2 (and no weaker than intended).

MONAI Label 0.8.5 verifies bearer tokens with ``jwt.decode(token, key, options=...)`` and no
``algorithms`` argument. PyJWT >= 2 refuses that call, so with ``MONAI_LABEL_AUTH_ENABLE=true``
every token - valid or not - is answered 401 (closed, but unusable); PyJWT 1.x accepted whatever
algorithm the token's header named. This replaces the decoding step only: same realm key, same
claims and role mapping, but the algorithms are pinned (``RS256``, Keycloak's default; override
with ``MONAI_LABEL_AUTH_ALGORITHMS``, comma-separated asymmetric algorithms only), so ``none`` and
HS256-with-the-public-key tokens are refused. Role checks (RBAC) stay MONAI Label's own.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)
ALLOWED = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}


def algorithms() -> list[str]:
    algs = [a.strip() for a in os.environ.get("MONAI_LABEL_AUTH_ALGORITHMS", "RS256").split(",") if a.strip()]
    bad = [a for a in algs if a not in ALLOWED]
    if bad or not algs:
        raise ValueError(f"MONAI_LABEL_AUTH_ALGORITHMS must name asymmetric algorithms ({', '.join(sorted(ALLOWED))}); got {bad}")
    return algs


def install_token_check() -> bool:
    """Patch ``monailabel.endpoints.user.auth.from_token`` when auth is enabled; returns whether it did."""
    from monailabel.config import settings

    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return False
    import jwt
    from monailabel.endpoints.user import auth

    algs = algorithms()
    original = auth.from_token
    if getattr(original, "__tumorlens__", False):
        return True

    def from_token(token: str):
        try:
            key = auth.get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
        except Exception as e:  # noqa: BLE001 - the login server down or answering nonsense: said, not a bare 500
            from fastapi import HTTPException

            logger.error(f"auth: the realm's key could not be fetched: {type(e).__name__}")
            raise HTTPException(status_code=503, detail="the login server (the auth realm) cannot be reached, so no "
                                "token can be checked now; try again later") from e
        payload = jwt.decode(token, key, algorithms=algs,
                             options={"verify_signature": True, "verify_aud": False, "verify_exp": True})
        if not payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME):
            raise jwt.InvalidTokenError("token names no user")
        roles = payload
        for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
            roles = roles.get(part) if isinstance(roles, dict) else None
        return auth.User(username=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME),
                         email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
                         name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
                         roles=list(roles) if isinstance(roles, list) else [])

    from_token.__tumorlens__ = True  # type: ignore[attr-defined]
    auth.from_token = from_token
    logger.info(f"auth: bearer tokens verified with {', '.join(algs)} against {settings.MONAI_LABEL_AUTH_REALM_URI}")
    return True
