"""
Who someone is, in the forms the gateway compares and stores (SPEC.md §5, §6).

A principal is its identity provider plus its C{sub}: C{alice} of the
operator's HS256 issuer, C{alice} signed in through an OpenID provider and
C{alice} of WeCom corp A are three people.  Their I{owner key}, which the
history store and the rate limiter use, is C{<provider>|<sub>}, the provider
percent-encoded so that it never holds a C{|} (the first C{|} splits a key).

The identity provider of a principal is:

 - for a bearer JWT, its C{iss} (an issuer of C{auth.jwt});
 - for a session JWT minted after single sign-on, the provider the user
   signed in through, carried in the token's C{idp} claim: an OIDC
   provider's issuer (so signing in through provider X and calling the API
   with a token X issued are one owner), or C{wecom:<CorpID>},
   C{dingtalk:<AppKey>}, C{feishu:<App ID>} for the presets;
 - C{clawdbot:dev} for the debug listener's dev principal.

A trailing C{/} of an issuer does not make another provider.

Rows stored before owners had a provider hold C{*|<sub>} (migration 3 of
L{clawdbot.storage.store}); C{*} percent-encodes to C{%2A}, so no real provider
produces it.

Scopes follow RFC 6749 §3.3: tokens separated by U+0020 only, each made of
C{%x21 / %x23-5B / %x5D-7E}; anything else (a tab, a no-break space, a
quote, a backslash, non-ASCII) makes the whole list invalid.
"""

import hashlib
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Protocol

DEV_ISSUER = "clawdbot:dev"
LEGACY = "*"

_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


class OAuth2Section(Protocol):
    """What L{sso_issuer} reads of the C{oauth2} config section (a leaf cannot import the config)."""

    @property
    def provider(self) -> str: ...

    @property
    def client_id(self) -> str | None: ...

    @property
    def issuer_url(self) -> str | None: ...


def is_scope_token(value: object) -> bool:
    """Is C{value} one RFC 6749 scope-token?"""
    return isinstance(value, str) and _SCOPE_TOKEN.fullmatch(value) is not None


def split_scopes(text: str) -> list[str]:
    """
    The scope tokens of a space-separated list, split on U+0020 only (runs
    of spaces and spaces at either end are tolerated).

    @raise ValueError: when a token has a character outside the scope-token
        set.
    """
    tokens = [t for t in text.split(" ") if t]
    for token in tokens:
        if not is_scope_token(token):
            raise ValueError("not a scope-token")
    return tokens


def issuer_id(issuer: str) -> str:
    """The identity provider as compared: without a trailing C{/}."""
    return issuer.rstrip("/") or issuer


def owner_key(issuer: str | None, sub: str) -> str:
    """The stable key of the principal C{sub} of C{issuer}."""
    return urllib.parse.quote(issuer_id(issuer or ""), safe=":/", errors="surrogatepass") + "|" + sub


def legacy_owner(sub: str) -> str:
    """The owner of a row stored before owners had a provider."""
    return LEGACY + "|" + sub


def owner_sub(owner: str) -> str:
    """The C{sub} part of an owner key (what the API shows as C{owner})."""
    return owner.split("|", 1)[1] if "|" in owner else owner


def preset_issuer(provider: str, client_id: str | None) -> str:
    """
    The identity provider of a preset login: the platform and the app's id.
    For WeCom that is the CorpID; DingTalk and Feishu internal apps belong
    to one organisation each.
    """
    return f"{provider}:{client_id}"


def sso_issuer(oauth2: OAuth2Section) -> str:
    """The identity provider that C{oauth2} (the config section) signs people in through."""
    if oauth2.provider == "oidc":
        return issuer_id(oauth2.issuer_url or "")
    return preset_issuer(oauth2.provider, oauth2.client_id)


def configured_issuers(config: Any) -> tuple[str, ...]:
    """Every identity provider C{config} (a L{clawdbot.config.Config}) accepts principals from."""
    issuers = [DEV_ISSUER]
    if config.auth.jwt.enabled and config.auth.jwt.issuer:
        issuers.append(issuer_id(config.auth.jwt.issuer))
    if config.oauth2.enabled:
        issuers.append(sso_issuer(config.oauth2))
    return tuple(dict.fromkeys(issuers))


@dataclass(frozen=True)
class Principal:
    """
    Who is calling, and what they may do.

    @ivar issuer: the identity provider (L{issuer_id}); with
        C{sub} it names the principal, as L{key}.
    """

    sub: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    name: str | None = None
    email: str | None = None
    teams: tuple[str, ...] = ()
    issuer: str | None = None
    # The API key it called with (L{KeyRecord.id}), or None.
    key_id: str | None = None
    # When its credential was issued (a token's iat), or None: the newer of
    # two credentials tells what its owner may do now.
    issued_at: float | None = field(default=None, compare=False)
    # Through an API key: its owner's own scopes.  The config's rules (model
    # access, budgets, quotas, fair-share weights) match these, whatever
    # subset of them the key may use.
    owner_scopes: frozenset[str] | None = field(default=None, compare=False)
    # Through a key made for a team: that team, which its calls count for.
    key_team: str | None = None

    @property
    def team(self) -> str | None:
        """The team its calls count for (usage, team quotas): its first team (through a team's key, that team)."""
        if self.key_team is not None:
            return self.key_team
        return self.teams[0] if self.teams else None

    @property
    def rule_scopes(self) -> frozenset[str]:
        """The scopes the config's rules match: the owner's own, also through a key that may use fewer."""
        return self.owner_scopes if self.owner_scopes is not None else self.scopes

    @property
    def key(self) -> str:
        """The owner key: history and budgets belong to it, not to C{sub} alone."""
        return owner_key(self.issuer, self.sub)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sub": self.sub,
            "name": self.name,
            "email": self.email,
            "scopes": sorted(self.scopes),
            "teams": list(self.teams),
        }
        if self.key_id is not None:
            out["key_id"] = self.key_id
            out["key_team"] = self.key_team
        return out

    def history_teams(self) -> list[str]:
        """The teams whose history this principal may read."""
        return sorted(s[len("history:") :] for s in self.scopes if s.startswith("history:") and len(s) > 8)


# --- API keys (clawdbot.auth.keys) and what their owners may do ---------------


def owner_digest(owner: str) -> str:
    """A fixed-size name for an owner key (notifications carry at most a few kilobytes)."""
    return hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """One API key as stored (its secret is never stored)."""

    id: str
    hash: str
    prefix: str
    owner: str
    name: str
    scopes: tuple[str, ...]
    team: str | None
    created_at: float
    expires_at: float
    last_used_at: float | None = None
    revoked_at: float | None = None


@dataclass(frozen=True)
class Grant:
    """
    What an owner may do now, from their latest sign-in or token.

    @ivar updated_at: when the evidence was issued (a token's C{iat}): the
        newer evidence wins.
    @ivar seen_at: when the owner last showed a credential at all.
    """

    owner: str
    scopes: frozenset[str]
    teams: tuple[str, ...]
    name: str | None = None
    email: str | None = None
    ended: bool = False
    updated_at: float = 0.0
    seen_at: float = 0.0
