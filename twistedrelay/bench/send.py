"""``twistedrelay bench send``: the command line of the SMTP load generator.

Owns option parsing, running the reactor for one bounded run, the progress line on stderr
and the final report (human lines, or one JSON object on stdout with ``--json``). The load
itself is :mod:`twistedrelay.bench.load_generator`, the messages
:mod:`twistedrelay.bench.messages`. Like Postfix's smtp-source this is a standalone tool: it
shares no code with the relay's own ClientSession.

Run as ``twistedrelay bench send --target 127.0.0.1:2525 --connections 20 --messages 10000``
or ``python -m twistedrelay.bench.send``. Exit status: 0 when the run completed, 1 when the
hard timeout cut it short or no connection could be made, 2 on bad options.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Any

from twistedrelay.bench.load_generator import LoadGenerator, SendOptions, SendReport
from twistedrelay.bench.messages import MessageBuilder, SizeDistribution
from twistedrelay.bench.sink import parse_host_port


def build_parser() -> argparse.ArgumentParser:
    """The ``bench send`` options."""
    parser = argparse.ArgumentParser(
        prog="twistedrelay bench send",
        description="Send SMTP load to a server and report throughput, latency and errors.",
    )
    parser.add_argument("--target", default="127.0.0.1:2525", help="host:port")
    parser.add_argument("--connections", type=int, default=20, help="sending connections")
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--messages", type=int, help="messages in all (default 1000)")
    bound.add_argument("--duration", type=float, help="seconds to keep sending")
    parser.add_argument(
        "--size", default="1024", help="bytes, or a distribution like 1024:80,32768:20"
    )
    parser.add_argument("--recipients", type=int, default=1, help="recipients per message")
    parser.add_argument("--domains", type=int, default=1, help="recipient domains")
    parser.add_argument(
        "--recipient-template",
        default="rcpt{n}@d{k}.example.test",
        help="{n}: recipient number in the message, {k}: domain number",
    )
    parser.add_argument("--sender", default="bench@example.test")
    parser.add_argument("--helo", default="bench.example.test")
    parser.add_argument(
        "--pipelining",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pipeline MAIL/RCPT/DATA when the server offers PIPELINING",
    )
    parser.add_argument(
        "--chunking",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="send MAIL/RCPT/BDAT LAST in one write when the server offers CHUNKING",
    )
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s in all (0: max)")
    parser.add_argument(
        "--messages-per-connection", type=int, default=0, help="reconnect after N (0: never)"
    )
    parser.add_argument("--hold-idle", type=int, default=0, help="extra idle connections")
    parser.add_argument("--idle-noop-interval", type=float, default=30.0, help="seconds")
    parser.add_argument("--timeout", type=float, default=0.0, help="hard limit, seconds")
    parser.add_argument("--seed", type=int, help="random seed for the size distribution")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


def options_from_args(args: argparse.Namespace) -> tuple[SendOptions, MessageBuilder]:
    """The run's options and message builder from parsed ``bench send`` options.

    :raises ValueError: on a bad target or size distribution.
    """
    host, port = parse_host_port(args.target)
    messages = args.messages if args.messages is not None else (0 if args.duration else 1000)
    options = SendOptions(
        host=host,
        port=port,
        connections=args.connections,
        messages=messages,
        duration_seconds=args.duration or 0.0,
        rate=args.rate,
        pipelining=args.pipelining,
        chunking=args.chunking,
        helo=args.helo,
        messages_per_connection=args.messages_per_connection,
        hold_idle=args.hold_idle,
        idle_noop_seconds=args.idle_noop_interval,
        timeout_seconds=args.timeout,
        progress_seconds=0.0 if args.quiet else 1.0,
    )
    builder = MessageBuilder(
        sender=args.sender,
        recipient_template=args.recipient_template,
        recipients_per_message=args.recipients,
        domains=args.domains,
        sizes=SizeDistribution.parse(args.size),
        run_id=f"{os.getpid()}x{random.getrandbits(32):08x}",
        rng=random.Random(args.seed),
    )
    return options, builder


def format_report(report: dict[str, Any]) -> str:  # Any: LoadGenerator JSON report
    """The report as a few human-readable lines."""
    latency = report["latency_ms"]
    lines = [
        f"target {report['target']}: {report['messages_accepted']} accepted of "
        f"{report['messages_attempted']} in {report['elapsed_seconds']} s "
        f"= {report['messages_per_second']} msg/s over {report['connections']} connections",
        f"latency ms: p50 {latency['p50']} p90 {latency['p90']} p99 {latency['p99']} "
        f"max {latency['max']}",
        f"tempfailed {report['messages_tempfailed']} rejected {report['messages_rejected']} "
        f"failed {report['messages_failed']} errors {report['errors']}",
    ]
    if report["idle"]["requested"]:
        idle = report["idle"]
        lines.append(f"idle: {idle['established']}/{idle['requested']} held, {idle['lost']} lost")
    if report["timed_out"]:
        lines.append("hard timeout: the run was cut short")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run one bounded load and print its report.

    :returns: the process exit status (0 complete, 1 timed out or never connected).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options, builder = options_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    from twisted.internet import reactor as global_reactor

    # Any: the global reactor is typed as a module, not as the interfaces it provides.
    reactor: Any = global_reactor
    results: list[SendReport] = []

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def done(report: SendReport) -> None:
        results.append(report)
        reactor.stop()

    generator = LoadGenerator(reactor, options, builder, progress=None if args.quiet else progress)
    reactor.callWhenRunning(lambda: generator.run().addCallback(done))
    reactor.run()
    if not results:
        print("bench send: interrupted", file=sys.stderr)
        return 1
    report = results[0].as_dict()
    print(json.dumps(report) if args.json else format_report(report), flush=True)
    if report["timed_out"] or report["connections_opened"] == 0:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
