"""Command line: ``balancer serve``, ``balancer check-config``, ``balancer route``,
``balancer tune``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from balancer import __version__
from balancer.config import ConfigError, PoolSettings, Settings, as_dict, load
from balancer.discovery import StaticDiscovery
from balancer.errors import BalancerError, StartupError
from balancer.load import LoadReport, report_from
from balancer.logs import configure_logging
from balancer.route import KEYED_PATHS, decide, explain, keyed_view, kind_for
from balancer.router import Router
from balancer.trace import TraceError, load_trace
from balancer.tune import (
    DEFAULT_PODS,
    DEFAULT_SHARED_CHARS,
    Candidate,
    as_json,
    default_candidates,
    render,
    tune,
)

EXIT_CONFIG = 2
"""Exit status when the configuration is invalid or balancer cannot start with it (a port
in use, a kubeconfig that cannot be loaded): one line on stderr says what is wrong."""

# Shortcut flags: flag name → dotted setting.
_SHORTCUTS = {
    "host": "server.host",
    "port": "server.port",
    "admin_port": "server.admin_port",
    "log_level": "server.log_level",
    "log_format": "server.log_format",
    "strategy": "routing.strategy",
    "load_factor": "routing.load_factor",
    "virtual_nodes": "routing.virtual_nodes",
    "key": "routing.key",
    "prefix_chars": "routing.prefix_chars",
    "min_key_chars": "routing.min_key_chars",
}


def _add_file_flags(parser: argparse.ArgumentParser, *, config_required: bool) -> None:
    parser.add_argument("--config", "-c", required=config_required, metavar="FILE",
                        help="YAML configuration file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set routing.load_factor=1.5 "
                             "(repeatable; wins over the file and BALANCER_* variables)")


def _add_key_flags(group: argparse._ActionsContainer) -> None:
    group.add_argument("--key", help="first-user-message or prompt-prefix")
    group.add_argument("--prefix-chars", type=int, help="characters of text in the key")
    group.add_argument("--min-key-chars", type=int,
                       help="a shorter first user message extends the key into the next two "
                            "messages (routing.min_key_chars)")


def _add_config_flags(parser: argparse.ArgumentParser, *, config_required: bool) -> None:
    _add_file_flags(parser, config_required=config_required)
    parser.add_argument("--endpoint", action="append", default=[], metavar="URL",
                        help="add a static endpoint to a pool named 'default' (repeatable)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME",
                        help="model served by the --endpoint pool (repeatable)")
    group = parser.add_argument_group("shortcuts for common settings")
    group.add_argument("--host", help="listen address (server.host)")
    group.add_argument("--port", type=int, help="proxy port (server.port)")
    group.add_argument("--admin-port", type=int, help="admin port (server.admin_port)")
    group.add_argument("--log-level", help="debug, info, warning or error (server.log_level)")
    group.add_argument("--log-format", help="auto, json or text (server.log_format)")
    group.add_argument("--strategy", help="chwbl, least-request, round-robin or random")
    group.add_argument("--load-factor", type=float, help="CHWBL load factor c (>= 1.0)")
    group.add_argument("--virtual-nodes", type=int, help="ring points per endpoint")
    _add_key_flags(group)


def settings_from_args(args: argparse.Namespace, *, require_pools: bool = True) -> Settings:
    overrides: list[tuple[str, Any]] = []
    for item in args.set:
        dotted, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            parsed = yaml.safe_load(value) if value else value
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: "
                              f"{' '.join(str(e).split())}") from None
        overrides.append((dotted.strip(), parsed))
    for flag, dotted in _SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append((dotted, value))
    extra: tuple[PoolSettings, ...] = ()
    if args.endpoint:
        if not args.model:
            raise ConfigError("--endpoint: give the model(s) it serves with --model NAME")
        extra = (PoolSettings("default", tuple(args.model), tuple(args.endpoint)),)
    return load(args.config, overrides=overrides, extra_pools=extra, require_pools=require_pools)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    from balancer.app import serve

    settings = settings_from_args(args)
    configure_logging(settings.server.log_level, settings.server.log_format)
    return uvloop.run(serve(settings))


def cmd_check_config(args: argparse.Namespace) -> int:
    from balancer.outbound import outbounds

    settings = settings_from_args(args)
    outbounds(settings)  # the pools' TLS files load, their headers' values can be had
    sys.stdout.write(yaml.safe_dump(as_dict(settings), sort_keys=False))
    return 0


def explain_route(
    settings: Settings,
    body: dict[str, Any],
    *,
    path: str | None = None,
    session: str | None = None,
    loads: dict[str, int] | None = None,
    reports: dict[str, LoadReport] | None = None,
    walk_limit: int = 8,
) -> dict[str, Any]:
    """Where a request would go, and why: the routing decision the proxy makes, against the
    configuration's static endpoints (with ``loads`` pretended in flight and ``reports``
    pretended just received from the endpoints), sending nothing."""
    router = Router(settings)
    router.apply(StaticDiscovery(settings.pools).snapshot())
    view = keyed_view(kind_for(body, path), body, session)
    model = view.model or ""
    route = router.routes.get(model)
    pools = ([router.pools[name] for name in route.pools()] if route is not None
             else [router.pool_for_model(model)])
    for pool in pools:  # endpoint ids are the pool's own; others are ignored
        if loads:
            pool.assume_load(loads)
        for endpoint_id, report in (reports or {}).items():
            pool.assume_report(endpoint_id, report)
    return explain(decide(view, router), walk_limit, view)


def cmd_route(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        with open(args.request, encoding="utf-8") as f:
            body = json.load(f)
    except (OSError, ValueError) as e:
        print(f"error: cannot read request {args.request}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if not isinstance(body, dict):
        print(f"error: {args.request} must hold a JSON object", file=sys.stderr)
        return EXIT_CONFIG
    if args.path and args.path not in KEYED_PATHS:
        raise ConfigError(f"--path: {args.path!r} is not one of {', '.join(KEYED_PATHS)}")
    loads: dict[str, int] = {}
    for item in args.load:
        endpoint_id, _, count = item.rpartition("=")
        if not endpoint_id or not (count.isascii() and count.isdigit()):
            print(f"error: --load {item!r}: expected ENDPOINT=N with N >= 0", file=sys.stderr)
            return EXIT_CONFIG
        loads[endpoint_id] = int(count)
    reports: dict[str, LoadReport] = {}
    for item in args.report:
        parsed = _parse_report(item)
        if parsed is None:
            print(f"error: --report {item!r}: expected ENDPOINT=WAITING or "
                  "ENDPOINT=WAITING,KV with WAITING >= 0 and KV in 0..1", file=sys.stderr)
            return EXIT_CONFIG
        reports[parsed[0]] = parsed[1]
    try:
        result = explain_route(settings, body, path=args.path, session=args.session,
                               loads=loads, reports=reports)
    except BalancerError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    routed = result.get("route")
    if routed is not None:
        fell = routed["fallback_reason"]
        print(f"served by: pool {routed['pool']} as {routed['served_model']!r} (route "
              f"{routed['model']!r}: {' > '.join(routed['chain'])}"
              + (f"; earlier pools passed over: {fell})" if fell else ")"))
    print(f"pool:      {result['pool']} (strategy {result['strategy']})")
    print(f"key:       {_shown(result['key'])} ({result['key_source']})")
    print(f"key from:  {result['key_from']}")
    print(f"key hash:  {result['key_hash']}")
    unit = "queued" if result["signal"] == "queue" else "in-flight"
    print(f"bound:     {result['bound']} {unit} requests per endpoint")
    print("ring walk:")
    for i, step in enumerate(result["ring_walk"], 1):
        mark = "  <- chosen" if step["endpoint"] == result["endpoint"] else ""
        print(f"  {i}. {step['endpoint']} ({_load_text(step)}){mark}")
    print(f"endpoint:  {result['endpoint']} {result['url']}")
    print(f"route:     {result['outcome']}: {result['reason']}")
    zone = result.get("zone")
    if zone is not None:
        where = "local" if zone["local"] else "remote"
        print(f"zone:      {zone['zone']} ({where}): {zone['reason']}")
        spill = zone.get("spill")
        if spill is not None:
            print(f"           zone spill: {spill['share']:.0%} of the zone's keys leave it "
                  f"(zone's share of the work {spill['work_share']:.0%})")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, require_pools=False)
    if args.pods < 1:
        raise ConfigError(f"--pods: {args.pods} must be >= 1")
    if args.shared_chars < 1:
        raise ConfigError(f"--shared-chars: {args.shared_chars} must be >= 1")
    try:
        records = load_trace(args.trace)
    except TraceError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (OSError, UnicodeDecodeError) as e:
        print(f"error: cannot read trace {args.trace}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if not records:
        print(f"error: {args.trace} holds no requests", file=sys.stderr)
        return EXIT_CONFIG
    current = Candidate.from_settings(settings.routing)
    report = tune(records, default_candidates(current), current,
                  pods=args.pods, shared_chars=args.shared_chars)
    if args.json:
        print(json.dumps(as_json(report), indent=2))
    else:
        sys.stdout.write(render(report))
    return 0


def _shown(key: str, head: int = 80, tail: int = 20) -> str:
    """A key for a terminal: a long one as its start and end with its length between."""
    if len(key) <= head + tail + 20:
        return repr(key)
    return f"{key[:head]!r} ... {key[-tail:]!r} ({len(key)} characters)"


def _parse_report(item: str) -> tuple[str, LoadReport] | None:
    """``ENDPOINT=WAITING[,KV]`` from ``--report``; None when malformed."""
    endpoint_id, _, figures = item.rpartition("=")
    waiting, _, kv = figures.partition(",")
    try:
        metrics = {"num_requests_waiting": float(waiting)}
        if kv:
            metrics["kv_cache_usage_perc"] = float(kv)
    except ValueError:
        return None
    report, bad = report_from(metrics)
    if not endpoint_id or bad:
        return None
    return endpoint_id, report


def _load_text(step: dict[str, Any]) -> str:
    text = f"in flight {step['in_flight']}"
    report = step.get("report")
    if report is not None:
        text += f", queue {step['queue_estimate']:g} (reported {report['waiting']:g}"
        if report["kv_usage"] is not None:
            text += f", KV {report['kv_usage']:.0%}"
        text += f", {report['age_s']:g} s ago)"
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balancer",
        description="KV-cache-aware load balancer for OpenAI-compatible LLM servers.",
    )
    parser.add_argument("--version", action="version", version=f"balancer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    _add_config_flags(serve, config_required=False)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a configuration and print it")
    check.add_argument("file", metavar="FILE", help="YAML configuration file")
    _add_config_flags(check, config_required=False)
    check.set_defaults(func=cmd_check_config)

    route = sub.add_parser("route", help="show where a request would be routed, and why")
    _add_config_flags(route, config_required=True)
    route.add_argument("request", metavar="REQUEST.json", help="an OpenAI request body")
    route.add_argument("--path", help="API path (default: guessed from the body)")
    route.add_argument("--session", help="value of the session header")
    route.add_argument("--load", action="append", default=[], metavar="ENDPOINT=N",
                       help="pretend ENDPOINT has N requests in flight (repeatable)")
    route.add_argument("--report", action="append", default=[], metavar="ENDPOINT=WAITING[,KV]",
                       help="pretend ENDPOINT just reported WAITING queued requests and KV-cache "
                            "use KV (0-1) (repeatable)")
    route.add_argument("--json", action="store_true", help="print JSON")
    route.set_defaults(func=cmd_route)

    tuner = sub.add_parser(
        "tune", help="measure how well each routing-key setting separates a trace's "
                     "conversations, and recommend one")
    tuner.add_argument("--trace", required=True, metavar="FILE",
                       help="JSONL trace: the harness's format or OpenAI request bodies with "
                            "an optional conversation_id (format: balancer/trace.py)")
    _add_file_flags(tuner, config_required=False)
    _add_key_flags(tuner.add_argument_group("the current key setting (else the file's)"))
    tuner.add_argument("--pods", type=int, default=DEFAULT_PODS,
                       help=f"pods serving the model: a key's fair share of requests is 1/pods "
                            f"({DEFAULT_PODS})")
    tuner.add_argument("--shared-chars", type=int, default=DEFAULT_SHARED_CHARS, metavar="N",
                       help="leading characters that conversations' first user messages must "
                            "share to count as one shared document, meant to stay grouped "
                            f"({DEFAULT_SHARED_CHARS})")
    tuner.add_argument("--json", action="store_true", help="print JSON")
    tuner.set_defaults(func=cmd_tune, endpoint=[], model=[])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check-config":
        args.config = args.file
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"configuration error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_CONFIG


def _one_line(message: str) -> str:
    """A message as one line on stderr (a YAML parser's spans several)."""
    return " ".join(message.split())
