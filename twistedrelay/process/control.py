"""The control channel from the master to a worker: one ASCII word per line on its stdin.

Owns the words and their framing, without I/O. The master writes to the pipe that is the
worker's fd 0; the worker decodes what it reads. End of file on that pipe means the master
is gone, which the worker treats as ``drain`` (so a killed master leaves no orphans).

Words:

``reload``
    re-read the config file and apply what can change at run time (routes, limits, TLS
    certificates); a bad file is refused by the worker and its old config kept.
``drain``
    stop accepting, finish or requeue in-flight work, exit 0 (the same as SIGTERM).

Unknown words are reported, not fatal, so an older worker survives a newer master.
"""

from __future__ import annotations

import enum

#: A control line longer than this is garbage, not a command: drop it rather than buffer it.
MAX_LINE_BYTES = 64


class ControlCommand(enum.Enum):
    """A request from the master to a worker."""

    RELOAD = "reload"
    DRAIN = "drain"


def encode_command(command: ControlCommand) -> bytes:
    """The bytes the master writes for ``command``."""
    return command.value.encode("ascii") + b"\n"


class ControlDecoder:
    """Splits the bytes read from the control pipe into commands (chunking does not matter)."""

    def __init__(self) -> None:
        self._buffer = b""
        self.unknown: list[bytes] = []

    def feed(self, data: bytes) -> list[ControlCommand]:
        """Decode the complete lines in ``data`` (plus what was buffered).

        :returns: the commands, in order; unknown lines are appended to ``self.unknown``.
        """
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > MAX_LINE_BYTES:
            self.unknown.append(self._buffer[:MAX_LINE_BYTES])
            self._buffer = b""
        commands = []
        for raw in lines:
            word = raw.strip()
            if not word:
                continue
            try:
                commands.append(ControlCommand(word.decode("ascii")))
            except (UnicodeDecodeError, ValueError):
                self.unknown.append(word[:MAX_LINE_BYTES])
        return commands
