"""
The configuration: one frozen object built from a YAML file and the
environment.

Loading is pure apart from reading the file: L{parse_config} takes the
already-read text and an environment mapping, so every rule here is tested
without touching the disk.  The schema is the tree of frozen dataclasses
below; one generic walker checks types, ranges and choices and names the path
of whatever is wrong (C{auth.jwt.algorithms[1]: 'none' is not allowed}).
"""

import collections.abc
import dataclasses
import datetime
import ipaddress
import math
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field

import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from clawdbot.auth.identity import is_scope_token, split_scopes
from clawdbot.auth.presets import PRESET_ENDPOINTS
from clawdbot.auth.session import session_issuer
from clawdbot.net import ip_network_text, is_decimal, is_loopback, strport_interface, strport_port, web_origin
from clawdbot.server_tls import FileRefused, TLSConfigError, check_tls, read_small_file, tls_host_name
from clawdbot.units import format_duration, format_size, parse_duration, parse_size, zone_of

PLACEHOLDER_SECRET = "change-me-to-a-random-secret-of-32-bytes"
# The example configs' placeholders, this one and earlier ones: known to everyone.
PLACEHOLDER_SECRETS = frozenset({PLACEHOLDER_SECRET, "your-32-byte-secret-key-here"})
MIN_SECRET_BYTES = 32
MASK = "********"


class ConfigError(Exception):
    """
    The configuration cannot be used.

    @ivar path: where in the file, as C{auth.jwt.algorithms[1]}, or C{None}
        for the file as a whole.
    @ivar reason: what is wrong there.
    """

    def __init__(self, path, reason):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)


def _opt(default, kind=None, choices=None, items=None, minimum=None, maximum=None, secret=False, doc=""):
    """
    A config field with its default and its rules.

    @param kind: C{"duration"} or C{"size"} for human units.
    @param choices: allowed values of a scalar.
    @param items: allowed values of each item of a list.
    @param secret: masked by C{check-config}, left out of the repr; an empty value is refused.
    """
    meta = dict(kind=kind, choices=choices, items=items, minimum=minimum, maximum=maximum, secret=secret, doc=doc)
    # (A secret is left out of the dataclass's repr too: a config printed
    # in a traceback or a debug line does not show it.)
    if isinstance(default, (list, dict)):
        frozen = _freeze(default)
        return field(default_factory=lambda: frozen, metadata=meta, repr=not secret)
    return field(default=default, metadata=meta, repr=not secret)


def _freeze(value):
    if isinstance(value, dict):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _section(cls):
    return field(default_factory=cls, metadata=dict(kind=None, secret=False))


@dataclass(frozen=True)
class ServerConfig:
    mode: str = _opt("dev", choices=("dev", "production"))
    listen: str = _opt("tcp:8080")
    debug_listen: str = _opt("tcp:18789:interface=127.0.0.1")
    public_url: typing.Optional[str] = _opt(None)
    drain_timeout: float = _opt(30.0, kind="duration", maximum=3600)
    # On SIGTERM: answer 503 SHUTTING_DOWN (the health probes still answered,
    # /readyz 503) this long before the listeners close, so a balancer that
    # polls /readyz takes the instance out first.  0: nginx's passive checks
    # learn nothing from it (README, "Rolling restarts").
    drain_delay: float = _opt(0.0, kind="duration", minimum=0, maximum=600)
    # The dependencies whose failure makes /readyz 503 (the others are
    # reported with a 200).
    ready_requires: typing.Tuple[str, ...] = _opt(["backend"], items=("backend", "storage", "rate_limit"))
    # Pages on these origins may call the secure listener from a browser
    # (CORS, clawdbot.http.cors): exact origins, none by default, never "*".
    cors_origins: typing.Tuple[str, ...] = _opt([], kind="origin")
    # Reverse proxies whose X-Forwarded-For / Forwarded name the client
    # (addresses or CIDR networks); none by default: the peer is the client.
    trusted_proxies: typing.Tuple[str, ...] = _opt([], kind="network")


@dataclass(frozen=True)
class ModelLimitConfig:
    # Calls to this model at once (clawdbot.backend.ollama.Ollama.acquire),
    # within max_connections; further ones wait, fairly shared.
    max_connections: int = _opt(1, minimum=1, maximum=100000)


@dataclass(frozen=True)
class ModelAccessConfig:
    # Who (a team, or a scope) may use which models ("*": all the allow-list has).
    team: typing.Optional[str] = _opt(None)
    scope: typing.Optional[str] = _opt(None)
    models: typing.Tuple[str, ...] = _opt([])


@dataclass(frozen=True)
class TLSMaterial:
    """
    What C{backend.tls} names, read and checked when the config loads (so
    a reload re-reads the files): PEM certificates and key, and a
    fingerprint of all of it that tells one trust from another.
    """

    ca: typing.Tuple[bytes, ...] = ()
    client_chain: typing.Tuple[bytes, ...] = ()
    client_key: typing.Optional[bytes] = field(default=None, repr=False)
    fingerprint: str = ""


@dataclass(frozen=True)
class BackendTLSConfig:
    # A private CA (PEM, one certificate or a bundle) instead of the system's store.
    ca_file: typing.Optional[str] = _opt(None)
    # Mutual TLS: the gateway's certificate (PEM, maybe with its chain) and key.
    client_cert: typing.Optional[str] = _opt(None)
    client_key: typing.Optional[str] = _opt(None)
    # The name the certificate must carry (and the SNI sent), when not the URL's host.
    server_name: typing.Optional[str] = _opt(None)
    # The files' contents (clawdbot.config._load_tls); not a config key.
    material: typing.Optional[TLSMaterial] = field(default=None, repr=False, metadata=dict(internal=True))


@dataclass(frozen=True)
class BackendURLConfig:
    # One backend of backend.urls written as an object: its own headers
    # (over backend.headers) and TLS settings (instead of backend.tls).
    url: typing.Optional[str] = _opt(None)
    headers: typing.Mapping[str, str] = _opt({}, secret=True)
    tls: typing.Optional[BackendTLSConfig] = _opt(None)


@dataclass(frozen=True)
class BackendConfig:
    url: str = _opt("http://127.0.0.1:11434")
    # Each a URL, or {url, headers, tls}.
    urls: typing.Tuple[typing.Union[str, BackendURLConfig], ...] = _opt([])
    # Sent with every backend call (a shared secret of Ollama's proxy): secrets.
    headers: typing.Mapping[str, str] = _opt({}, secret=True)
    tls: BackendTLSConfig = _section(BackendTLSConfig)
    health_interval: float = _opt(10.0, kind="duration", minimum=0.1, maximum=3600)
    model: str = _opt("qwen3:32b")
    models: typing.Tuple[str, ...] = _opt([])
    aliases: typing.Mapping[str, str] = _opt({})
    connect_timeout: float = _opt(5.0, kind="duration", minimum=0.001, maximum=3600)
    first_byte_timeout: float = _opt(60.0, kind="duration", minimum=0.001, maximum=86400)
    idle_timeout: float = _opt(30.0, kind="duration", minimum=0.001, maximum=86400)
    # What a caller without the admin scope may ask of the shared backend:
    # the largest options.num_ctx (0: none may be set), and the longest
    # keep_alive (unloading with 0 and pinning with a negative value are
    # admin-only).
    max_num_ctx: int = _opt(32768, minimum=0, maximum=10**7)
    keep_alive: float = _opt(1800.0, kind="duration", minimum=0, maximum=7 * 86400)
    # Per-model caps on calls at once, so one heavy model cannot take every
    # slot: {model: {max_connections: N}} (an alias names its target).
    model_limits: typing.Mapping[str, ModelLimitConfig] = _opt({})
    # Which principals may use which models: a principal matching rules may
    # use the union of their models; one matching none, every model.
    model_access: typing.Tuple[ModelAccessConfig, ...] = _opt([])


@dataclass(frozen=True)
class StorageConfig:
    backend: str = _opt("sqlite", choices=("sqlite", "postgresql"))
    path: str = _opt("var/clawdbot.sqlite3")
    dsn: typing.Optional[str] = _opt(None, secret=True)


@dataclass(frozen=True)
class HistoryConfig:
    max_sessions_per_user: int = _opt(1000, minimum=1, maximum=10**7)
    max_messages_per_session: int = _opt(2000, minimum=2, maximum=10**7)
    max_message_chars: int = _opt(100_000, minimum=1, maximum=10**8)
    context_messages: int = _opt(100, minimum=0, maximum=10**6)
    # Stored bytes (UTF-8 message text): per owner in total (429
    # QUOTA_EXCEEDED), and what one request may add (413).
    max_bytes_per_user: int = _opt(200 * 1000**2, kind="size", minimum=1, maximum=10**13)
    max_bytes_per_request: int = _opt(2 * 1000**2, kind="size", minimum=1, maximum=10**11)
    # Stored images go back to the model with the last this many user turns
    # of a session's context (older turns as text only); 0 never re-sends them.
    image_turns: int = _opt(4, minimum=0, maximum=1000)


@dataclass(frozen=True)
class AccessLogConfig:
    sample_rate: float = _opt(0.01, minimum=0.0, maximum=1.0)
    path: str = _opt("-")


@dataclass(frozen=True)
class AuditLogConfig:
    # A JSON line per audited event (clawdbot.ops.audit): a file, "-" for
    # stdout, or null for no file; reopened on SIGUSR1 like the access log.
    path: typing.Optional[str] = _opt(None)
    # Also kept in the history database, for GET /v1/admin/audit (the admin
    # page), for this long.
    store: bool = _opt(True)
    retention: float = _opt(400 * 86400.0, kind="duration", minimum=86400, maximum=20 * 365 * 86400)


@dataclass(frozen=True)
class FairShareConfig:
    # The backend's slots are shared by principal (clawdbot.backend.ollama.Slots);
    # a principal's weight is the largest of its scopes' and teams' here (default 1).
    weights: typing.Mapping[str, float] = _opt({})


@dataclass(frozen=True)
class LimitsConfig:
    max_body: int = _opt(20 * 1000**2, kind="size", minimum=1024, maximum=1000**3)
    max_queue: int = _opt(100, minimum=0, maximum=100000)
    queue_timeout: float = _opt(30.0, kind="duration", minimum=0, maximum=3600)
    # The request line and headers must arrive whole within this (slowloris).
    header_timeout: float = _opt(10.0, kind="duration", minimum=0.5, maximum=300)
    # The body must arrive whole within this, counted from the end of the
    # headers (a body trickled byte by byte); else 408 and the connection closes.
    body_timeout: float = _opt(120.0, kind="duration", minimum=0.5, maximum=3600)
    # Backend slots a principal may hold at once (0: no cap); its further calls wait.
    per_user_concurrency: int = _opt(0, minimum=0, maximum=100000)
    fair_share: FairShareConfig = _section(FairShareConfig)


_IMAGE_FORMATS = ("png", "jpeg", "gif", "webp", "bmp")


@dataclass(frozen=True)
class ImagesConfig:
    # Images in chat requests (clawdbot.backend.images).  max_pixels stays below
    # Pillow's own decompression-bomb threshold (about 89.5 megapixels).
    max_bytes: int = _opt(10 * 1000**2, kind="size", minimum=1024, maximum=100 * 1000**2)
    max_pixels: int = _opt(40_000_000, minimum=1, maximum=80_000_000)
    max_side: int = _opt(1568, minimum=16, maximum=8192)
    format: str = _opt("jpeg", choices=("jpeg", "png", "webp"))
    quality: int = _opt(85, minimum=1, maximum=95)
    allowed_formats: typing.Tuple[str, ...] = _opt(list(_IMAGE_FORMATS), items=_IMAGE_FORMATS)
    # Per request, checked before anything is decoded: how many images, and
    # their declared sizes (width x height) added up.
    max_per_request: int = _opt(8, minimum=0, maximum=1000)
    max_total_pixels: int = _opt(80_000_000, minimum=1, maximum=10**10)
    # The decoding threads (never the reactor) and each request's deadline
    # for its image work, waiting for a thread included.
    workers: int = _opt(2, minimum=1, maximum=32)
    timeout: float = _opt(10.0, kind="duration", minimum=0.001, maximum=3600)


@dataclass(frozen=True)
class JWTConfig:
    enabled: bool = _opt(True)
    secret: typing.Optional[str] = _opt(None, secret=True)
    issuer: typing.Optional[str] = _opt(None)
    audience: typing.Optional[str] = _opt(None)
    algorithms: typing.Tuple[str, ...] = _opt(["HS256"], items=("HS256", "RS256"))
    leeway: float = _opt(30.0, kind="duration", maximum=600)
    jwks_url: typing.Optional[str] = _opt(None)
    public_key_file: typing.Optional[str] = _opt(None)


@dataclass(frozen=True)
class DevPrincipalConfig:
    sub: str = _opt("dev")
    scope: str = _opt("chat:read chat:write admin")
    name: typing.Optional[str] = _opt(None)
    email: typing.Optional[str] = _opt(None)
    teams: typing.Tuple[str, ...] = _opt([])


@dataclass(frozen=True)
class APIKeysConfig:
    # Personal API keys (clawdbot.auth.keys): created by signed-in users,
    # stored as HMAC-SHA256 hashes under `secret` (else a key derived from
    # auth.jwt.secret; set it so rotating that secret keeps the keys).
    enabled: bool = _opt(True)
    secret: typing.Optional[str] = _opt(None, secret=True)
    default_ttl: float = _opt(90 * 86400.0, kind="duration", minimum=60, maximum=10 * 365 * 86400)
    max_ttl: float = _opt(365 * 86400.0, kind="duration", minimum=60, maximum=10 * 365 * 86400)
    # Keys one user may hold at once (revoked and expired ones do not count).
    max_per_user: int = _opt(50, minimum=1, maximum=10000)
    # A key works only while its owner has signed in (or presented a token)
    # within this: someone who left and never comes back loses their keys
    # too (0: keys never wait for their owner).
    owner_idle: float = _opt(30 * 86400.0, kind="duration", minimum=0, maximum=10 * 365 * 86400)


@dataclass(frozen=True)
class AuthConfig:
    jwt: JWTConfig = _section(JWTConfig)
    dev_principal: DevPrincipalConfig = _section(DevPrincipalConfig)
    api_keys: APIKeysConfig = _section(APIKeysConfig)


@dataclass(frozen=True)
class OAuth2Config:
    enabled: bool = _opt(False)
    provider: str = _opt("oidc", choices=("oidc", "wecom", "dingtalk", "feishu"))
    client_id: typing.Optional[str] = _opt(None)
    client_secret: typing.Optional[str] = _opt(None, secret=True)
    redirect_uri: typing.Optional[str] = _opt(None)
    issuer_url: typing.Optional[str] = _opt(None)
    scopes: typing.Tuple[str, ...] = _opt(["openid", "profile", "email"])
    group_scopes: typing.Mapping[str, typing.Tuple[str, ...]] = _opt({})
    default_scopes: typing.Tuple[str, ...] = _opt(["chat:read", "chat:write"])
    groups_claim: str = _opt("groups")
    allowed_email_domains: typing.Tuple[str, ...] = _opt([])
    session_secret: typing.Optional[str] = _opt(None, secret=True)
    session_ttl: float = _opt(600.0, kind="duration", minimum=30, maximum=86400)
    refresh_ttl: float = _opt(43200.0, kind="duration", minimum=60, maximum=90 * 86400)
    post_logout_redirect_uri: typing.Optional[str] = _opt(None)
    agent_id: typing.Optional[str] = _opt(None)
    endpoints: typing.Mapping[str, str] = _opt({})


@dataclass(frozen=True)
class RateRuleConfig:
    # None: the top-level budget applies.
    requests_per_minute: typing.Optional[int] = _opt(None, minimum=0, maximum=10**9)
    tokens_per_minute: typing.Optional[int] = _opt(None, minimum=0, maximum=10**12)


@dataclass(frozen=True)
class RateLimitConfig:
    requests_per_minute: int = _opt(60, minimum=0, maximum=10**9)
    tokens_per_minute: int = _opt(0, minimum=0, maximum=10**12)
    per_scope: typing.Mapping[str, RateRuleConfig] = _opt({})
    per_team: typing.Mapping[str, RateRuleConfig] = _opt({})
    auth_per_ip_per_minute: int = _opt(30, minimum=0, maximum=10**9)
    # Where the buckets live: this process, or Redis shared by several gateways.
    backend: str = _opt("memory", choices=("memory", "redis"))
    url: str = _opt("redis://127.0.0.1:6379/0", secret=True)
    key_prefix: str = _opt("clawdbot:rl:")
    on_backend_error: str = _opt("open", choices=("open", "closed"))
    # backend memory: how many buckets this process keeps, per principal and
    # per client address, in two separate stores (see ratelimit.BucketStore).
    max_buckets: int = _opt(100_000, minimum=100, maximum=10**8)
    max_address_buckets: int = _opt(100_000, minimum=100, maximum=10**8)


@dataclass(frozen=True)
class UsageConfig:
    # Usage accounting (clawdbot.storage.usage, clawdbot.ops.quotas): per hour in the history
    # database, written in batches every flush_interval, kept for retention.
    flush_interval: float = _opt(5.0, kind="duration", minimum=0.1, maximum=60)
    retention: float = _opt(400 * 86400.0, kind="duration", minimum=86400, maximum=20 * 365 * 86400)
    # Where a day, a week (from Monday) and a month begin, for /v1/usage and
    # quotas: an IANA time zone name.
    timezone: str = _opt("UTC")


@dataclass(frozen=True)
class ResponsesConfig:
    # The Responses API's stored responses (store: true; previous_response_id):
    # kept this long in the history database; a conversation (a chain of
    # them) at most max_stored_bytes of JSON.
    retention: float = _opt(30 * 86400.0, kind="duration", minimum=3600, maximum=10 * 365 * 86400)
    max_stored_bytes: int = _opt(20 * 1000**2, kind="size", minimum=1024, maximum=10**10)
    # Everything one user's stored responses may take (429 QUOTA_EXCEEDED beyond).
    max_bytes_per_user: int = _opt(200 * 1000**2, kind="size", minimum=1024, maximum=10**13)


@dataclass(frozen=True)
class QuotaRuleConfig:
    # 0: none.  At the top level: each user's own allowance.
    tokens_per_day: int = _opt(0, minimum=0, maximum=10**15)
    requests_per_day: int = _opt(0, minimum=0, maximum=10**12)
    tokens_per_week: int = _opt(0, minimum=0, maximum=10**15)
    requests_per_week: int = _opt(0, minimum=0, maximum=10**12)
    tokens_per_month: int = _opt(0, minimum=0, maximum=10**15)
    requests_per_month: int = _opt(0, minimum=0, maximum=10**12)


@dataclass(frozen=True)
class QuotasConfig(QuotaRuleConfig):
    # The numbers of QuotaRuleConfig: each user's allowance
    # (clawdbot.ops.quotas); per_scope replaces it for users holding a scope
    # (the most generous match wins); per_team is a team's shared
    # allowance; per_key applies to each API key.
    per_team: typing.Mapping[str, QuotaRuleConfig] = _opt({})
    per_scope: typing.Mapping[str, QuotaRuleConfig] = _opt({})
    per_key: QuotaRuleConfig = _section(QuotaRuleConfig)
    # Log and count what would be refused, refusing nothing (for rollout).
    shadow: bool = _opt(False)


@dataclass(frozen=True)
class MetricsConfig:
    listen: typing.Optional[str] = _opt(None)


@dataclass(frozen=True)
class TracingConfig:
    # OpenTelemetry traces (clawdbot.ops.tracing), sent by OTLP over HTTP
    # (protobuf) to endpoint, the collector's full traces URL.
    enabled: bool = _opt(False)
    endpoint: str = _opt("http://collector:4318/v1/traces")
    # The share of new traces recorded; a client's traceparent decides for its own.
    sample_rate: float = _opt(1.0, minimum=0.0, maximum=1.0)
    service_name: str = _opt("clawdbot")
    # Sent to the collector with every export (its credentials): secrets.
    headers: typing.Mapping[str, str] = _opt({}, secret=True)
    # Message content in spans (redacted as the access log redacts).
    capture_content: bool = _opt(False)
    # Ended spans waiting for export at most; more are dropped (and counted).
    queue: int = _opt(2048, minimum=1, maximum=1_000_000)


@dataclass(frozen=True)
class LogConfig:
    level: str = _opt("info", choices=("debug", "info", "warn", "error"))
    path: str = _opt("-")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = _section(ServerConfig)
    backend: BackendConfig = _section(BackendConfig)
    storage: StorageConfig = _section(StorageConfig)
    history: HistoryConfig = _section(HistoryConfig)
    access_log: AccessLogConfig = _section(AccessLogConfig)
    audit_log: AuditLogConfig = _section(AuditLogConfig)
    limits: LimitsConfig = _section(LimitsConfig)
    images: ImagesConfig = _section(ImagesConfig)
    auth: AuthConfig = _section(AuthConfig)
    oauth2: OAuth2Config = _section(OAuth2Config)
    rate_limit: RateLimitConfig = _section(RateLimitConfig)
    usage: UsageConfig = _section(UsageConfig)
    quotas: QuotasConfig = _section(QuotasConfig)
    responses: ResponsesConfig = _section(ResponsesConfig)
    metrics: MetricsConfig = _section(MetricsConfig)
    tracing: TracingConfig = _section(TracingConfig)
    log: LogConfig = _section(LogConfig)
    timeout: float = _opt(120.0, kind="duration", minimum=0.001, maximum=86400)
    max_connections: int = _opt(10, minimum=1, maximum=100000)
    env_file: typing.Optional[str] = _opt(None)
    # Where the file came from, for messages; not a config key.
    source: typing.Optional[str] = field(default=None, compare=False, metadata=dict(internal=True))
    warnings: typing.Tuple[str, ...] = field(default=(), compare=False, metadata=dict(internal=True))

    @property
    def dev(self):
        return self.server.mode == "dev"


# --- environment substitution -------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute(text, environ, path="", empty=None):
    """
    Replace C{${VAR}} and C{${VAR:-default}} in one string value; C{$$} is a
    literal C{$}.  As in the shell, C{:-} also takes the default when the
    variable is set but empty.

    @param empty: if given, a list that receives the names of variables used
        without a default that are set but empty.
    @raise ConfigError: naming C{path} and the variable when one without a
        default is unset.
    """

    def replace(match):
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if default is not None:
            return value if value else default
        if value is None:
            raise ConfigError(path, f"environment variable {name} is not set")
        if value == "" and empty is not None:
            empty.append(name)
        return value

    return _VAR.sub(replace, text)


def _substitute_tree(node, environ, path, empties):
    if isinstance(node, str):
        found = []
        result = substitute(node, environ, path, found)
        if found:
            empties[path] = found
        return result
    if isinstance(node, dict):
        return {k: _substitute_tree(v, environ, _join(path, k), empties) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute_tree(v, environ, f"{path}[{i}]", empties) for i, v in enumerate(node)]
    return node


def _join(path, key):
    if not isinstance(key, str):
        key = f"<{_describe(key)}>"  # refused later; str() of a huge number fails
    return f"{path}.{key}" if path else key


# --- the schema walker --------------------------------------------------------


def _describe(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _scalar(value, tp, meta, path):
    kind = meta.get("kind")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, f"{value!r} is not a finite number")
    try:
        if kind == "duration":
            value = parse_duration(value)
        elif kind == "size":
            value = parse_size(value)
        elif kind == "origin" and isinstance(value, str):
            value = web_origin(value)
        elif kind == "network" and isinstance(value, str):
            value = ip_network_text(value)
    except ValueError as e:
        raise ConfigError(path, _reason(e)) from None
    except (ArithmeticError, TypeError):
        raise ConfigError(path, f"is not a {kind} this gateway can use") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, f"is not a {kind or 'number'} this gateway can use")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_describe(value)}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected a whole number, got {_describe(value)}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {_describe(value)}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {_describe(value)}")
        _check_text(value, path)
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(path, f"{value!r} is not allowed (choose from {', '.join(choices)})")
    low, high = meta.get("minimum"), meta.get("maximum")
    if low is not None and value < low:
        raise ConfigError(path, f"{_show(value, kind)} is below the minimum {_show(low, kind)}")
    if high is not None and value > high:
        raise ConfigError(path, f"{_show(value, kind)} is above the maximum {_show(high, kind)}")
    return value


def _show(value, kind):
    if kind == "duration":
        return format_duration(value)
    if kind == "size":
        return format_size(value)
    if isinstance(value, int) and abs(value) > 10**30:
        return "a number that large"
    return repr(value)


def _check_text(text, path):
    """
    Refuse a string holding a lone UTF-16 surrogate (YAML's C{"\\ud800"}
    escape, or an environment value that is not UTF-8): it cannot be
    printed, logged or sent in a header.
    """
    if any("\ud800" <= char <= "\udfff" for char in text):
        raise ConfigError(path, "contains a lone UTF-16 surrogate (write the character itself, or a \\U escape)")


def _build(tp, value, meta, path):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X], or a string or a section (backend.urls)
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) > 1:
            section = next(a for a in options if dataclasses.is_dataclass(a))
            if isinstance(value, dict):
                return _build_section(section, value, path)
            if not isinstance(value, str):
                raise ConfigError(path, f"expected a string or a mapping, got {_describe(value)}")
            return _scalar(value, str, meta, path)
        return _build(options[0], value, meta, path)
    if dataclasses.is_dataclass(tp):
        return _build_section(tp, value, path)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {_describe(value)}")
        allowed = meta.get("items")
        out = []
        for i, item in enumerate(value):
            item_path = f"{path}[{i}]"
            item = _build(args[0], item, {"kind": meta.get("kind")}, item_path)
            if allowed and item not in allowed:
                raise ConfigError(item_path, f"{item!r} is not allowed (choose from {', '.join(allowed)})")
            if allowed and item in out:
                # A choice listed twice is a slip (a second entry meant to be another).
                raise ConfigError(item_path, f"{item!r} is listed already")
            out.append(item)
        return tuple(out)
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_describe(value)}")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(path, f"every key must be a string, got {_describe(key)}")
            _check_text(key, path)
            out[key] = _build(args[1], item, {}, _join(path, key))
        return types.MappingProxyType(out)
    return _scalar(value, tp, meta, path)


def _build_section(cls, value, path):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(path or None, f"expected a mapping, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(path or None, f"every key must be a string, got {_describe(key)}")
        if key not in known:
            _check_text(key, path or None)
            raise ConfigError(_join(path, key), "unknown key")
    kwargs = {}
    for name, f in known.items():
        if name in value:
            kwargs[name] = _build(hints[name], value[name], f.metadata, _join(path, name))
    return cls(**kwargs)


# --- cross-field rules --------------------------------------------------------

def _check_listen(path, description, loopback_only=False, warnings=None):
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "unix", "ssl") and not is_decimal(kind):
        raise ConfigError(path, f"{description!r} is not a supported listen description (use tcp:PORT[:interface=ADDR])")
    if kind == "ssl":
        # TLS is the secure listener's alone: the loopback ones stay plain.
        if loopback_only:
            raise ConfigError(path, "cannot be ssl: (TLS is offered on server.listen only); use tcp:PORT:interface=127.0.0.1")
        try:
            # The files too: a key or certificate that cannot be used stops
            # start-up, and a reload keeps the certificate in use.
            found = check_tls(description)
        except TLSConfigError as e:
            raise ConfigError(path, str(e)) from None
        if warnings is not None:
            warnings.extend(f"{path}: {warning}" for warning in found)
    if kind in ("tcp", "tcp6", "ssl") or is_decimal(kind):
        port = strport_port(description)
        if port is None or not 0 <= port <= 65535:
            raise ConfigError(path, f"{description!r} has no valid port")
    if loopback_only and kind != "unix" and not is_loopback(strport_interface(description)):
        raise ConfigError(path, "must bind a loopback address (add :interface=127.0.0.1)")


def _validate(config, empties):
    warnings = []
    for path, names in empties.items():
        if _is_secret_path(path):
            raise ConfigError(path, f"environment variable {names[0]} is set but empty")
    for path, value in _secrets(config):
        if value == "":
            raise ConfigError(path, "is empty")

    _check_listen("server.listen", config.server.listen, warnings=warnings)
    _check_listen("server.debug_listen", config.server.debug_listen, loopback_only=True)
    if config.metrics.listen:
        _check_listen("metrics.listen", config.metrics.listen, loopback_only=True)

    jwt = config.auth.jwt
    production = config.server.mode == "production"
    if jwt.enabled:
        if "HS256" in jwt.algorithms:
            if not jwt.secret:
                raise ConfigError("auth.jwt.secret", "is required when HS256 is allowed")
            if jwt.secret in PLACEHOLDER_SECRETS:
                if production:
                    raise ConfigError("auth.jwt.secret", "is the example placeholder; set a real secret (for example from JWT_SECRET)")
                warnings.append("auth.jwt.secret is the example placeholder: anyone can mint tokens; never use it outside dev mode")
            elif len(jwt.secret.encode("utf-8")) < MIN_SECRET_BYTES:
                if production:
                    raise ConfigError("auth.jwt.secret", f"must be at least {MIN_SECRET_BYTES} bytes in production mode")
                warnings.append(f"auth.jwt.secret is shorter than {MIN_SECRET_BYTES} bytes")
        if "RS256" in jwt.algorithms and not (jwt.jwks_url or jwt.public_key_file or config.oauth2.issuer_url):
            raise ConfigError("auth.jwt.algorithms", "RS256 needs auth.jwt.jwks_url, auth.jwt.public_key_file or oauth2.issuer_url")
        if not jwt.issuer:
            raise ConfigError("auth.jwt.issuer", "is required when JWT authentication is enabled")
        if not jwt.audience:
            raise ConfigError("auth.jwt.audience", "is required when JWT authentication is enabled")
        if not jwt.algorithms:
            raise ConfigError("auth.jwt.algorithms", "must name at least one algorithm")

    oauth = config.oauth2
    if oauth.enabled:
        for key in ("client_id", "client_secret", "redirect_uri"):
            if not getattr(oauth, key):
                raise ConfigError(f"oauth2.{key}", "is required when oauth2 is enabled")
        if oauth.provider == "oidc" and not oauth.issuer_url:
            raise ConfigError("oauth2.issuer_url", "is required for provider oidc")
        _validate_oauth2(config, production, warnings)

    _validate_scopes(config)
    _validate_tracing(config.tracing)

    urls = [("backend.url", config.backend.url)]
    seen = set()
    for i, entry in enumerate(config.backend.urls):
        path = f"backend.urls[{i}]"
        if isinstance(entry, BackendURLConfig):
            if entry.url is None:
                raise ConfigError(f"{path}.url", "is required")
            _check_headers(f"{path}.headers", entry.headers, _OWN_HEADERS)
            if entry.tls is not None and not entry.url.lower().startswith("https:"):
                raise ConfigError(f"{path}.tls", "is for an https:// backend")
            urls.append((f"{path}.url", entry.url))
        else:
            urls.append((path, entry))
        # (A backend's state and settings are found by its URL.)
        url = urls[-1][1]
        if url in seen:
            raise ConfigError(urls[-1][0], "names a backend listed already")
        seen.add(url)
    _check_headers("backend.headers", config.backend.headers, _OWN_HEADERS)
    for path, url in urls:
        if not re.match(r"^https?://[^/\s]+", url):
            raise ConfigError(path, "must be an http:// or https:// URL")
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 (raises for a port that is not one)
        except ValueError:
            raise ConfigError(path, "must be a URL with a valid host and port") from None
        if not parts.hostname:
            raise ConfigError(path, "must be a URL with a valid host and port")
        if "%" in parts.hostname:
            raise ConfigError(path, "has " + _ZONE_ID)
        if parts.scheme.lower() == "https":
            # The name TLS sends and checks the certificate against, as
            # Twisted encodes it (a plain http:// host, a docker-compose
            # service name with an underscore, is only looked up).
            if not parts.hostname.isascii():
                raise ConfigError(path, "has an international host name: write it in its ASCII form (xn--...)")
            try:
                tls_host_name(parts.hostname)
            except ValueError as e:
                raise ConfigError(path, f"the host of an https:// backend {e}") from None
            if _numeric_name(parts.hostname):
                raise ConfigError(path, f"the host of an https:// backend {_NUMERIC_NAME}")
    _cleartext_headers(config, warnings)
    for alias, target in config.backend.aliases.items():
        if not target:
            raise ConfigError(f"backend.aliases.{alias}", "must name a model")
    if not re.match(r"^(rediss?://[^/\s]*|unix:///?[^\s]+)", config.rate_limit.url):
        raise ConfigError("rate_limit.url", "must be a redis://, rediss:// or unix:// URL")
    for i, rule in enumerate(config.backend.model_access):
        if (rule.team is None) == (rule.scope is None):
            raise ConfigError(f"backend.model_access[{i}]", "must name either a team or a scope")
        if not rule.models:
            raise ConfigError(f"backend.model_access[{i}].models", "must list at least one model (or \"*\")")
    if not config.server.ready_requires:
        warnings.append("server.ready_requires is empty: /readyz answers 200 whatever the backend, storage and rate-limit store say (only a drain makes it 503)")
    for i, network in enumerate(config.server.trusted_proxies):
        if network in ("0.0.0.0/0", "::/0"):
            warnings.append(f"server.trusted_proxies[{i}] ({network}) trusts every client to name its own address")
    keys = config.auth.api_keys
    if keys.default_ttl > keys.max_ttl:
        raise ConfigError("auth.api_keys.default_ttl", "must not be longer than auth.api_keys.max_ttl")
    if keys.enabled and not keys.secret and not jwt.secret:
        warnings.append("auth.api_keys is enabled but has no secret (auth.api_keys.secret, or auth.jwt.secret to derive one): API keys are off")
    if keys.secret is not None and len(keys.secret.encode("utf-8")) < MIN_SECRET_BYTES:
        if production:
            raise ConfigError("auth.api_keys.secret", f"must be at least {MIN_SECRET_BYTES} bytes in production mode")
        warnings.append(f"auth.api_keys.secret is shorter than {MIN_SECRET_BYTES} bytes")
    try:
        zone_of(config.usage.timezone)
    except ValueError:
        raise ConfigError("usage.timezone", "must be an IANA time zone name such as UTC or Asia/Shanghai") from None
    for name, weight in config.limits.fair_share.weights.items():
        if not 0.01 <= weight <= 100:
            raise ConfigError(f"limits.fair_share.weights.{name}", "must be between 0.01 and 100")
    return tuple(warnings)


# The first path segments the gateway's own routes use: the callback path of
# oauth2.redirect_uri must not shadow them.
_RESERVED_SEGMENTS = {"v1", "ollama", "static", "healthz", "readyz", "metrics"}
_RESERVED_AUTH = {"login", "refresh", "logout"}
_CALLBACK_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")


def _validate_scopes(config):
    """Configured scopes obey RFC 6749's scope-token grammar, as a token's must (clawdbot.auth.identity)."""
    try:
        split_scopes(config.auth.dev_principal.scope)
    except ValueError:
        raise ConfigError("auth.dev_principal.scope", "must be scopes separated by spaces, each of RFC 6749 scope characters only") from None
    listed = [(f"oauth2.default_scopes[{i}]", s) for i, s in enumerate(config.oauth2.default_scopes)]
    for group, scopes in config.oauth2.group_scopes.items():
        listed += [(f"oauth2.group_scopes.{group}[{i}]", s) for i, s in enumerate(scopes)]
    for path, scope in listed:
        if not is_scope_token(scope):
            raise ConfigError(path, f"{scope!r} is not one scope (RFC 6749 scope characters only, no spaces)")


# An HTTP header's name (RFC 9110 token).
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _validate_tracing(tracing):
    if _http_url("tracing.endpoint", tracing.endpoint).query:
        # (check-config prints the endpoint: credentials belong in tracing.headers, which it masks.)
        raise ConfigError("tracing.endpoint", "must not have a query string; put the collector's credentials in tracing.headers")
    if not tracing.service_name.strip():
        raise ConfigError("tracing.service_name", "is empty")
    _check_headers("tracing.headers", tracing.headers)


# Headers the gateway itself writes on a backend call (framing, the hop, its
# body's type, the trace context): backend.headers may not set them.
_OWN_HEADERS = frozenset(
    ("host", "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect", "content-type", "traceparent", "tracestate")
)


# The longest value backend.headers and tracing.headers may give a header.
MAX_HEADER_VALUE = 8 * 1024


def _check_headers(path, headers, refused=frozenset()):
    """
    Each of C{headers} (name -> value) is one an HTTP/1.1 request can
    carry, its value at most L{MAX_HEADER_VALUE} characters; names in
    C{refused} (lower case) are not allowed.  A value (a secret) is never
    part of the error.
    """
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise ConfigError(_join(path, name), "is not an HTTP header name")
        if name.lower() in refused:
            raise ConfigError(_join(path, name), "is a header the gateway sets itself (framing, the connection, the body's type or the trace context)")
        if len(value) > MAX_HEADER_VALUE:
            raise ConfigError(_join(path, name), f"is longer than {MAX_HEADER_VALUE // 1024} KiB (a header value the servers on the way would refuse)")
        # What an HTTP/1.1 header value can carry: printable Latin-1, no surrounding space.
        if value != value.strip(" \t") or not all(" " <= c <= "~" or "\xa0" <= c <= "\xff" or c == "\t" for c in value):
            raise ConfigError(_join(path, name), "is not a value an HTTP header can carry (printable Latin-1, no surrounding spaces)")


def _cleartext_headers(config, warnings):
    """
    A warning for each http:// backend off this machine that gets
    C{backend.headers} (or its own): those secrets cross the network in
    clear text.
    """
    for i, entry in enumerate(config.backend.urls or (config.backend.url,)):
        own = entry.headers if isinstance(entry, BackendURLConfig) else {}
        url = entry.url if isinstance(entry, BackendURLConfig) else entry
        path = "backend.url" if not config.backend.urls else f"backend.urls[{i}].url" if own is not None and isinstance(entry, BackendURLConfig) else f"backend.urls[{i}]"
        if not (config.backend.headers or own) or not url.lower().startswith("http:"):
            continue
        if not is_loopback(urllib.parse.urlsplit(url).hostname):
            warnings.append(f"{path}: backend headers are sent to this http:// backend in clear text over the network; use https:// to keep them secret")


def _http_url(path, value):
    """The parsed C{value}, which must be an absolute http(s) URL without a fragment."""
    try:
        parts = urllib.parse.urlsplit(value)
        ok = parts.scheme in ("http", "https") and parts.hostname and not (parts.fragment or parts.username or parts.password)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(path, "must be an absolute http:// or https:// URL (no fragment, no credentials)")
    return parts


def _validate_oauth2(config, production, warnings):
    """The single sign-on keys, once oauth2 is enabled (see clawdbot.http.sso)."""
    oauth = config.oauth2
    redirect = _http_url("oauth2.redirect_uri", oauth.redirect_uri)
    if production and redirect.scheme != "https" and not is_loopback(redirect.hostname):
        raise ConfigError("oauth2.redirect_uri", "must use https in production mode (plain http only on loopback)")
    path = redirect.path
    if not _CALLBACK_PATH.match(path):
        raise ConfigError("oauth2.redirect_uri", f"path {path!r} must be a plain path such as /callback (no trailing slash)")
    segments = path.strip("/").split("/")
    if segments[0] in _RESERVED_SEGMENTS or (segments[0] == "auth" and len(segments) > 1 and segments[1] in _RESERVED_AUTH):
        raise ConfigError("oauth2.redirect_uri", f"path {path!r} is one of the gateway's own routes")
    if config.server.public_url:
        public = _http_url("server.public_url", config.server.public_url)
        if public.path not in ("", "/") or public.query:
            raise ConfigError("server.public_url", "must be an origin such as https://chat.example.com")
    if oauth.post_logout_redirect_uri:
        _http_url("oauth2.post_logout_redirect_uri", oauth.post_logout_redirect_uri)

    if oauth.provider == "oidc":
        _http_url("oauth2.issuer_url", oauth.issuer_url)
        if "openid" not in oauth.scopes:
            raise ConfigError("oauth2.scopes", "must include openid for provider oidc")
        if oauth.endpoints:
            raise ConfigError("oauth2.endpoints", "is for the wecom, dingtalk and feishu presets; oidc discovers its endpoints")
    else:
        known = PRESET_ENDPOINTS[oauth.provider]
        for name, url in oauth.endpoints.items():
            if name not in known:
                raise ConfigError(f"oauth2.endpoints.{name}", f"unknown endpoint for {oauth.provider} (choose from {', '.join(known)})")
            _http_url(f"oauth2.endpoints.{name}", url)
        if oauth.provider == "wecom" and not oauth.agent_id:
            raise ConfigError("oauth2.agent_id", "is required for provider wecom (the AgentId of the self-built app)")
    for i, domain in enumerate(oauth.allowed_email_domains):
        if not domain or "@" in domain or domain != domain.strip():
            raise ConfigError(f"oauth2.allowed_email_domains[{i}]", f"{domain!r} is not a domain name")

    secret = oauth.session_secret
    if secret is None:
        if not config.auth.jwt.secret:
            raise ConfigError("oauth2.session_secret", "is required when auth.jwt.secret is not set (it signs session tokens and cookies)")
    elif secret in PLACEHOLDER_SECRETS:
        if production:
            raise ConfigError("oauth2.session_secret", "is the example placeholder; set a real secret")
        warnings.append("oauth2.session_secret is the example placeholder: anyone can forge sessions; never use it outside dev mode")
    elif len(secret.encode("utf-8")) < MIN_SECRET_BYTES:
        if production:
            raise ConfigError("oauth2.session_secret", f"must be at least {MIN_SECRET_BYTES} bytes in production mode")
        warnings.append(f"oauth2.session_secret is shorter than {MIN_SECRET_BYTES} bytes")

    if config.auth.jwt.enabled and session_issuer(config) == config.auth.jwt.issuer:
        raise ConfigError("auth.jwt.issuer", "must differ from the gateway's own session issuer (server.public_url or the origin of oauth2.redirect_uri)")


def _backend_tls(config):
    """
    The config with every TLS setting of the backends read from its files
    (L{TLSMaterial}), and the warnings about them.

    @raise ConfigError: naming the key whose file cannot be read or used.
    """
    backend = config.backend
    warnings = []
    https = [u for u in backend_url_list(config) if u.lower().startswith("https:")]
    if backend.tls != BackendTLSConfig() and not https:
        warnings.append("backend.tls is set but no backend is an https:// URL: it is not used")
    urls = []
    for i, entry in enumerate(backend.urls):
        if isinstance(entry, BackendURLConfig) and entry.tls is not None:
            entry = dataclasses.replace(entry, tls=_load_tls(f"backend.urls[{i}].tls", entry.tls, warnings))
        urls.append(entry)
    backend = dataclasses.replace(backend, tls=_load_tls("backend.tls", backend.tls, warnings), urls=tuple(urls))
    return dataclasses.replace(config, backend=backend), warnings


def backend_url_list(config):
    """The URL of each backend: C{backend.urls} (strings or objects), or C{backend.url} alone."""
    return tuple(u if isinstance(u, str) else u.url for u in config.backend.urls) or (config.backend.url,)


def _load_tls(path, tls, warnings):
    """C{tls} with its L{TLSMaterial}: the files it names, read and checked."""
    def read(key):
        name = getattr(tls, key)
        try:
            data = read_small_file(name, MAX_FILE_BYTES)
        except OSError as e:
            raise ConfigError(f"{path}.{key}", f"cannot read {name}: {e.strerror or type(e).__name__}") from None
        except FileRefused as e:
            raise ConfigError(f"{path}.{key}", f"{name} {e}; a PEM file is a small regular file") from None
        return name, data

    def certificates(key):
        name, data = read(key)
        try:
            found = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise ConfigError(f"{path}.{key}", f"{name} is not a PEM certificate file (-----BEGIN CERTIFICATE-----) that can be read") from None
        now = datetime.datetime.now(datetime.timezone.utc)
        for cert in found:
            if cert.not_valid_after_utc < now:
                warnings.append(f"{path}.{key}: a certificate in {name} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        return found

    if tls.server_name is not None:
        if "%" in tls.server_name:
            raise ConfigError(f"{path}.server_name", f"{tls.server_name!r} has {_ZONE_ID}")
        if _numeric_name(tls.server_name):
            raise ConfigError(f"{path}.server_name", f"{tls.server_name!r} {_NUMERIC_NAME}")
        if not _is_host_name(tls.server_name):
            raise ConfigError(f"{path}.server_name", f"{tls.server_name!r} is not a host name or an IP address")
        try:
            # (As the TLS client sends and checks it: lower case, no trailing dot.)
            tls = dataclasses.replace(tls, server_name=tls_host_name(tls.server_name))
        except ValueError as e:
            raise ConfigError(f"{path}.server_name", f"{tls.server_name!r} {e}") from None
    if (tls.client_cert is None) != (tls.client_key is None):
        missing = "client_key" if tls.client_key is None else "client_cert"
        raise ConfigError(f"{path}.{missing}", "is required with " + ("client_cert" if missing == "client_key" else "client_key") + " (mutual TLS needs both)")
    pem = serialization.Encoding.PEM
    ca = tuple(c.public_bytes(pem) for c in certificates("ca_file")) if tls.ca_file is not None else ()
    chain, key_pem = (), None
    if tls.client_cert is not None:
        chain = tuple(c.public_bytes(pem) for c in certificates("client_cert"))
        name, data = read("client_key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise ConfigError(f"{path}.client_key", f"{name} is encrypted; give a key without a passphrase") from None
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError(f"{path}.client_key", f"{name} is not a PEM private key that can be read") from None
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        leaf = x509.load_pem_x509_certificate(chain[0])
        if key.public_key().public_bytes(serialization.Encoding.DER, spki) != leaf.public_key().public_bytes(serialization.Encoding.DER, spki):
            raise ConfigError(f"{path}.client_key", f"{name} is not the key of the certificate in {tls.client_cert}")
        key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    digest = hashes.Hash(hashes.SHA256())
    for part in [(tls.server_name or "").encode("utf-8"), *ca, b"--", *chain, b"--", key_pem or b""]:
        digest.update(len(part).to_bytes(4, "big") + part)
    return dataclasses.replace(tls, material=TLSMaterial(ca=ca, client_chain=chain, client_key=key_pem, fingerprint=digest.finalize().hex()))


_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")

# Why a host with an IPv6 zone id (fe80::1%eth0) is refused: the gateway's
# connections do not use one (a call would fail as unreachable), and no
# certificate can name it.
_ZONE_ID = (
    "an IPv6 zone id (%...): the gateway cannot connect to a backend with one, "
    "nor can a certificate name one; use a global or unique-local address, or a host name"
)
# Why a name like 1.2.3 or 0x7f.1 is refused where a certificate is
# checked: resolvers may take it for an IPv4 address, TLS checks it as a
# DNS name, which no certificate can have.
_NUMERIC_NAME = (
    "looks like an IPv4 address but is not one written in full (four decimal numbers, such as 10.0.0.1); "
    "a certificate can never match it as a host name"
)


def _numeric_name(text):
    """Whether C{text} is not an IP address but ends in a numeric label (a decimal or 0x number), as 1.2.3 or 0x7f.1."""
    name = text[:-1] if text.endswith(".") else text
    try:
        ipaddress.ip_address(name)
        return False
    except ValueError:
        pass
    return bool(re.fullmatch(r"[0-9]+|0[xX][0-9A-Fa-f]*", name.rsplit(".", 1)[-1]))


def _is_host_name(text):
    """Whether C{text} is an IP address or a DNS name (international names too)."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    try:
        ascii_name = text.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_name[:-1].split(".") if ascii_name.endswith(".") else ascii_name.split(".")
    return 0 < len(ascii_name) <= 253 and all(_LABEL.match(label) for label in labels)


def _secrets(node, path=""):
    """(path, value) of every secret field."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _secrets(value, _join(path, f.name))
        elif isinstance(value, tuple) and any(dataclasses.is_dataclass(item) for item in value):
            # (Sections in a list, backend.urls: each may hold secrets.)
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from _secrets(item, f"{_join(path, f.name)}[{i}]")
        elif f.metadata.get("secret"):
            if isinstance(value, collections.abc.Mapping):
                # (A mapping of secrets, tracing.headers: each value is one.)
                for key, item in value.items():
                    yield _join(_join(path, f.name), key), item
            else:
                yield _join(path, f.name), value


def _is_secret_path(path):
    node = Config
    for part in re.sub(r"\[\d+\]", "", path).split("."):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        f = fields.get(part)
        if f is None:
            return False
        hint = _section_of(typing.get_type_hints(node)[part])
        if hint is not None:
            node = hint
            continue
        return bool(f.metadata.get("secret"))
    return False


def _section_of(hint):
    """The section a field's type holds: itself, or in an Optional, a union or a list (backend.urls); else C{None}."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, tuple):
        return next((a for a in map(_section_of, typing.get_args(hint)) if a is not None), None)
    return None


# --- reading YAML -------------------------------------------------------------

# A config file is a few kilobytes; anything far bigger is a mistake (or
# /dev/zero), refused before it is parsed.
MAX_FILE_BYTES = 1024 * 1024
# The schema is at most four levels deep; a deeper document is refused
# before the (recursive) composer can run out of stack.
MAX_DEPTH = 32


def _where(mark):
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


class _Loader(yaml.SafeLoader):
    """
    C{yaml.SafeLoader} without anchors and aliases, and with a depth limit.

    Aliases are what make a few hundred bytes expand into billions of nodes
    ("billion laughs") or into a structure that contains itself
    (C{a: &a [*a]}); a config has no use for them, so the composer refuses
    the first anchor or alias it meets, naming its line and column.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(None, f"YAML aliases are not allowed (*{event.anchor}{_where(event.start_mark)})")
        if getattr(event, "anchor", None) is not None:
            raise ConfigError(None, f"YAML anchors and aliases are not allowed (&{event.anchor}{_where(event.start_mark)})")
        if self._depth >= MAX_DEPTH:
            raise ConfigError(None, f"the document is nested more than {MAX_DEPTH} levels deep{_where(event.start_mark)}")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        # YAML says keys are unique; PyYAML silently keeps the last, so a
        # second `issuer:` would quietly replace the first.
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise ConfigError(None, f"the key {key_node.value!r} appears twice in one mapping{_where(key_node.start_mark)}")
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, ArithmeticError, TypeError) as e:
            # A constructor's own error, e.g. a timestamp with month 13 or an
            # integer with more digits than Python converts.
            raise ConfigError(None, f"the value{_where(node.start_mark)} cannot be read ({_reason(e)})") from None


def _load_yaml(text):
    """
    The tree of YAML C{text}.

    @raise ConfigError: for any failure, with its line and column when YAML
        gives one; never another exception.
    """
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or "not valid YAML"
        raise ConfigError(None, f"{problem}{_where(mark)}") from None
    except RecursionError:
        raise ConfigError(None, "the document is nested too deeply") from None
    except Exception as e:
        # A constructor's own error, e.g. a timestamp with month 13 or an
        # integer with more digits than Python converts.
        raise ConfigError(None, f"a value cannot be read ({_reason(e)})") from None
    finally:
        loader.dispose()


def _reason(error):
    """A short, single-line reason from an exception raised by a library."""
    text = str(error).splitlines()[0] if str(error) else ""
    return (text[:120] or type(error).__name__).encode("ascii", "backslashreplace").decode("ascii")


# --- entry points -------------------------------------------------------------


def parse_config(text, environ, source=None, mode=None):
    """
    Build a L{Config} from YAML C{text} and an C{environ} mapping.

    @param mode: C{"dev"} or C{"production"} to override C{server.mode}, as
        the command line's C{--mode} does.
    @raise ConfigError: for anything that is not a valid configuration, and
        for every other failure while reading it (nothing else escapes, so a
        caller reports and counts one kind of error).
    """
    try:
        return _parse_config(text, environ, source, mode)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(None, "the document is nested too deeply") from None
    except Exception as e:
        raise ConfigError(None, f"cannot be loaded ({_reason(e)})") from None


def _parse_config(text, environ, source, mode):
    tree = _load_yaml(text)
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(None, "the file must be a YAML mapping of sections")
    env_file = tree.get("env_file")
    if isinstance(env_file, str) and env_file:
        # Read at every load, so a reload picks up rotated secrets even
        # where the process environment is fixed (systemd).
        environ = dict(environ, **read_env_file(env_file))
    empties = {}
    tree = _substitute_tree(tree, environ, "", empties)
    if mode is not None:
        tree.setdefault("server", {})
        if isinstance(tree["server"], dict):
            tree["server"] = dict(tree["server"], mode=mode)
    config = _build_section(Config, tree, "")
    warnings = _validate(config, empties)
    config, more = _backend_tls(config)
    return dataclasses.replace(config, source=source, warnings=warnings + tuple(more))


def read_env_file(path):
    """
    C{KEY=VALUE} lines (systemd's EnvironmentFile format: C{#} comments,
    optional C{export}, optional matching quotes).

    @raise ConfigError: naming C{env_file} when the file cannot be read or a
        line is not an assignment; values never appear in the message.
    """
    try:
        lines = _read_text(path).splitlines()
    except OSError as e:
        raise ConfigError("env_file", f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    except UnicodeDecodeError:
        raise ConfigError("env_file", f"{path} is not UTF-8 text") from None
    except ValueError as e:
        raise ConfigError("env_file", f"{path}: {e}") from None
    values = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ConfigError("env_file", f"{path} line {number} is not KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def load_config(path, environ, mode=None):
    """Read and parse the file at C{path}; see L{parse_config}."""
    try:
        text = _read_text(path)
    except OSError as e:
        raise ConfigError(None, f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    except UnicodeDecodeError:
        raise ConfigError(None, f"{path} is not UTF-8 text") from None
    except ValueError as e:
        raise ConfigError(None, f"{path}: {e}") from None
    return parse_config(text, environ, source=path, mode=mode)


def _read_text(path):
    """
    The UTF-8 text of the file at C{path}, at most L{MAX_FILE_BYTES}.

    @raise ValueError: when the file is larger (a FIFO or C{/dev/zero} too).
    """
    try:
        data = read_small_file(path, MAX_FILE_BYTES)
    except FileRefused as e:
        raise ValueError(f"{e}; a config file is a small regular file") from None
    return data.decode("utf-8")


_DSN_PASSWORD = re.compile(r"(://[^:/@]*:)([^@]*)(@)")


def effective(config):
    """
    The config as a plain tree with every secret masked and units spelled
    out, for C{check-config}.
    """

    def walk(node):
        out = {}
        for f in dataclasses.fields(node):
            if not f.metadata.get("internal"):
                out[f.name] = render(f.name, getattr(node, f.name), f.metadata)
        return out

    def render(name, value, meta):
        # Sections, and rules inside mappings (rate_limit.per_team.<team>),
        # are dataclasses; lists are tuples and mappings read-only proxies.
        if dataclasses.is_dataclass(value):
            return walk(value)
        if isinstance(value, collections.abc.Mapping):
            if meta.get("secret"):
                return {str(k): MASK for k in value}
            return {str(k): render(k, v, {}) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [render(name, v, {}) for v in value]
        if value is None:
            return None
        if meta.get("secret"):
            if name in ("dsn", "url"):
                value = _DSN_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), value)
                return re.sub(r"(password=)[^\s&]*", r"\1" + MASK, value)
            return MASK
        kind = meta.get("kind")
        if kind == "duration":
            return format_duration(value)
        if kind == "size":
            return format_size(value)
        return value

    return walk(config)


def dump_effective(config):
    return yaml.safe_dump(effective(config), sort_keys=False, allow_unicode=True)


def changed_keys(old, new, prefix=""):
    """
    The dotted names of the keys whose values differ between two configs
    (names only: nothing of a value, secret or not).
    """
    names = []
    for f in dataclasses.fields(old):
        if f.metadata.get("internal"):
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        name = prefix + f.name
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            names.extend(changed_keys(a, b, name + "."))
        elif a != b:
            names.append(name)
    return names


def restart_needed(old, new):
    """
    The keys whose change only a restart applies (listen addresses, storage),
    as a list of paths.
    """
    paths = []
    for path in ("server.listen", "server.debug_listen", "server.mode", "metrics.listen", "storage.backend", "storage.path", "storage.dsn", "rate_limit.backend", "rate_limit.url", "rate_limit.key_prefix", "rate_limit.max_buckets", "rate_limit.max_address_buckets", "log.path", "access_log.path"):
        section, key = path.split(".")
        if getattr(getattr(old, section), key) != getattr(getattr(new, section), key):
            paths.append(path)
    return paths
