"""
Config loading: the seed's snippets, environment substitution, units, and
errors that name their path.
"""

import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from clawdbot.config import (
    PLACEHOLDER_SECRET,
    ConfigError,
    dump_effective,
    load_config,
    parse_config,
    restart_needed,
    substitute,
)
from clawdbot.units import format_duration, format_size, parse_duration, parse_size
from tests.helpers import ROOT, process_env, write_config

GOOD_SECRET = "s" * 32

SEED_JWT = """
auth:
  jwt:
    enabled: true
    secret: "${JWT_SECRET}"
    issuer: "https://sso.example.com"
    audience: "qwen-web-chat"
    algorithms: ["HS256"]
"""

SEED_OAUTH = """
oauth2:
  enabled: true
  provider: "oidc"
  client_id: "qwen-web-chat"
  client_secret: "${OAUTH_CLIENT_SECRET}"
  redirect_uri: "https://chat.example.com/callback"
  issuer_url: "https://sso.example.com"
  scopes: ["openid", "profile", "email"]
timeout: 120s
max_connections: 50
"""

ENV = {"JWT_SECRET": GOOD_SECRET, "OAUTH_CLIENT_SECRET": "client-secret"}


def parse(text, environ=ENV, **kw):
    return parse_config(text, environ, **kw)


def error_of(text, environ=ENV, **kw):
    try:
        parse_config(text, environ, **kw)
    except ConfigError as e:
        return str(e)
    raise AssertionError("no ConfigError")


class SeedTests(SynchronousTestCase):
    def test_seed_snippets_load_verbatim(self):
        """The seed's JWT and OAuth2 snippets, together, load as written."""
        config = parse(SEED_JWT + SEED_OAUTH)
        self.assertEqual(config.auth.jwt.secret, GOOD_SECRET)
        self.assertEqual(config.auth.jwt.algorithms, ("HS256",))
        self.assertEqual(config.oauth2.client_secret, "client-secret")
        self.assertEqual(config.oauth2.scopes, ("openid", "profile", "email"))
        self.assertEqual(config.timeout, 120.0)
        self.assertEqual(config.max_connections, 50)

    def test_spec_keys_load(self):
        """Every key SPEC.md lists beside the seed's loads with its value."""
        config = parse(
            SEED_JWT
            + """
server: {mode: dev, listen: "tcp:8080", debug_listen: "tcp:18789:interface=127.0.0.1"}
backend: {url: "http://127.0.0.1:11434", model: "qwen3:32b"}
storage: {backend: sqlite, path: "var/clawdbot.sqlite3", dsn: "postgresql://127.0.0.1:5432/clawdbot"}
access_log: {sample_rate: 0.01, path: "-"}
limits: {max_body: 20MB}
rate_limit: {requests_per_minute: 60, tokens_per_minute: 0}
metrics: {listen: "tcp:9464:interface=127.0.0.1"}
oauth2:
  group_scopes: {team-a: ["history:team-a"]}
  default_scopes: ["chat:read", "chat:write"]
"""
        )
        self.assertEqual(config.limits.max_body, 20_000_000)
        self.assertEqual(config.oauth2.group_scopes["team-a"], ("history:team-a",))
        self.assertEqual(config.storage.dsn, "postgresql://127.0.0.1:5432/clawdbot")

    def test_example_file_loads(self):
        """etc/clawdbot.yaml loads with an empty environment, in dev mode."""
        config = load_config(os.path.join(ROOT, "etc", "clawdbot.yaml"), {})
        self.assertEqual(config.server.mode, "dev")
        self.assertEqual(config.auth.jwt.secret, PLACEHOLDER_SECRET)
        self.assertTrue(any("placeholder" in w for w in config.warnings))

    def test_example_file_documents_defaults(self):
        """
        The example file states every key with its default: loading it gives
        the same config as the defaults plus its JWT settings.
        """
        example = load_config(os.path.join(ROOT, "etc", "clawdbot.yaml"), {})
        bare = parse(
            f"""
auth:
  jwt: {{secret: "{PLACEHOLDER_SECRET}", issuer: "https://sso.example.com", audience: "qwen-web-chat"}}
""",
            {},
        )
        self.assertEqual(dump_effective(example), dump_effective(bare))

    def test_config_is_frozen(self):
        """The config object cannot be changed in place."""
        config = parse(SEED_JWT)
        with self.assertRaises(Exception):
            config.timeout = 5
        with self.assertRaises(TypeError):
            config.oauth2.group_scopes["x"] = ("y",)


class SubstitutionTests(SynchronousTestCase):
    def test_unset_variable_is_an_error_naming_it(self):
        """An unset ${VAR} without a default stops loading and names the variable and path."""
        message = error_of(SEED_JWT, {})
        self.assertIn("auth.jwt.secret", message)
        self.assertIn("JWT_SECRET", message)

    def test_default_used_when_unset_or_empty(self):
        """${VAR:-default} takes the default when VAR is unset or empty."""
        text = SEED_JWT.replace("${JWT_SECRET}", "${JWT_SECRET:-" + GOOD_SECRET + "}")
        self.assertEqual(parse(text, {}).auth.jwt.secret, GOOD_SECRET)
        self.assertEqual(parse(text, {"JWT_SECRET": ""}).auth.jwt.secret, GOOD_SECRET)
        self.assertEqual(parse(text, {"JWT_SECRET": "t" * 40}).auth.jwt.secret, "t" * 40)

    def test_empty_secret_variable_is_an_error(self):
        """A secret from a variable that is set but empty is refused, naming the variable."""
        message = error_of(SEED_JWT, {"JWT_SECRET": ""})
        self.assertIn("JWT_SECRET", message)
        self.assertIn("empty", message)
        message = error_of(SEED_JWT + SEED_OAUTH, {"JWT_SECRET": GOOD_SECRET, "OAUTH_CLIENT_SECRET": ""})
        self.assertIn("oauth2.client_secret", message)

    def test_env_file_overrides_and_is_reread(self):
        """env_file values override the process environment and are read again at every load (rotation by reload)."""
        env_path = write_config(self, "# secrets\nexport JWT_SECRET='" + "a" * 40 + "'\n")
        path = write_config(self, f"env_file: {env_path}\n" + SEED_JWT)
        self.assertEqual(load_config(path, {"JWT_SECRET": "b" * 40}).auth.jwt.secret, "a" * 40)
        with open(env_path, "w") as f:
            f.write("JWT_SECRET=" + "c" * 40 + "\n")
        self.assertEqual(load_config(path, {}).auth.jwt.secret, "c" * 40)
        with open(env_path, "w") as f:
            f.write("not an assignment\n")
        error = self.assertRaises(ConfigError, load_config, path, {})
        self.assertEqual(error.path, "env_file")

    def test_dollar_escape(self):
        """$$ is a literal dollar sign."""
        self.assertEqual(substitute("a$${B}c", {}), "a${B}c")

    def test_substitution_only_inside_strings(self):
        """A variable in a key or a number position is not expanded into structure."""
        config = parse(SEED_JWT + 'backend: {model: "${MODEL}"}', dict(ENV, MODEL="x: [1, 2]"))
        self.assertEqual(config.backend.model, "x: [1, 2]")

    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40))
    @settings(max_examples=200, deadline=None)
    def test_env_values_never_add_structure(self, value):
        """Whatever an environment value holds (YAML syntax, quotes, newlines) it lands as that one string."""
        config = parse(SEED_JWT + 'backend: {model: "${MODEL:-fallback}"}', dict(ENV, MODEL=value))
        self.assertEqual(config.backend.model, value if value else "fallback")

    @given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True), st.text(max_size=20))
    @settings(max_examples=100, deadline=None)
    def test_substitute_names(self, name, value):
        """${NAME} is replaced by exactly the value, wherever it stands in the string."""
        self.assertEqual(substitute("<${%s}>" % name, {name: value}), f"<{value}>")


class UnitTests(SynchronousTestCase):
    def test_durations(self):
        """Durations take ms, s, m, h, d and bare seconds."""
        self.assertEqual(parse_duration("120s"), 120)
        self.assertEqual(parse_duration("5m"), 300)
        self.assertEqual(parse_duration("250ms"), 0.25)
        self.assertEqual(parse_duration("1h"), 3600)
        self.assertEqual(parse_duration(7), 7)
        for bad in ("5x", "", "-1s", "s", True, None, [1]):
            self.assertRaises(ValueError, parse_duration, bad)

    def test_sizes(self):
        """Sizes take B, KB, MB, GB (decimal) and KiB, MiB, GiB (binary)."""
        self.assertEqual(parse_size("20MB"), 20_000_000)
        self.assertEqual(parse_size("10mb"), 10_000_000)
        self.assertEqual(parse_size("1KiB"), 1024)
        self.assertEqual(parse_size(512), 512)
        for bad in ("20XB", "MB", "-5", True, 1.5):
            self.assertRaises(ValueError, parse_size, bad)

    @given(st.integers(min_value=0, max_value=10**7))
    def test_duration_round_trip(self, seconds):
        """Every whole number of seconds prints in a form that parses back to it."""
        self.assertEqual(parse_duration(format_duration(seconds)), seconds)

    @given(st.integers(min_value=0, max_value=10**13))
    def test_size_round_trip(self, size):
        """Every size prints in a form that parses back to it."""
        self.assertEqual(parse_size(format_size(size)), size)

    @given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h", "d"]))
    def test_duration_units(self, n, unit):
        """N<unit> is N times the unit's length."""
        factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
        self.assertAlmostEqual(parse_duration(f"{n}{unit}"), n * factor)


class ValidationTests(SynchronousTestCase):
    def test_unknown_key(self):
        """Unknown keys are errors naming their path."""
        self.assertEqual(error_of(SEED_JWT + "backend: {modle: x}"), "backend.modle: unknown key")
        self.assertEqual(error_of(SEED_JWT + "bogus: 1"), "bogus: unknown key")

    def test_algorithm_none_named_by_index(self):
        """'none' among the algorithms is refused with the list index, as SPEC.md spells it."""
        message = error_of(SEED_JWT.replace('["HS256"]', '["HS256", "none"]'))
        self.assertTrue(message.startswith("auth.jwt.algorithms[1]: 'none' is not allowed"), message)

    def test_wrong_types(self):
        """Wrong types name the path and what was expected."""
        self.assertIn("max_connections: expected a whole number", error_of(SEED_JWT + "max_connections: many"))
        self.assertIn("auth.jwt.enabled: expected true or false", error_of(SEED_JWT.replace("enabled: true", 'enabled: "yes"')))
        self.assertIn("oauth2.scopes: expected a list", error_of(SEED_JWT + "oauth2: {scopes: openid}"))
        self.assertIn("server: expected a mapping", error_of(SEED_JWT + "server: 5"))
        self.assertIn("timeout: ", error_of(SEED_JWT + "timeout: forever"))
        self.assertIn("limits.max_body: ", error_of(SEED_JWT + "limits: {max_body: lots}"))

    def test_out_of_range(self):
        """Out-of-range values name the path and the bound."""
        self.assertIn("max_connections: 0 is below the minimum 1", error_of(SEED_JWT + "max_connections: 0"))
        self.assertIn("access_log.sample_rate: 1.5 is above", error_of(SEED_JWT + "access_log: {sample_rate: 1.5}"))
        self.assertIn("server.mode: 'staging' is not allowed", error_of(SEED_JWT + "server: {mode: staging}"))

    def test_yaml_syntax_error(self):
        """A YAML syntax error says where."""
        self.assertIn("line", error_of("auth: [\n"))

    def test_yaml_is_safe_loaded(self):
        """Python object tags are refused, not executed."""
        self.assertRaises(ConfigError, parse, SEED_JWT + "timeout: !!python/object/apply:os.getcwd []")

    def test_debug_listen_must_be_loopback(self):
        """A debug listener on a non-loopback address is refused at load."""
        for listen in ("tcp:18789", "tcp:18789:interface=0.0.0.0", "tcp:18789:interface=10.0.0.5"):
            message = error_of(SEED_JWT + f'server: {{debug_listen: "{listen}"}}')
            self.assertIn("server.debug_listen", message)
        for listen in ("tcp:18789:interface=127.0.0.1", "tcp:18789:interface=127.0.0.2", "tcp6:18789:interface=\\:\\:1"):
            parse(SEED_JWT + f"server: {{debug_listen: '{listen}'}}")

    def test_production_refuses_short_and_placeholder_secrets(self):
        """Production mode refuses HS256 secrets under 32 bytes and the example placeholder; dev warns."""
        short = dict(ENV, JWT_SECRET="short")
        placeholder = dict(ENV, JWT_SECRET=PLACEHOLDER_SECRET)
        self.assertIn("at least 32 bytes", error_of(SEED_JWT, short, mode="production"))
        self.assertIn("placeholder", error_of(SEED_JWT, placeholder, mode="production"))
        self.assertIn("placeholder", error_of(SEED_JWT + "server: {mode: production}", placeholder))
        self.assertTrue(parse(SEED_JWT, short).warnings)
        self.assertTrue(parse(SEED_JWT, placeholder).warnings)
        self.assertEqual(parse(SEED_JWT, mode="production").warnings, ())

    def test_mode_override(self):
        """--mode overrides server.mode from the file."""
        self.assertEqual(parse(SEED_JWT + "server: {mode: production}", mode="dev").server.mode, "dev")
        self.assertEqual(parse(SEED_JWT, mode="production").server.mode, "production")

    def test_jwt_requires_issuer_audience_and_keys(self):
        """JWT auth needs an issuer, an audience, and keys for each algorithm."""
        self.assertIn("auth.jwt.issuer", error_of(SEED_JWT.replace('issuer: "https://sso.example.com"', "issuer: null")))
        self.assertIn("auth.jwt.audience", error_of(SEED_JWT.replace('audience: "qwen-web-chat"', "audience: null")))
        self.assertIn("RS256 needs", error_of(SEED_JWT.replace('["HS256"]', '["RS256"]')))
        parse(SEED_JWT.replace('["HS256"]', '["RS256"]') + "  jwks_url: https://sso.example.com/jwks\n".replace("  ", "    ", 1))

    def test_oauth2_requires_client(self):
        """Enabled OAuth2 needs its client id, secret and redirect URI."""
        self.assertIn("oauth2.client_id", error_of(SEED_JWT + "oauth2: {enabled: true}"))

    def test_restart_needed(self):
        """Listen address changes are reported as needing a restart; others are not."""
        a = parse(SEED_JWT)
        b = parse(SEED_JWT + 'server: {listen: "tcp:9090"}\ntimeout: 5s')
        self.assertEqual(restart_needed(a, b), ["server.listen"])


class CheckConfigTests(SynchronousTestCase):
    def run_cli(self, *args, env=None):
        return subprocess.run(
            [sys.executable, "-m", "clawdbot", *args], env=process_env(**(env or {})), capture_output=True, text=True, cwd=ROOT
        )

    def test_check_config_masks_secrets(self):
        """check-config prints the effective config with every secret masked."""
        path = write_config(self, SEED_JWT + SEED_OAUTH + 'storage: {dsn: "postgresql://app:pgpass-canary@db:5432/x"}')
        env = {"JWT_SECRET": "jwt-canary-" + "x" * 30, "OAUTH_CLIENT_SECRET": "oauth-canary"}
        result = self.run_cli("check-config", "--config", path, env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        for canary in ("jwt-canary", "oauth-canary", "pgpass-canary"):
            self.assertNotIn(canary, result.stdout + result.stderr)
        self.assertIn("secret: '********'", result.stdout)
        self.assertIn("timeout: 2m", result.stdout)
        self.assertIn("postgresql://app:********@db:5432/x", result.stdout)

    def test_check_config_reports_errors(self):
        """An invalid config exits non-zero with the path of the problem."""
        path = write_config(self, SEED_JWT)
        result = self.run_cli("check-config", "--config", path, env={"JWT_SECRET": ""})
        self.assertEqual(result.returncode, 2)
        self.assertIn("auth.jwt.secret", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_start_refuses_bad_config_before_binding(self):
        """clawdbot start exits non-zero on an invalid config and opens no port."""
        path = write_config(self, SEED_JWT.replace('["HS256"]', '["none"]') + 'server: {listen: "tcp:0"}')
        result = self.run_cli("start", "--config", path, env={"JWT_SECRET": GOOD_SECRET})
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("auth.jwt.algorithms[0]: 'none' is not allowed", result.stderr)
        self.assertNotIn("listening", result.stdout)


class FirstRunTests(SynchronousTestCase):
    """A newcomer's first commands on the example config (issue 20, items 4): plain words, no library warnings."""

    run_cli = CheckConfigTests.run_cli

    def test_the_example_config_checks_and_mints_quietly(self):
        """check-config says the example file is valid (with its dev-mode warnings counted), and token mints with the example placeholder without PyJWT's key-length warning: it is 32 bytes or more."""
        example = os.path.join(ROOT, "etc", "clawdbot.yaml")
        result = self.run_cli("check-config", "--config", example, env={"JWT_SECRET": ""})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stderr.splitlines()[-1], r"^clawdbot: .*etc/clawdbot\.yaml is valid( \(\d+ warnings? above\))?$")
        self.assertGreaterEqual(len(PLACEHOLDER_SECRET.encode()), 32)
        token = self.run_cli("token", "--config", example, "--sub", "alice", env={"JWT_SECRET": ""})
        self.assertEqual(token.returncode, 0, token.stderr)
        self.assertNotIn("Warning", token.stderr)
        self.assertEqual(token.stdout.count("."), 2)
        short = write_config(self, SEED_JWT)
        quiet = self.run_cli("token", "--config", short, "--sub", "alice", env={"JWT_SECRET": "short-secret"})
        self.assertEqual(quiet.returncode, 0, quiet.stderr)
        self.assertNotIn("InsecureKeyLengthWarning", quiet.stderr)

    def test_the_earlier_placeholder_is_still_refused_in_production(self):
        """Production mode refuses the earlier example placeholder as well as the current one."""
        for placeholder in ("your-32-byte-secret-key-here", PLACEHOLDER_SECRET):
            path = write_config(self, SEED_JWT + 'server: {mode: production}')
            result = self.run_cli("check-config", "--config", path, env={"JWT_SECRET": placeholder})
            self.assertEqual(result.returncode, 2, placeholder)
            self.assertIn("example placeholder", result.stderr)
