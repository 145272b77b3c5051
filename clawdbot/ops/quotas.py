"""
Quotas over days, weeks and months, and the periodic writes of usage.

L{clawdbot.storage.usage.UsageBook} counts every call to the model
(principal, team, API key, model, prompt and completion tokens, time,
whether it failed) in memory, per hour, and L{Batches} writes what it
gathered in one transaction every C{usage.flush_interval}: the request path
never writes.  A call is counted once it reached the model (a call refused
before, by a limit or a full queue, is not); its tokens are Ollama's counts,
or the meter's estimate when it ended early (L{clawdbot.backend.translate.Meter}).

L{Quotas} checks C{quotas} before each call: what a subject (a user, a
team, a key) used in the current window is what the database said at the
last flush (re-read then, so other instances' calls show within two flush
intervals), plus what this instance counted since.  A call is refused
once a window's tokens are spent (a call may take it past: tokens are known
only afterwards) or its requests would be.

A call is a team's when it is made with a key of that team, else the
first of the principal's teams.
"""

from dataclasses import dataclass

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from clawdbot.auth.identity import issuer_id
from clawdbot.errors import APIError, StorageUnavailable
from clawdbot.ops.rounds import OneRound
from clawdbot.units import WINDOWS, hour_of, window_bounds, zone_of

log = Logger(namespace="clawdbot.usage")

# Subjects not checked for this long are forgotten (re-read when they return).
IDLE = 600.0
_MAX_SUBJECTS = 100_000


@dataclass(frozen=True)
class Limit:
    """One quota that applies to a call: whose, which window, what, how much."""

    subject: tuple
    label: str
    window: str
    what: str  # "tokens" or "requests"
    limit: int

    @property
    def name(self):
        return f"{self.what}_per_{self.window}"


class _Used:
    """What one subject used: the database's totals per window start, and this instance's calls since."""

    def __init__(self, starts, totals, now):
        self.starts = starts
        self.totals = totals  # [(requests, tokens)] per start
        self.local = {}  # hour -> [requests, tokens], counted here since the totals were read
        self.flushing = {}
        self.held = {}  # hour -> [requests, tokens] of calls under way here (not yet counted)
        self.checked = now

    def used(self, index):
        start = self.starts[index]
        requests, tokens = self.totals[index]
        for hours in (self.local, self.flushing, self.held):
            for hour, (r, t) in hours.items():
                if hour >= start:
                    requests += r
                    tokens += t
        return requests, tokens


class Quotas:
    """
    The C{quotas} section applied before each call (L{check}) and kept
    current as calls end (a L{UsageBook} listener) and at each flush
    (L{refresh}).

    @param store: the usage store (L{clawdbot.storage.usage.UsageStore}).
    @param metrics: for C{clawdbot_quota_refusals_total}.
    """

    def __init__(self, store, clock, metrics=None):
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.subjects = {}
        # (subject, window starts) -> the calls waiting for its totals
        self._loading = {}

    def limits(self, principal, config):
        """The quotas that apply to a call of C{principal} under C{config}."""
        quotas = config.quotas
        if not _any_quota(quotas):
            return []
        out = []
        for subject in subjects_of(principal, principal.team):
            kind = subject[0]
            if kind == "user":
                out += [Limit(subject, "your", w, what, n) for w, what, n in _user_rule(principal, quotas)]
            elif kind == "team" and subject[1] in quotas.per_team:
                out += [Limit(subject, f"team {subject[1]}'s", w, what, n) for w, what, n in _rule_values(quotas.per_team[subject[1]])]
            elif kind == "key":
                out += [Limit(subject, "this API key's", w, what, n) for w, what, n in _rule_values(quotas.per_key)]
        return out

    async def check(self, principal, config, estimate=0, hold=None):
        """
        Refuse a call that a quota does not allow (429 QUOTA_EXCEEDED with
        C{Retry-After} = the window's reset; in shadow mode only logged and
        counted).

        @param estimate: the call's tokens as estimated before it is made.
        @param hold: a list: a call that passes is held against its
            subjects' allowances (one request, C{estimate} tokens) until
            L{release}d with what is appended there, so calls made at the
            same moment cannot all pass on the same remainder.

        @return: the response headers that tell what is left
            (C{x-clawdbot-quota-remaining-tokens}, C{-remaining-requests},
            C{x-clawdbot-quota-reset}), empty when no quota applies.
        """
        limits = self.limits(principal, config)
        if not limits:
            return {}
        now = self.clock.seconds()
        zone = zone_of(config.usage.timezone)
        bounds = {w: window_bounds(w, now, zone) for w in WINDOWS}
        starts = tuple(bounds[w][0] for w in WINDOWS)
        used = {}
        try:
            for subject in {limit.subject for limit in limits}:
                used[subject] = await self._used(subject, starts, now)
        except CancelledError:
            raise  # the caller went away: no call is made
        except Exception as e:
            # The database cannot say what was used: rate_limit.on_backend_error
            # decides, as for the shared rate limits.  (The store says an
            # outage once; anything else is logged here.)
            if not isinstance(e, StorageUnavailable):
                log.failure("Could not read the quota totals")
            if config.rate_limit.on_backend_error == "closed":
                raise e if isinstance(e, StorageUnavailable) else StorageUnavailable("the quota totals could not be read") from None
            return {}
        headers = {}
        least = {}
        spent_out = []
        for limit in limits:
            requests, tokens = used[limit.subject].used(WINDOWS.index(limit.window))
            spent = tokens if limit.what == "tokens" else requests
            # What is left once this call is made: it takes one request
            # (its tokens are known only when it ends).
            left = max(0, limit.limit - spent - (1 if limit.what == "requests" else 0))
            reset = max(1, int(bounds[limit.window][1] - now + 0.999))
            # Per kind, the allowance with least left (none left in two:
            # the one back later).
            if limit.what not in least or (left, -reset) < (least[limit.what][0], -least[limit.what][1]):
                least[limit.what] = (left, reset, limit.limit)
            if spent >= limit.limit:
                spent_out.append((reset, limit))
        if spent_out:
            # The call passes again only once every spent quota has reset:
            # the one that resets last is the one to name.
            reset, limit = max(spent_out, key=lambda item: item[0])
            for _, each in spent_out:
                self._refused(each, config.quotas.shadow, principal)
            if not config.quotas.shadow:
                raise APIError(
                    "QUOTA_EXCEEDED",
                    details=f"{limit.label} {_WINDOW_NAMES[limit.window]} quota of {limit.limit} {limit.what} ({limit.name}) is spent; it resets in {_in(reset)}",
                    headers={"Retry-After": str(reset)},
                )
        if hold is not None:
            hour = hour_of(now)
            for subject, entry in used.items():
                _add(entry.held, hour, 1, estimate)
                hold.append((subject, entry, hour, estimate))
        if "tokens" in least:
            headers["x-clawdbot-quota-remaining-tokens"] = str(least["tokens"][0])
        if "requests" in least:
            headers["x-clawdbot-quota-remaining-requests"] = str(least["requests"][0])
        # When the allowance that runs out first comes back: of the token
        # and request allowances, the one with the smaller share left (none
        # left in both: the later reset).
        binding = min(least.values(), key=lambda item: (item[0] / item[2], -item[1]))
        headers["x-clawdbot-quota-reset"] = str(binding[1])
        return headers

    async def standing(self, principal, config):
        """
        Each quota that applies to C{principal}'s calls, with what is used
        and left now and when it resets (the admin page's people view).
        """
        limits = self.limits(principal, config)
        if not limits:
            return []
        now = self.clock.seconds()
        zone = zone_of(config.usage.timezone)
        bounds = {w: window_bounds(w, now, zone) for w in WINDOWS}
        starts = tuple(bounds[w][0] for w in WINDOWS)
        out = []
        for limit in limits:
            entry = await self._used(limit.subject, starts, now)
            requests, tokens = entry.used(WINDOWS.index(limit.window))
            spent = tokens if limit.what == "tokens" else requests
            out.append(
                {
                    "quota": limit.name,
                    "applies_to": limit.subject[0] if limit.subject[0] != "team" else f"team {limit.subject[1]}",
                    "limit": limit.limit,
                    "used": spent,
                    "left": max(0, limit.limit - spent),
                    "resets_in_seconds": max(1, int(bounds[limit.window][1] - now + 0.999)),
                }
            )
        return out

    def _refused(self, limit, shadow, principal):
        if self.metrics is not None:
            self.metrics.quota_refusals.labels(limit.name, limit.subject[0], "true" if shadow else "false").inc()
        if shadow:
            log.info(
                "Quota {quota} ({subject}) of {user} is spent (shadow mode: the call goes on)",
                quota=limit.name,
                subject=limit.subject[0],
                user=principal.sub,
                idp=principal.issuer,
                team=principal.team,
                key_id=principal.key_id,
            )

    async def _used(self, subject, starts, now):
        """
        C{subject}'s entry for the windows beginning at C{starts}, its totals
        read once however many calls ask at the same moment (they share one
        entry, so each sees the others' holds); a caller that goes away
        stops waiting, never the read the others wait for.
        """
        entry = self.subjects.get(subject)
        while entry is None or entry.starts != starts:
            waiter = Deferred()
            waiters = self._loading.get((subject, starts))
            if waiters is not None:
                waiters.append(waiter)
            else:
                # (Listed before the read starts: it may end at once.)
                self._loading[(subject, starts)] = [waiter]
                Deferred.fromCoroutine(self._load(subject, starts, now))
            await waiter
            entry = self.subjects.get(subject)
        entry.checked = now
        return entry

    async def _load(self, subject, starts, now):
        """Read C{subject}'s totals since C{starts} into its entry, then wake who waits for them."""
        failure = None
        try:
            totals = (await self.store.totals([subject], starts))[subject]
        except Exception as e:
            failure = e
        else:
            entry = self.subjects.get(subject)
            fresh = _Used(starts, totals, now)
            if entry is not None:
                # A new day (week, month) began: what was counted here and
                # not yet read back, and what is under way, still count
                # where their hour falls.
                fresh.local = entry.local
                fresh.flushing = entry.flushing
                fresh.held = entry.held
            self.subjects[subject] = fresh
            if len(self.subjects) > _MAX_SUBJECTS:
                self._forget(now, everything=True)
        for waiter in self._loading.pop((subject, starts), ()):
            if waiter.called:  # its caller went away
                continue
            if failure is None:
                waiter.callback(None)
            else:
                waiter.errback(failure)

    def release(self, hold):
        """The calls of C{hold} (what L{check} appended) ended: they are no longer held (their use is counted instead)."""
        for _, entry, hour, estimate in hold:
            if hour in entry.held:
                _add(entry.held, hour, -1, -estimate)
                if entry.held[hour][0] <= 0:
                    del entry.held[hour]

    def counted(self, principal, team, now, requests, tokens):
        """A L{UsageBook} listener: a call ended; count it for every subject it belongs to."""
        hour = hour_of(now)
        for subject in subjects_of(principal, team):
            entry = self.subjects.get(subject)
            if entry is not None:
                _add(entry.local, hour, requests, tokens)

    def before_flush(self):
        """What was counted so far is about to be written: keep it aside until the totals are read again."""
        for entry in self.subjects.values():
            _merge(entry.flushing, entry.local)
            entry.local = {}

    def flush_failed(self):
        """The write failed: what was set aside is still only here."""
        for entry in self.subjects.values():
            _merge(entry.local, entry.flushing)
            entry.flushing = {}

    async def refresh(self):
        """After a flush: read the totals of the subjects in use again (other instances' calls included)."""
        now = self.clock.seconds()
        self._forget(now)
        subjects = list(self.subjects)
        if not subjects:
            return
        by_starts = {}
        for subject in subjects:
            by_starts.setdefault(self.subjects[subject].starts, []).append(subject)
        try:
            for starts, group in by_starts.items():
                totals = await self.store.totals(group, starts)
                for subject in group:
                    entry = self.subjects.get(subject)
                    if entry is not None and entry.starts == starts:
                        entry.totals = totals[subject]
                        entry.flushing = {}
        except Exception:
            # The write went through: what was set aside is in the database,
            # though not yet in the totals read before it.
            for entry in self.subjects.values():
                for index, start in enumerate(entry.starts):
                    requests, tokens = entry.totals[index]
                    for hour, (r, t) in entry.flushing.items():
                        if hour >= start:
                            requests += r
                            tokens += t
                    entry.totals[index] = (requests, tokens)
                entry.flushing = {}
            raise

    def _forget(self, now, everything=False):
        for subject, entry in list(self.subjects.items()):
            if everything or now - entry.checked > IDLE:
                if not entry.local and not entry.flushing and not entry.held:
                    del self.subjects[subject]


def subjects_of(principal, team):
    """What a call of C{principal} counts for: its user, the C{team} it charges (if any), its API key (if any)."""
    subjects = [("user", issuer_id(principal.issuer or ""), principal.sub)]
    if team is not None:
        subjects.append(("team", team))
    if principal.key_id is not None:
        subjects.append(("key", principal.key_id))
    return subjects


def _add(hours, hour, requests, tokens):
    """Add to C{hours}' C{[requests, tokens]} of C{hour}."""
    slot = hours.setdefault(hour, [0, 0])
    slot[0] += requests
    slot[1] += tokens


def _merge(into, hours):
    for hour, (requests, tokens) in hours.items():
        _add(into, hour, requests, tokens)


_ANY = {}


def _any_quota(quotas):
    """Whether C{quotas} (a config section) sets any allowance at all; worked out once per config."""
    known = _ANY.get(id(quotas))
    if known is None or known[0] is not quotas:
        rules = [quotas, quotas.per_key, *quotas.per_team.values(), *quotas.per_scope.values()]
        known = _ANY[id(quotas)] = (quotas, any(_rule_values(rule) for rule in rules))
        if len(_ANY) > 16:
            _ANY.clear()
            _ANY[id(quotas)] = known
    return known[1]


def _in(seconds):
    """C{seconds} as people say it: 5h 3m, 2d 4h, 40s."""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


_WINDOW_NAMES = {"day": "daily", "week": "weekly", "month": "monthly"}
_FIELDS = [(w, what) for w in WINDOWS for what in ("tokens", "requests")]


def _rule_values(rule):
    """The (window, what, limit) a quota rule sets (0: none)."""
    return [(w, what, getattr(rule, f"{what}_per_{w}")) for w, what in _FIELDS if getattr(rule, f"{what}_per_{w}")]


def _user_rule(principal, quotas):
    """
    Each user's own allowance: the top-level numbers, or, when a
    C{per_scope} rule names one of the principal's scopes, the most
    generous of the matching rules (0 there: none), field by field.
    """
    matched = [quotas.per_scope[s] for s in sorted(principal.rule_scopes) if s in quotas.per_scope]
    if not matched:
        return _rule_values(quotas)
    out = []
    for w, what in _FIELDS:
        values = [getattr(rule, f"{what}_per_{w}") for rule in matched]
        if 0 not in values:
            out.append((w, what, max(values)))
    return out


class Batches:
    """
    The periodic writes: usage, quota totals re-read, API keys' last use,
    audit events the database did not take yet.  Run every
    C{usage.flush_interval} (L{clawdbot.tap}) and once at stop.

    What a round cannot write (the database is down) is kept for the next
    one; an outage is logged once, by the store, not once per round.

    @ivar run: C{run()} starts one round (a round already under way is
        waited for instead of starting another: L{OneRound}).
    """

    def __init__(self, usage, quotas, keys, current_config, audit=None):
        self.usage = usage
        self.quotas = quotas
        self.keys = keys
        self.current_config = current_config
        self.audit = audit
        self.run = OneRound(self._round)

    async def _round(self):
        config = self.current_config()
        self.quotas.before_flush()
        try:
            await self.usage.flush(config.usage.retention)
        except Exception as e:
            self.quotas.flush_failed()
            _failed(e, "Could not write usage; kept for the next round")
        else:
            try:
                await self.quotas.refresh()
            except Exception as e:
                _failed(e, "Could not read the quota totals")
        if self.keys is not None:
            try:
                await self.keys.flush()
            except Exception as e:
                _failed(e, "Could not write the API keys' last use; kept for the next round")
        if self.audit is not None:
            await self.audit.flush()


def _failed(error, message):
    """A periodic write failed: a bug is logged with its traceback; an outage the store has already said."""
    if not isinstance(error, StorageUnavailable):
        log.failure(message)
