"""
Personal API keys: C{cb-} and 43 base62 characters (256 random bits).

A signed-in user creates keys for themselves (L{clawdbot.http.keys}); the
key is shown once.  The database holds only its HMAC-SHA256 under a server
key (C{auth.api_keys.secret}, else one derived from C{auth.jwt.secret}), so
a copy of the database gives no working key, and a short prefix
(C{cb-} and six characters) to recognise it.  A key goes in the same
C{Authorization: Bearer} header as a JWT; its prefix tells them apart.

A key acts as its owner (same history, budgets and quotas), with at most
the scopes it was given, and never more than the owner holds now: every
time the owner's sign-in or token is verified, their scopes and teams are
recorded (L{ApiKeys.observe}: written with the next batch, only when they
changed), and an identity provider that ends the sign-in ends the keys at
once (L{ApiKeys.owner_ended}).  Grants are ordered by when their evidence
was issued (a token's C{iat}): a token issued before the sign-in ended, or
before the owner lost a scope, never brings it back.  Through a key the principal's teams are the
key's team (while the owner is still in it) or the owner's teams.

Lookups are by HMAC, cached for L{TTL} seconds; a revocation or a changed
grant evicts the cached entry here at once and, through PostgreSQL's
notifications, on every other instance (with SQLite: one instance).
Last-used times are written in batches (L{flush}), never per request.
"""

import hashlib
import hmac
import re
import secrets
import urllib.parse

from twisted.logger import Logger


from clawdbot.auth.identity import Grant, KeyRecord, Principal, owner_digest, owner_key

log = Logger(namespace="clawdbot.auth")

KEY_PREFIX = "cb-"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LENGTH = 43  # 62**43 > 2**256
_KEY = re.compile(r"cb-[0-9A-Za-z]{43}")
# How long a looked-up key or grant is trusted without a notification.
TTL = 30.0
# An unchanged grant is recorded again this often (at most a quarter of
# auth.api_keys.owner_idle), so that an owner who keeps signing in never
# looks idle.
RECORD_AGAIN = 86400.0
_CACHE_MAX = 50_000


def new_secret():
    """A new key: C{cb-} and 256 random bits in base62."""
    n = int.from_bytes(secrets.token_bytes(32), "big")
    chars = []
    for _ in range(_LENGTH):
        n, r = divmod(n, 62)
        chars.append(_ALPHABET[r])
    return KEY_PREFIX + "".join(reversed(chars))


def new_key_id():
    return "key_" + secrets.token_hex(8)


def is_key_id(value):
    return isinstance(value, str) and re.fullmatch(r"key_[0-9a-f]{16}", value) is not None


def is_api_key(token):
    """Whether a bearer credential is meant as an API key (by its prefix), well formed or not."""
    return token.startswith(KEY_PREFIX)


_SERVER_KEY = [None, None]  # (the auth section it was made for, the key)


def server_key(config):
    """The HMAC key the hashes are made with, or C{None} when keys cannot work (made once per config)."""
    auth = config.auth
    if _SERVER_KEY[0] is not auth:
        _SERVER_KEY[:] = [auth, _server_key(auth)]
    return _SERVER_KEY[1]


def _server_key(auth):
    keys = auth.api_keys
    if keys.secret:
        return keys.secret.encode("utf-8")
    if auth.jwt.secret:
        return hmac.new(auth.jwt.secret.encode("utf-8"), b"clawdbot api keys v1", hashlib.sha256).digest()
    return None


def key_hash(secret_key, key):
    return hmac.new(secret_key, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def owner_parts(owner):
    """The identity provider and C{sub} of an owner key."""
    quoted, _, sub = owner.partition("|")
    return urllib.parse.unquote(quoted, errors="surrogatepass"), sub


class KeyRefused(Exception):
    """A bearer key that does not work (which reason is never told)."""


class ApiKeys:
    """
    The keys as the gateway uses them: look up, create, revoke, and the
    owners' grants, on a L{clawdbot.storage.keys.KeyStore}.

    @param current_config: the config in force (read at each call).
    @param clock: POSIX time (the reactor; a test's clock).
    """

    def __init__(self, store, clock, current_config):
        self.store = store
        self.clock = clock
        self.current_config = current_config
        # Caches: key hash -> (KeyRecord, when looked up); hash -> (None, ...)
        # for unknown keys; owner digest -> (Grant or None, ...).
        self._keys = {}
        self._unknown = {}
        self._grants = {}
        self._seen = {}  # owner -> the grant this instance last recorded
        self._pending = {}  # owner -> a changed grant, not yet written
        self._used = {}  # key id -> when last used, not yet written
        # hash -> (record, grant, the principal made of them), reused while both stay
        self._principals = {}
        # Moves on with every change heard or made: a lookup that was under
        # way meanwhile may have read what was true before, and is not cached.
        self._generation = 0

    def start(self):
        """Hear other instances' revocations and grant changes (PostgreSQL)."""
        self.store.listen(self._heard, self._forget_all)

    def _heard(self, payload):
        # On the listening thread: a dict pop is atomic, so the entry is
        # gone before the next request can read it.
        kind, _, value = payload.partition(":")
        self._generation += 1
        if kind == "key":
            self._keys.pop(value, None)
        elif kind == "owner":
            self._grants.pop(value, None)

    def _forget_all(self):
        self._generation += 1
        self._keys = {}
        self._unknown = {}
        self._grants = {}
        self._principals = {}

    # --- authentication ---------------------------------------------------

    async def authenticate(self, token):
        """
        The principal of the API key C{token}.

        @raise KeyRefused: when keys are off, or the key is malformed,
            unknown, revoked or expired, or its owner's sign-in was ended.
        """
        config = self.current_config()
        secret_key = server_key(config)
        if secret_key is None or not config.auth.api_keys.enabled:
            raise KeyRefused("keys are off")
        # The HMAC is made for any credential, well formed or not, so a
        # refusal costs the same whatever the reason.
        digest = key_hash(secret_key, token[:256])
        if not _KEY.fullmatch(token):
            raise KeyRefused("malformed")
        record = await self._record(digest)
        now = self.clock.seconds()
        if record is None or not hmac.compare_digest(record.hash, digest):
            raise KeyRefused("unknown")
        if record.revoked_at is not None or record.expires_at <= now:
            raise KeyRefused("revoked or expired")
        grant = await self._grant(record.owner)
        if grant is None or grant.ended:
            raise KeyRefused("owner ended")
        idle = config.auth.api_keys.owner_idle
        if idle and now - grant.seen_at > idle:
            raise KeyRefused("owner gone")
        self._used[record.id] = now
        made = self._principals.get(digest)
        if made is not None and made[0] is record and made[1] is grant:
            return made[2]
        principal = _principal(record, grant)
        if len(self._principals) >= _CACHE_MAX:
            self._principals = {}
        self._principals[digest] = (record, grant, principal)
        return principal

    async def _record(self, digest):
        # (Unknown keys have a cache of their own: a flood of made-up keys
        # cannot push out the keys in use.)
        return await self._cached(digest, lambda: self.store.by_hash(digest), (self._keys, self._unknown))

    async def _grant(self, owner):
        return await self._cached(owner_digest(owner), lambda: self.store.grant(owner), (self._grants,))

    async def _cached(self, name, read, caches):
        """
        What the store says of C{name} (C{read()}), from C{caches} for
        L{TTL} seconds: the first holds what was found, the last what was
        not.  A read under way while a change was heard or made is not kept.
        """
        now = self.clock.seconds()
        for cache in caches:
            cached = cache.get(name)
            if cached is not None and 0 <= now - cached[1] < TTL:
                return cached[0]
        generation = self._generation
        value = await read()
        if generation == self._generation:
            cache = caches[0] if value is not None else caches[-1]
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[name] = (value, now)
        return value

    # --- owners -------------------------------------------------------------

    def observe(self, principal):
        """
        A credential of C{principal} (not a key) was verified: its scopes and
        teams are what its owner may do now.  Recorded with the next
        L{flush} when they differ from what this instance last recorded.
        """
        if principal.key_id is not None or principal.issued_at is None:
            # A key says nothing about its owner; a token that does not say
            # when it was issued cannot be ordered against what is known.
            return
        grant = self._grant_of(principal)
        seen = self._seen.get(grant.owner)
        if seen is not None:
            if seen.updated_at > grant.updated_at:
                # Older evidence than what is known (a token issued before
                # the owner's sign-in was ended, or before their scopes
                # changed) says nothing about now.
                return
            idle = self.current_config().auth.api_keys.owner_idle
            again = min(RECORD_AGAIN, idle / 4) if idle else RECORD_AGAIN
            if _same(seen, grant) and grant.seen_at - seen.seen_at < again:
                return
        if len(self._seen) >= _CACHE_MAX:
            self._seen = {}
        self._seen[grant.owner] = grant
        self._pending[grant.owner] = grant

    def _grant_of(self, principal):
        """What C{principal}'s credential says its owner may do, as of when it was issued (never later than now)."""
        now = self.clock.seconds()
        when = min(principal.issued_at, now) if principal.issued_at is not None else now
        return Grant(principal.key, frozenset(principal.scopes), tuple(principal.teams), principal.name, principal.email, False, when, now)

    async def owner_ended(self, principal_key):
        """The identity provider ended this owner's sign-in: their keys stop working, everywhere, now."""
        now = self.clock.seconds()
        # Dated past the clock skew tokens are allowed: a token issued before
        # the end but dated ahead (within auth.jwt.leeway) cannot undo it.
        ended_at = now + self.current_config().auth.jwt.leeway
        grant = Grant(principal_key, frozenset(), (), None, None, True, ended_at, now)
        self._seen[principal_key] = grant
        self._pending.pop(principal_key, None)
        await self._write(grant)

    async def _write(self, grant):
        # (A read under way now is not cached: the generation moved.  The
        # cached grant goes only once the write is kept: a write that fails,
        # in an outage, leaves the owner's keys working from the cache.)
        self._generation += 1
        await self.store.put_grants([grant])
        self._grants.pop(owner_digest(grant.owner), None)

    async def grant_of(self, principal):
        """What the owner of C{principal} may do now (its grant), or C{None}."""
        return await self._grant(principal.key)

    # --- keys -----------------------------------------------------------------

    async def create(self, principal, name, scopes, team, ttl):
        """
        A new key for C{principal}: C{(record, secret)}, or C{None} when
        they hold as many live keys as C{auth.api_keys.max_per_user}.
        """
        config = self.current_config()
        secret_key = server_key(config)
        secret = new_secret()
        now = self.clock.seconds()
        record = KeyRecord(
            id=new_key_id(),
            hash=key_hash(secret_key, secret),
            prefix=secret[: len(KEY_PREFIX) + 6],
            owner=owner_key(principal.issuer, principal.sub),
            name=name,
            scopes=tuple(sorted(scopes)),
            team=team,
            created_at=now,
            expires_at=now + ttl,
        )
        # The owner's grant is what the key is checked against: recorded now
        # (a token that does not say when it was issued only makes a first
        # one: it cannot be ordered against what is known).
        grant = self._grant_of(principal)
        if principal.issued_at is not None or await self.store.grant(grant.owner) is None:
            self._seen[grant.owner] = grant
            self._pending.pop(grant.owner, None)
            await self._write(grant)
        if not await self.store.create(record, config.auth.api_keys.max_per_user, now):
            return None
        return record, secret

    async def revoke(self, key_id, owner=None):
        """Revoke a key (of C{owner} only, when given): the key as it was, or C{None}."""
        record = await self.store.revoke(key_id, self.clock.seconds(), owner)
        if record is not None:
            self._generation += 1
            self._keys.pop(record.hash, None)
        return record

    async def list(self, owner=None, limit=1000, live=False, sub=None):
        """Keys newest first (C{owner}'s, or everyone's, or C{sub}'s of any provider), with this instance's unwritten last uses; C{live}: only usable ones."""
        records = await self.store.list(owner, limit, self.clock.seconds() if live else None, sub)
        pending = self._used
        return [_with_use(r, pending.get(r.id)) for r in records]

    async def flush(self):
        """Write the owners' changed grants and the keys' last-used times gathered since the last flush."""
        grants, self._pending = self._pending, {}
        if grants:
            try:
                await self.store.put_grants(list(grants.values()))
            except Exception:
                for owner, grant in grants.items():
                    self._pending.setdefault(owner, grant)
                raise
            self._generation += 1
            for owner in grants:
                self._grants.pop(owner_digest(owner), None)
        used, self._used = self._used, {}
        if not used:
            return
        try:
            await self.store.touch(used)
        except Exception:
            for key_id, when in used.items():
                if self._used.get(key_id, 0) < when:
                    self._used[key_id] = when
            raise


def _principal(record, grant):
    """
    Who a call with the key C{record} is, its owner's C{grant} being what
    it is: the owner, who may use the key's scopes that they still hold.
    The config's rules match the owner's own scopes and teams (a key can
    drop a permission, never a restriction); a team key's calls count for
    its team while the owner is in it.
    """
    issuer, sub = owner_parts(record.owner)
    return Principal(
        sub=sub,
        scopes=frozenset(record.scopes) & grant.scopes,
        name=grant.name,
        email=grant.email,
        teams=grant.teams,
        issuer=issuer,
        key_id=record.id,
        owner_scopes=grant.scopes,
        key_team=record.team if record.team in grant.teams else None,
    )


def _same(a, b):
    return (a.scopes, a.teams, a.name, a.email, a.ended) == (b.scopes, b.teams, b.name, b.email, b.ended)


def _with_use(record, used):
    if used is not None and (record.last_used_at is None or record.last_used_at < used):
        from dataclasses import replace

        return replace(record, last_used_at=used)
    return record
