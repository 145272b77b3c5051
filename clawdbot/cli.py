"""
The C{clawdbot} command: C{start}, C{check-config} and C{token}.
"""

import argparse
import os
import sys

from twisted.application import service
from twisted.python import usage

from clawdbot.auth.tokens import mint
from clawdbot.config import ConfigError, dump_effective, load_config
from clawdbot.logs import start_logging
from clawdbot.ops.signals import SignalHandlers, stop_signals
from clawdbot.tap import ListenError, Options, makeService
from clawdbot.units import parse_duration


def _parser():
    parser = argparse.ArgumentParser(prog="clawdbot", description="An authenticating, OpenAI-compatible gateway in front of Ollama.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    start = sub.add_parser("start", help="run the gateway in the foreground")
    start.add_argument("--config", "-c", required=True, help="the YAML config file")
    start.add_argument("--mode", choices=("dev", "production"), help="overrides server.mode")
    start.add_argument("--no-debug-port", action="store_true", help="never open the debug listener")

    check = sub.add_parser("check-config", help="validate a config and print it with secrets masked")
    check.add_argument("--config", "-c", required=True)
    check.add_argument("--mode", choices=("dev", "production"))

    token = sub.add_parser("token", help="mint a JWT signed with the configured HS256 secret")
    token.add_argument("--config", "-c", required=True)
    token.add_argument("--sub", required=True, help="the subject (user id)")
    token.add_argument("--scope", default="chat:read chat:write", help='space separated, e.g. "chat:read chat:write history:team-a"')
    token.add_argument("--ttl", default="1h", help="lifetime, e.g. 15m, 1h, 7d (default 1h)")
    token.add_argument("--name")
    token.add_argument("--email")
    token.add_argument("--team", action="append", default=[], help="a team the subject belongs to (repeatable)")
    return parser


def _fail(message, code=2):
    print(f"clawdbot: {message}", file=sys.stderr)
    return code


def main(argv=None, environ=None):
    args = _parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    if args.command == "start":
        return _start(args, environ)
    try:
        config = load_config(args.config, environ, mode=getattr(args, "mode", None))
        text = dump_effective(config) if args.command == "check-config" else None
    except ConfigError as e:
        return _fail(f"config error in {args.config}: {e}")
    except Exception as e:  # a bug, not a config mistake: still no traceback, still non-zero
        return _fail(f"config error in {args.config}: cannot be loaded ({type(e).__name__})")
    if args.command == "check-config":
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        sys.stdout.write(text)
        count = len(config.warnings)
        said = f" ({count} warning{'s' if count != 1 else ''} above)" if count else ""
        print(f"clawdbot: {args.config} is valid{said}", file=sys.stderr)
        return 0
    return _token(args, config)


def _token(args, config):
    jwt = config.auth.jwt
    if not jwt.enabled or "HS256" not in jwt.algorithms or not jwt.secret:
        return _fail("auth.jwt must be enabled with HS256 and a secret to mint tokens")
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as e:
        return _fail(f"--ttl: {e}")
    if ttl <= 0:
        return _fail("--ttl must be positive")
    print(mint(jwt.secret, jwt.issuer, jwt.audience, args.sub, args.scope, ttl, name=args.name, email=args.email, teams=args.team or None))
    return 0


def _start(args, environ):
    # The reactor is installed only by the command that runs it.
    from twisted.internet import reactor

    options = Options(environ)
    argv = ["--config", args.config]
    if args.mode:
        argv += ["--mode", args.mode]
    if args.no_debug_port:
        argv.append("--no-debug-port")
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        return _fail(str(e))
    config = options.loaded
    start_logging(config.log.level, config.log.path)
    application = service.Application("clawdbot")
    try:
        # (A store that cannot be used stops it here, as a listener below.)
        top = makeService(options)
        top.setServiceParent(application)
        started = service.IService(application)
        started.privilegedStartService()
        started.startService()
    except ListenError as e:
        return _fail(str(e), code=1)
    reactor.addSystemEventTrigger("before", "shutdown", started.stopService)
    # SIGTERM and SIGINT: a repeated one during the drain is ignored
    # cleanly (installed over the reactor's own, once it runs).
    reactor.callWhenRunning(SignalHandlers(stop_signals(reactor)).startService)
    reactor.run()
    return 0


def run():
    sys.exit(main())
