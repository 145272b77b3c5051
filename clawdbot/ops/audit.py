"""
The audit trail: who did what that matters (signing in and out, keys,
reloads, model management, reading someone else's history, quotas),
one JSON line per event with a stable name, to its own stream
(C{audit_log.path}) and, with C{audit_log.store}, to the history database
for the admin page (L{clawdbot.storage.audit}).

A line is C{{"time", "event", "principal": {"iss", "sub"}, "client",
"request_id", "object"}}, plus C{details} for some events.  Nothing secret
goes in: principals are issuer and subject, objects are ids and names, and
details are curated reasons, never a token, a key, a cookie or a config
value.
"""

import os
import secrets
import sys
import time

from twisted.internet.defer import succeed
from twisted.logger import Logger

from clawdbot.errors import StorageUnavailable
from clawdbot.ops.rounds import OneRound
from clawdbot.ops.observe import log_line, redact_text
from clawdbot.units import rfc3339

log = Logger(namespace="clawdbot.audit")

# The event names, stable for scripts and SIEMs.
EVENTS = (
    "auth.sign_in",
    "auth.sign_in_refused",
    "auth.refresh_refused",
    "auth.sign_out",
    "key.created",
    "key.revoked",
    "config.reloaded",
    "config.reload_failed",
    "model.pulled",
    "model.deleted",
    "model.created",
    "model.copied",
    "model.pushed",
    "history.read_other",
    "history.deleted",
    "quota.exceeded",
)

# How often, at most, expired events are dropped from the database.
PRUNE_EVERY = 3600.0


# Events kept for the database at most while it cannot take them (the
# oldest go first past it, with one warning).
MAX_UNSTORED = 10_000


class AuditLog:
    """
    Writes audit events.  C{record} never raises and never waits: the file
    is line-buffered, the database write runs on the store's threads.
    Events the database cannot take (an outage) are kept, in order, and
    written with the next event or the next L{flush} (every
    C{usage.flush_interval}); the store logs the outage once.

    @param config: a callable giving the current config (for C{audit_log}).
    @param store: an L{clawdbot.storage.audit.AuditStore}, or C{None}.
    """

    def __init__(self, config, store=None, clock=time.time):
        self.config = config
        self.store = store
        self.clock = clock
        self.path = None
        self.stream = None
        # Why the configured file cannot be written, or None (shown by /v1/admin/status).
        self.error = None
        self._pruned = 0.0
        # Events not in the database yet: (at, event, line), oldest first.
        self._unstored = []
        # A batch the database did not take, (id, rows): written first, as it
        # is, with its id (a write kept although it seemed to fail, the
        # connection lost during its COMMIT, is not kept twice).
        self._unsent = None
        # The database writes, one at a time (a flush during one waits for it).
        self._writes = OneRound(self._store)
        self._dropped = False
        self.open(config().audit_log.path)
        engine = getattr(store, "engine", None)
        if engine is not None and hasattr(engine, "before_close"):
            engine.before_close.append(self._closing)

    def _closing(self):
        """The store closes (the gateway stops): events it has not taken are lost to it; one warning says how many."""
        count = len(self._unstored) + (len(self._unsent[1]) if self._unsent is not None else 0)
        if count:
            log.warn("{count} audit event(s) were not stored in the history database before the stop (they are in the audit log's file, if any)", count=count)

    def open(self, path):
        """
        Write to C{path} ("-" is stdout, C{None} nothing) from now on.  The
        new file is opened before the old one is closed: one that cannot be
        opened leaves the old stream writing (and says so in L{error} and the
        log), so no event is lost to a bad path.
        """
        try:
            if path == "-":
                stream = sys.stdout
            elif path:
                if os.path.exists(path) and not os.path.isfile(path):
                    # A pipe would block the gateway until someone reads it.
                    raise OSError(0, "not a regular file")
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                stream = open(path, "a", encoding="utf-8", buffering=1)
            else:
                stream = None
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "not a usable path"
            self.error = f"cannot open {path!r}: {reason}"
            log.error("The audit log cannot be opened, still writing to {old}: {error}", old=self.path, error=self.error)
            return False
        old, self.stream, self.path, self.error = self.stream, stream, path, None
        if old is not None and old is not sys.stdout and old is not stream:
            old.close()
        return True

    def reopen(self):
        """After logrotate moved the file (SIGUSR1); a reload that changed the path is followed too."""
        self.open(self.config().audit_log.path)

    def record(self, event, request=None, principal=None, obj=None, client=None, request_id=None, **details):
        """
        One event.  C{principal} defaults to the request's; the client
        address and request id come from C{request} when there is one.
        """
        assert event in EVENTS, event
        if principal is None and request is not None:
            principal = getattr(request, "principal", None)
        now = self.clock()
        entry = {
            "time": rfc3339(now),
            "event": event,
            "principal": _principal(principal),
            "client": client if client is not None else (request.client_host() if request is not None else None),
            "request_id": request_id if request_id is not None else (request.request_id if request is not None else None),
            # A name or id from a request may be anything, a token too.
            "object": redact_text(obj) if isinstance(obj, str) else obj,
        }
        if details:
            entry["details"] = {key: redact_text(value) if isinstance(value, str) else value for key, value in details.items()}
        line = log_line(entry)
        if self.stream is not None:
            try:
                self.stream.write(line)
            except Exception:
                log.failure("Could not write the audit log")
        if self.store is not None and self.config().audit_log.store:
            if len(self._unstored) >= MAX_UNSTORED:
                del self._unstored[0]
                if not self._dropped:
                    self._dropped = True
                    log.warn("Audit events kept for the database passed {count}; dropping the oldest", count=MAX_UNSTORED)
            self._unstored.append((now, event, line.rstrip("\n")))
            self.flush()

    def flush(self):
        """
        Write the events the database has not taken yet (a Deferred that
        never fails); a write under way takes them instead.
        """
        if self.store is None or (self._writes.running is None and not self._unstored and self._unsent is None):
            return succeed(None)
        # (Fires once the write under way, and what it picks up, is over:
        # the store is closed at shutdown only after that.)
        return self._writes()

    async def _store(self):
        while self._unsent is not None or self._unstored:
            if self._unsent is not None:
                batch, rows = self._unsent
            else:
                batch, rows = f"audit-{secrets.token_hex(12)}", self._unstored  # (as storage.store.new_batch_id, which this layer may not import)
                self._unstored = []
            config = self.config().audit_log
            now = self.clock()
            prune = None
            if now - self._pruned >= PRUNE_EVERY:
                prune = now - config.retention
            try:
                await self.store.add_many(rows, prune, batch=batch)
            except StorageUnavailable:
                # Kept, in order, for the next try (the store said the outage).
                self._unsent = (batch, rows)
                return
            except Exception:
                self._unsent = None
                log.failure("Could not store {count} audit event(s)", count=len(rows))
                return
            self._unsent = None
            if prune is not None:
                self._pruned = now
            self._dropped = False


def _principal(principal):
    """C{{"iss", "sub"}} of a principal, an identity, or an C{(issuer, sub)} pair."""
    if principal is None:
        return None
    if isinstance(principal, tuple):
        return {"iss": principal[0], "sub": principal[1]}
    return {"iss": getattr(principal, "issuer", None), "sub": getattr(principal, "sub", None)}
