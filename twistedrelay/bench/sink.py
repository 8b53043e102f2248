"""``twistedrelay bench sink``: the command line of the fast SMTP sink.

Owns option parsing, the listening socket, periodic and final JSON stats, and the shutdown on
SIGTERM/SIGINT. The server itself is :mod:`twistedrelay.bench.sink_server`. Like Postfix's
smtp-sink this is a standalone tool: it shares no code with the relay's own ServerSession, so
a bug in the relay's SMTP server cannot hide in the tool that measures it.

Run as ``twistedrelay bench sink --listen 127.0.0.1:2600`` or
``python -m twistedrelay.bench.sink``. It prints ``bench sink: listening on HOST:PORT`` on
stderr once it accepts connections, and its final stats as one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from twistedrelay.bench.behaviour import Faults, SinkBehaviour, Stage
from twistedrelay.bench.sink_server import (
    DEFAULT_MAX_SIZE,
    SinkConfig,
    SinkFactory,
    load_tls_options,
)
from twistedrelay.transport import listen_tcp


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port``.

    :raises ValueError: when there is no port or it is not a number.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    """The ``bench sink`` options."""
    parser = argparse.ArgumentParser(
        prog="twistedrelay bench sink",
        description="A fast SMTP sink that counts what it receives and can inject faults.",
    )
    parser.add_argument("--listen", default="127.0.0.1:2600", help="host:port (port 0: any)")
    parser.add_argument("--hostname", default="sink.example.test")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, help="SIZE, bytes")
    parser.add_argument(
        "--max-connections", type=int, default=0, help="refuse more at once with 421 (0: no cap)"
    )
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument(
        "--check-sequence",
        metavar="HEADER",
        help="count unique/duplicate/missing messages by this header (e.g. X-Sequence)",
    )
    parser.add_argument("--stats-file", type=Path, help="write the JSON stats here")
    parser.add_argument(
        "--report-interval", type=float, default=0.0, help="print JSON stats every N seconds"
    )
    parser.add_argument("--save-dir", type=Path, help="write each message (envelope + content)")
    parser.add_argument("--max-runtime", type=float, default=0.0, help="exit after N seconds")
    faults = parser.add_argument_group("fault injection")
    faults.add_argument("--delay", type=float, default=0.0, help="seconds before each reply")
    faults.add_argument(
        "--delay-stages",
        default="message",
        help="comma list of stages to delay: connect,helo,mail,rcpt,data,message",
    )
    faults.add_argument("--tempfail-ratio", type=float, default=0.0)
    faults.add_argument("--reject-ratio", type=float, default=0.0)
    faults.add_argument(
        "--ratio-per",
        choices=("message", "recipient"),
        default="message",
        help="apply the ratios at the end of DATA (451/554) or to each RCPT (450/550)",
    )
    faults.add_argument("--drop-ratio", type=float, default=0.0, help="hang up mid-DATA")
    faults.add_argument(
        "--tempfail-first", type=int, default=0, help="451 the first N messages, then accept"
    )
    faults.add_argument(
        "--no-address-rules",
        action="store_true",
        help="disable the reject*/tempfail*/drop* local-part rules",
    )
    faults.add_argument("--seed", type=int, help="random seed for the ratios")
    tls = parser.add_argument_group("STARTTLS")
    tls.add_argument("--tls-cert", type=Path, help="PEM chain, leaf first")
    tls.add_argument("--tls-key", type=Path, help="PEM private key")
    parser.add_argument(
        "--no-chunking",
        action="store_true",
        help="do not offer CHUNKING (BDAT), so clients use DATA",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> SinkConfig:
    """A :class:`SinkConfig` from parsed ``bench sink`` options.

    :raises ValueError: on an unknown stage name or an incomplete TLS pair.
    """
    stages = frozenset(Stage(name.strip()) for name in args.delay_stages.split(",") if name)
    faults = Faults(
        delay_seconds=args.delay,
        delay_stages=stages,
        tempfail_ratio=args.tempfail_ratio,
        reject_ratio=args.reject_ratio,
        drop_ratio=args.drop_ratio,
        ratio_stage=Stage.RCPT if args.ratio_per == "recipient" else Stage.MESSAGE,
        tempfail_first=args.tempfail_first,
        address_rules=not args.no_address_rules,
        rng=random.Random(args.seed),
    )
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    tls_options = load_tls_options(args.tls_cert, args.tls_key) if args.tls_cert else None
    if args.save_dir is not None:
        args.save_dir.mkdir(parents=True, exist_ok=True)
    return SinkConfig(
        hostname=args.hostname,
        max_size=args.max_size,
        max_connections=args.max_connections,
        behaviour=SinkBehaviour(faults=faults),
        save_dir=args.save_dir,
        sequence_header=args.check_sequence,
        tls_options=tls_options,
        chunking=not args.no_chunking,
    )


def write_stats_file(path: Path, report: dict[str, Any]) -> None:  # Any: JSON values
    """Replace ``path`` atomically with the JSON report, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report) + "\n")
    tmp.replace(path)


def main(argv: list[str]) -> int:
    """Run the sink until SIGTERM/SIGINT (or ``--max-runtime``); print final JSON stats.

    :returns: the process exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host, port = parse_host_port(args.listen)
        config = config_from_args(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    from twisted.internet import reactor as global_reactor
    from twisted.internet.task import LoopingCall

    # Any: the global reactor is typed as a module, not as the interfaces it provides.
    reactor: Any = global_reactor
    factory = SinkFactory(reactor, config)
    # Writes at once, like the relay's listeners: the sink's CPU is taken from the system
    # under test on a small machine.
    listening = listen_tcp(reactor, port, factory, interface=host, backlog=args.backlog)
    address: Any = listening.getHost()  # an IPv4Address/IPv6Address: host and port
    print(f"bench sink: listening on {address.host}:{address.port}", file=sys.stderr, flush=True)

    def report() -> dict[str, Any]:  # Any: JSON values
        stats = factory.stats.as_dict(reactor.seconds())
        if args.stats_file is not None:
            write_stats_file(args.stats_file, stats)
        return stats

    def periodic() -> None:
        stats = report()
        if args.report_interval:
            print(json.dumps(stats), flush=True)

    if args.report_interval or args.stats_file is not None:
        LoopingCall(periodic).start(args.report_interval or 1.0, now=False)

    def final() -> None:
        print(json.dumps(report()), flush=True)

    # Twisted's reactor turns SIGTERM and SIGINT into a clean shutdown; print on the way out.
    reactor.addSystemEventTrigger("before", "shutdown", final)
    if args.max_runtime:
        reactor.callLater(args.max_runtime, reactor.stop)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
