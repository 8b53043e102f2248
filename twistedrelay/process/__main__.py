"""Run the master in the foreground without twistd: ``python -m twistedrelay.process``.

For development and the process tests, which choose the worker payload (``--payload``);
operators run ``twistd -n twistedrelay``, whose service is the same MasterService. SIGTERM
and SIGINT stop it as they stop twistd: the reactor stops and MasterService.stopService
drains the workers. It logs to stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from twisted.logger import globalLogBeginner, textFileLogObserver

from twistedrelay.config import ConfigError, load_config
from twistedrelay.process.master import MasterService
from twistedrelay.process.worker import DEFAULT_PAYLOAD


def main(argv: Sequence[str] | None = None) -> int:
    """Run until stopped by a signal.

    :returns: 0 after a clean stop, 2 when the config is unusable.
    :raises SystemExit: with status 2 when a listener cannot be bound.
    """
    parser = argparse.ArgumentParser(prog="python -m twistedrelay.process")
    parser.add_argument("--config", default=None, help="config file (default: embedded)")
    parser.add_argument("--payload", default=DEFAULT_PAYLOAD, help="module:callable")
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    from twisted.internet import reactor

    try:
        config = load_config(args.config)
        master = MasterService(config, args.config, reactor, payload=args.payload)
        master.privilegedStartService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        master.startService()
    except ConfigError as e:
        print(f"twistedrelay: cannot start: {e}", file=sys.stderr)
        return 2
    reactor.addSystemEventTrigger("before", "shutdown", master.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
