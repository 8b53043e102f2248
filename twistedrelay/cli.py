"""The ``twistedrelay`` admin command: a dispatcher to one function per subcommand.

Each subcommand lives with the part it administers and takes its own argv
(``check-config`` here, ``queue`` in queue/admin.py, ``passwd`` in auth.py, ``plugins`` in
hooks.py, ``bench`` in bench/). Modules are imported only when their subcommand runs, so
``twistedrelay --version`` stays instant.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence

from twistedrelay import __version__
from twistedrelay.config import ConfigError, load_config

USAGE = """\
usage: twistedrelay [--version] COMMAND [ARGS...]

commands:
  check-config FILE            check a relay.toml and exit 0 if it is usable
  queue show|list|hold|release|requeue|delete ...   inspect and manage the queue
  passwd FILE USER             add or change a user of auth.users_file (password on stdin)
  plugins [--config FILE]      list the enabled hook plugins in run order
  bench sink|send ...          the bundled SMTP sink and load generator

The relay itself runs under twistd: twistd -n twistedrelay --config relay.toml
"""

# subcommand -> "module:function"; the function takes the remaining argv, returns an exit code.
SUBCOMMANDS: dict[str, str] = {
    "check-config": "twistedrelay.cli:check_config_main",
    "queue": "twistedrelay.queue.admin:main",
    "passwd": "twistedrelay.auth:passwd_main",
    "plugins": "twistedrelay.hooks:plugins_main",
    "bench sink": "twistedrelay.bench.sink:main",
    "bench send": "twistedrelay.bench.send:main",
}


def check_config_main(argv: Sequence[str]) -> int:
    """``twistedrelay check-config FILE``: load the file as the relay would."""
    if len(argv) != 1:
        print("usage: twistedrelay check-config FILE", file=sys.stderr)
        return 2
    from twistedrelay.app import validate_config  # Twisted and the relay: only when needed

    try:
        config = load_config(argv[0])
        validate_config(config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{config.source}: ok")
    return 0


def _resolve(target: str) -> Callable[[list[str]], int]:
    module_name, _, function_name = target.partition(":")
    function: Callable[[list[str]], int] = getattr(
        importlib.import_module(module_name), function_name
    )
    return function


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``twistedrelay`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        status = _dispatch(args)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
        return status
    except BrokenPipeError:
        # The reader went away (``twistedrelay queue list | head``): stop quietly, and keep
        # the interpreter's last flush from failing the same way (Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _dispatch(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] == "--version":
        print(f"twistedrelay {__version__}")
        return 0
    for words in (2, 1):
        name = " ".join(args[:words])
        if name in SUBCOMMANDS:
            return _resolve(SUBCOMMANDS[name])(args[words:])
    print(f"twistedrelay: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
