"""
The rules of chat history over a store (SPEC.md §6), with no HTTP in
them: who sees a session (its owner, and anyone holding C{history:<team>}
for its team) and who changes it (its owner only: a teammate who may read
it gets a 403, anyone else a 404, as if it did not exist); the stored-bytes
caps per request and per owner, checked before the model is called; and
one turn at a time per session, so the stored order is the order the model
saw.  The routes are L{clawdbot.http.history}; stateful completions use
the same rules (L{clawdbot.http.chat}).
"""

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from twisted.internet.defer import DeferredLock

from clawdbot.errors import APIError
from clawdbot.storage.store import is_session_id, message_bytes
from clawdbot.units import format_size

if TYPE_CHECKING:
    from clawdbot.auth.identity import Principal
    from clawdbot.config import HistoryConfig
    from clawdbot.storage.store import Session, SQLStore

T = TypeVar("T")

# A full history frees up only when its owner deletes or clears sessions:
# there is no time at which a retry would pass by itself.
QUOTA_RETRY_AFTER = 3600


def team_reader(principal: "Principal", session: "Session") -> bool:
    """May C{principal} read C{session} through C{history:<team>}?"""
    return session.team is not None and f"history:{session.team}" in principal.scopes


def may_use_team(principal: "Principal", team: str) -> bool:
    """A session may be created for a team the principal belongs to or reads."""
    return team in principal.teams or f"history:{team}" in principal.scopes


def not_found() -> APIError:
    return APIError("NOT_FOUND", details="no such session")


def not_owner() -> APIError:
    return APIError("AUTH_INSUFFICIENT_SCOPE", details="only the owner of a session may change it")


async def load_visible(store: "SQLStore", principal: "Principal", sid: str, with_messages: bool = False) -> "Session":
    """The session C{sid} for reading: its owner's or a readable team's; else 404."""
    return (await load_readable(store, principal, sid, with_messages))[0]


async def load_readable(store: "SQLStore", principal: "Principal", sid: str, with_messages: bool = False) -> "tuple[Session, bool]":
    """L{load_visible}, and whether the reader is its owner (else a team reader's or an admin's read, which is audited)."""
    session = await store.get_session(sid, with_messages=with_messages) if is_session_id(sid) else None
    if session is None:
        raise not_found()
    if session.owner in await store.owners_of(principal.issuer, principal.sub):
        return session, True
    if team_reader(principal, session):
        return session, False
    raise not_found()


async def load_owned(store: "SQLStore", principal: "Principal", sid: str) -> "Session":
    """
    The session C{sid} for changing: its owner's only.  A team reader gets
    a 403, anyone else a 404.
    """
    session = await store.get_session(sid) if is_session_id(sid) else None
    if session is None:
        raise not_found()
    if session.owner in await store.owners_of(principal.issuer, principal.sub):
        return session
    if team_reader(principal, session):
        raise not_owner()
    raise not_found()


# Bytes held for a reply while its turn is in flight (replies are stored
# whatever their size once the turn was accepted).
REPLY_ALLOWANCE = 16 * 1024


class HistoryReservations:
    """
    Bytes of turns that passed the stored-history quota and are not stored
    yet, per owner.  Counting them in the check keeps turns that run at the
    same moment (on different sessions) from all passing a check made before
    any of them was stored.  Per process: gateways sharing one database can
    each let one turn past the quota at the same moment.
    """

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}

    def hold(self, owner: str, size: int) -> Callable[[], None]:
        """Count C{size} bytes for C{owner} until the returned C{release()} is called."""
        self.pending[owner] = self.pending.get(owner, 0) + size
        released: list[bool] = []

        def release() -> None:
            if not released:
                released.append(True)
                left = self.pending.get(owner, 0) - size
                if left > 0:
                    self.pending[owner] = left
                else:
                    self.pending.pop(owner, None)

        return release


def quota_exceeded(limits: "HistoryConfig") -> APIError:
    """The 429 of a full stored history."""
    return APIError(
        "QUOTA_EXCEEDED",
        details=f"your stored chat history has reached its limit of {format_size(limits.max_bytes_per_user)}; delete or clear sessions to go on",
        headers={"Retry-After": str(QUOTA_RETRY_AFTER)},
    )


async def check_history_quota(
    store: "SQLStore", principal: "Principal", limits: "HistoryConfig", new: Sequence[tuple], reservations: HistoryReservations
) -> Callable[[], None]:
    """
    Refuse a turn whose messages C{new} (C{[(role, content, incomplete)]},
    or C{[(role, content, incomplete, images)]}: images count as stored) would pass the per-request cap (413) or the owner's stored-bytes quota
    (429 QUOTA_EXCEEDED with Retry-After); nothing is stored either way.

    @param reservations: the L{HistoryReservations} of turns in flight.
    @return: C{release()}, to call once the turn is stored (or not).
    """
    size = sum(message_bytes(item[1], item[3] if len(item) > 3 and item[3] else ()) for item in new)
    if size > limits.max_bytes_per_request:
        raise APIError(
            "PAYLOAD_TOO_LARGE",
            details=f"the messages to store are larger than the limit of {format_size(limits.max_bytes_per_request)} per request",
        )
    used = await store.usage(await store.owners_of(principal.issuer, principal.sub))
    if used + reservations.pending.get(principal.key, 0) + size > limits.max_bytes_per_user:
        raise quota_exceeded(limits)
    # Held until the turn is stored: its messages and an allowance for the
    # reply, so that turns running at the same moment leave room for theirs.
    return reservations.hold(principal.key, size + REPLY_ALLOWANCE)


class SessionLocks:
    """
    One lock per session, so concurrent turns on a session run one after the
    other and the stored order is the order the model saw.
    """

    def __init__(self) -> None:
        self._locks: dict[str, DeferredLock] = {}

    async def run(self, sid: str, fn: Callable[[], Awaitable[T]]) -> T:
        lock = self._locks.get(sid)
        if lock is None:
            lock = self._locks[sid] = DeferredLock()
        await lock.acquire()
        try:
            return await fn()
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(sid, None)

    def held(self, sid: str) -> bool:
        """Whether a turn of session C{sid} runs (or waits) now."""
        lock = self._locks.get(sid)
        return lock is not None and bool(lock.locked or lock.waiting)


class History:
    """
    The history rules over one store, for the routes that read and change
    sessions and the completions that add turns.

    @ivar store: the L{clawdbot.storage.store} in use.
    @ivar locks: one turn at a time per session (L{SessionLocks}).
    @ivar reservations: the bytes of turns in flight (L{HistoryReservations}).
    @ivar stoppers: per session id, a callable that stops the reply being
        written in this process (registered by the turn while it runs).
    """

    def __init__(self, store: "SQLStore") -> None:
        self.store = store
        self.locks = SessionLocks()
        self.reservations = HistoryReservations()
        self.stoppers: dict[str, Callable[[], object]] = {}

    def busy(self, sid: str) -> bool:
        """
        Whether a turn of session C{sid} is in progress in this process: a
        turn registers its stopper once it holds the session (a clear, a
        truncate or a turn still waiting for it is not a reply being written).
        """
        return sid in self.stoppers

    def stop(self, sid: str) -> bool:
        """Stop the reply being written for session C{sid}, if any; whether there was one."""
        stopper = self.stoppers.get(sid)
        if stopper is None:
            return False
        stopper()
        return True

    def visible(self, principal: "Principal", sid: str, with_messages: bool = False) -> Awaitable["Session"]:
        """L{load_visible} on this store."""
        return load_visible(self.store, principal, sid, with_messages)

    def readable(self, principal: "Principal", sid: str, with_messages: bool = False) -> "Awaitable[tuple[Session, bool]]":
        """L{load_readable} on this store."""
        return load_readable(self.store, principal, sid, with_messages)

    def owned(self, principal: "Principal", sid: str) -> Awaitable["Session"]:
        """L{load_owned} on this store."""
        return load_owned(self.store, principal, sid)

    def check_quota(self, principal: "Principal", limits: "HistoryConfig", new: Sequence[tuple]) -> Awaitable[Callable[[], None]]:
        """L{check_history_quota} on this store, counting the turns in flight."""
        return check_history_quota(self.store, principal, limits, new, self.reservations)

    def one_at_a_time(self, sid: str, fn: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """Run C{fn()} when no other turn of session C{sid} runs."""
        return self.locks.run(sid, fn)
