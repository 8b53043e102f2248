"""The mail log: one Postfix-like line per mail event, carrying the queue ID.

Owns the wording of the mail log, so ``grep QUEUEID`` tells one message's story: ``queued``
(from, size, nrcpt), one ``to=<…>, relay=…, delay=…, dsn=…, status=…`` line per recipient
and attempt, the DSN it caused, ``removed``. Connections and rejections before a queue ID
exists are logged with the client address (``NOQUEUE: reject: …``, as Postfix does).

Lines go through Twisted's logger in the namespace ``twistedrelay.mail``, so they land in
twistd's log. Each event also carries its fields (``mail_event``, ``queue_id`` and
``mail_fields``) for structured output: with ``[log] format = "json"`` the app installs
:func:`json_lines_observer` (see :func:`configure_twistd_logger`) and every log event becomes
one JSON object per line, for log shippers.

Invariant: every value is sanitised before it reaches a line. Client and remote-server text
(addresses, HELO names, reply texts) never puts a CR, LF or other control character into the
log, so one event is always exactly one line.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import IO, Any, cast

from twisted.logger import (
    ILogObserver,
    InvalidLogLevelError,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from zope.interface import implementer

from twistedrelay.smtp.replies import Reply

NAMESPACE = "twistedrelay.mail"
MAIL_LINE_FORMAT = "{mail_line}"
"""The log_format of every mail log event; its text is the event's ``mail_line``."""
NOQUEUE = "NOQUEUE"

# C0 controls, DEL and C1 controls (NEL, …) could start a forged log line or hide text.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MAX_VALUE_LENGTH = 1000

# Delivery statuses as Postfix writes them; the outcome names (DESIGN) map onto them.
_STATUS = {"sent": "sent", "delivered": "sent", "deferred": "deferred", "bounced": "bounced"}


def sanitize(value: object) -> str:
    """``value`` as text fit for one log line: control characters become "?", long text is cut.

    :param value: anything; client-supplied strings in particular.
    """
    text = _CONTROL.sub("?", str(value))
    if len(text) > _MAX_VALUE_LENGTH:
        return text[:_MAX_VALUE_LENGTH] + "..."
    return text


def format_relay(host: str, address: str, port: int) -> str:
    """The ``relay=`` value: ``mx.example.net[192.0.2.1]:25`` (Postfix's form)."""
    return f"{host}[{address}]:{port}"


def format_client(address: str, port: int | None = None) -> str:
    """A client as ``[192.0.2.7]`` or ``[192.0.2.7]:40123`` (no reverse DNS: it costs a query)."""
    return f"[{address}]" if port is None else f"[{address}]:{port}"


class MailLog:
    """Writes the mail log; one method per event.

    :param logger: where events go; ``Logger(namespace="twistedrelay.mail")`` by default.
        Tests pass a logger with their own observer to capture events without I/O.
    """

    def __init__(self, logger: Logger | None = None) -> None:
        self._log = logger if logger is not None else Logger(namespace=NAMESPACE)

    def _emit(self, event: str, queue_id: str | None, line: str, **fields: Any) -> None:
        clean = {k: sanitize(v) if isinstance(v, str) else v for k, v in fields.items()}
        # The event Logger.info would build, handed straight to its observer: Logger.emit's
        # check of the level against every LogLevel cost more than the rest (3 per message).
        log = self._log
        log.observer(
            {
                "log_logger": log,
                "log_level": LogLevel.info,
                "log_namespace": log.namespace,
                "log_source": log.source,
                "log_format": MAIL_LINE_FORMAT,
                "log_time": time.time(),
                "mail_line": line if queue_id is None else f"{sanitize(queue_id)}: {line}",
                "mail_event": event,
                "queue_id": queue_id,
                "mail_fields": clean,
            }
        )

    # -- sessions --------------------------------------------------------------------------

    def connect(self, client_address: str, client_port: int, listener: str) -> None:
        """An inbound session started: ``connect from [ip]:port listener=smtp``."""
        client = format_client(sanitize(client_address), client_port)
        self._emit(
            "connect",
            None,
            f"connect from {client} listener={sanitize(listener)}",
            client_address=client_address,
            client_port=client_port,
            listener=listener,
        )

    def disconnect(self, client_address: str, stats: str) -> None:
        """An inbound session ended; ``stats`` like ``ehlo=1 mail=1 rcpt=1 data=1 quit=1``."""
        client = format_client(sanitize(client_address))
        self._emit(
            "disconnect",
            None,
            f"disconnect from {client} {sanitize(stats)}".rstrip(),
            client_address=client_address,
            stats=stats,
        )

    def rejected(
        self,
        stage: str,
        client_address: str,
        reply: Reply | str,
        sender: str | None = None,
        recipient: str | None = None,
        helo: str | None = None,
        detail: str = "",
    ) -> None:
        """A command was refused before anything was queued (4xx or 5xx).

        ``NOQUEUE: reject: RCPT from [ip]: 554 5.7.1 Relay access denied; from=<s> to=<r>``

        :param stage: the SMTP verb refused ("CONNECT", "HELO", "MAIL", "RCPT", "DATA", …).
        :param detail: who decided and why, appended as is (e.g. a hook plugin's name and
            results: ``plugin=rate_limit results=(rate_limit:limit reached …)``).
        """
        text = f"reject: {sanitize(stage).upper()} from {format_client(sanitize(client_address))}"
        text += f": {sanitize(reply)}"
        extras = []
        if sender is not None:
            extras.append(f"from=<{sanitize(sender)}>")
        if recipient is not None:
            extras.append(f"to=<{sanitize(recipient)}>")
        if helo is not None:
            extras.append(f"helo=<{sanitize(helo)}>")
        if detail:
            extras.append(sanitize(detail))
        if extras:
            text += "; " + " ".join(extras)
        self._emit(
            "reject",
            NOQUEUE,
            text,
            stage=stage,
            client_address=client_address,
            reply=str(reply),
            sender=sender,
            recipient=recipient,
            helo=helo,
            detail=detail,
        )

    # -- one message -----------------------------------------------------------------------

    def queued(
        self,
        queue_id: str,
        sender: str,
        size: int,
        recipients_count: int,
        client_address: str,
        client_port: int | None = None,
    ) -> None:
        """A message was durably queued (the 250 after DATA).

        ``QUEUEID: client=[ip]:port, from=<sender>, size=1234, nrcpt=1 (queue active)``; the
        client matches the session's ``connect from`` line.
        """
        client = format_client(sanitize(client_address), client_port)
        self._emit(
            "queued",
            queue_id,
            f"client={client}, from=<{sanitize(sender)}>, "
            f"size={size}, nrcpt={recipients_count} (queue active)",
            client_address=client_address,
            client_port=client_port,
            sender=sender,
            size=size,
            nrcpt=recipients_count,
        )

    def delivery(
        self,
        queue_id: str,
        recipient: str,
        relay: str,
        delay_seconds: float,
        dsn: str,
        status: str,
        reply_text: str,
        tls: str | None = None,
    ) -> None:
        """One recipient's attempt ended.

        ``QUEUEID: to=<r>, relay=mx[ip]:25, delay=0.42, dsn=2.0.0, status=sent (250 2.0.0 Ok)``

        :param relay: :func:`format_relay` of the mail host, or "none" when none was reached.
        :param delay_seconds: time since the message arrived.
        :param status: "sent" (or the outcome name "delivered"), "deferred" or "bounced".
        :param reply_text: the remote reply, or why there was none ("connect timed out").
        :param tls: what TLS the connection used (``ClientTLSOptions.log_value``), e.g.
            "TLSv1.3 verified", "TLSv1.3 not verified" or "none"; None leaves it out (no
            connection was made).
        :raises ValueError: an unknown status.
        """
        word = _STATUS.get(status)
        if word is None:
            raise ValueError(f"status={status!r} is not one of sent, deferred, bounced")
        tls_part = f", tls={sanitize(tls)}" if tls else ""
        self._emit(
            "delivery",
            queue_id,
            f"to=<{sanitize(recipient)}>, relay={sanitize(relay)}, delay={delay_seconds:.2f}, "
            f"dsn={sanitize(dsn)}{tls_part}, status={word} ({sanitize(reply_text)})",
            recipient=recipient,
            relay=relay,
            delay=round(delay_seconds, 3),
            dsn=dsn,
            status=word,
            reply=reply_text,
            tls=tls,
        )

    def bounce_created(self, queue_id: str, dsn_queue_id: str) -> None:
        """A DSN to the sender was queued: ``QUEUEID: sender non-delivery notification: DSNID``."""
        self._emit(
            "bounce",
            queue_id,
            f"sender non-delivery notification: {sanitize(dsn_queue_id)}",
            dsn_queue_id=dsn_queue_id,
        )

    def expired(self, queue_id: str, sender: str, age_seconds: float) -> None:
        """The message outlived ``maximal_queue_lifetime``; its recipients are bounced."""
        self._emit(
            "expired",
            queue_id,
            f"from=<{sanitize(sender)}>, status=expired, returned to sender "
            f"(age={age_seconds:.0f}s)",
            sender=sender,
            age=round(age_seconds, 3),
        )

    def held(self, queue_id: str, reason: str) -> None:
        """The message was put on hold: ``QUEUEID: hold: reason``."""
        self._emit("hold", queue_id, f"hold: {sanitize(reason)}", reason=reason)

    def released(self, queue_id: str, reason: str) -> None:
        """The message left hold: ``QUEUEID: released from hold: reason``."""
        self._emit("release", queue_id, f"released from hold: {sanitize(reason)}", reason=reason)

    def auth(self, client_address: str, username: str, ok: bool) -> None:
        """A login on submission: ``auth ok|failed from [ip] user=NAME`` (never the password)."""
        outcome = "ok" if ok else "failed"
        self._emit(
            "auth",
            None,
            f"auth {outcome} from {format_client(sanitize(client_address))} "
            f"user={sanitize(username)}",
            client_address=client_address,
            username=username,
            ok=ok,
        )

    def removed(self, queue_id: str) -> None:
        """The message left the queue for good: ``QUEUEID: removed``."""
        self._emit("removed", queue_id, "removed")


# -- JSON lines ------------------------------------------------------------------------------


def format_json_line(event: MutableMapping[str, Any]) -> str | None:
    """One log event as one JSON object and a newline.

    Mail events carry ``event``, ``queue_id`` and their fields; every event carries
    ``time`` (ISO 8601, UTC), ``level``, ``namespace`` and ``text`` (the formatted message);
    events a worker logged and the master relayed carry ``worker`` (its slot).
    """
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0.0), UTC).isoformat(),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", ""),
    }
    if "mail_event" in event:
        record["event"] = event["mail_event"]
        record["queue_id"] = event["queue_id"]
        record.update(event.get("mail_fields", {}))
    if "worker" in event:
        record["worker"] = event["worker"]
    record["text"] = formatEvent(dict(event))
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def json_lines_observer(out: IO[str]) -> ILogObserver:
    """An observer writing every log event as one JSON line to ``out``."""
    return BatchFileLogObserver(out, format_json_line)


# -- relaying worker lines in batches ----------------------------------------------------------

#: Key of a log event carrying other, complete log events (a read's worth of worker lines the
#: master relays): :class:`BatchFileLogObserver` writes each as its own line, all at once.
RELAYED_EVENTS = "relayed_events"
#: Key of a relayed event's text as it is, formatted without twisted's format-string parsing.
RELAYED_TEXT = "relayed_text"


@implementer(ILogObserver)
class BatchFileLogObserver:
    """Writes each log event as text to a file, like ``twisted.logger.FileLogObserver``.

    twistd's observer formats, writes and flushes once per event. The master relays every
    line its workers log (three per message), so that cost about 10 % of the relay's CPU.
    An event carrying :data:`RELAYED_EVENTS` (one per read from a worker's pipe) is written
    here as one line per relayed event, in one write and one flush: still one line per event
    in the file, but one observer call per batch.

    :param out: the file (a ``LogFile``, rotated by size, or standard output).
    :param format_event: one event as its text line(s) with the newline, or None to skip it.
    """

    def __init__(self, out: IO[str], format_event: Callable[[LogEvent], str | None]) -> None:
        self._out = out
        self._format = format_event

    def __call__(self, event: LogEvent) -> None:
        """Write ``event``, or the events it relays, then flush once."""
        relayed: Sequence[LogEvent] | None = event.get(RELAYED_EVENTS)
        if relayed is None:
            text = self._format(event)
        else:
            text = "".join([line for line in map(self._format, relayed) if line])
        if text:
            self._out.write(text)
            self._out.flush()


class ClassicTextFormatter:
    """twistd's text line format (``TIME [namespace#level] text``), cheaper for relayed lines.

    Events with :data:`RELAYED_TEXT` are formatted without twisted's format-string parsing,
    and the timestamp (one-second resolution) is formatted once per second; every other event
    goes through ``formatEventAsClassicLogText`` as twistd's own observer does.
    """

    def __init__(self) -> None:
        self._second = math.nan
        self._stamp = "-"

    def __call__(self, event: LogEvent) -> str | None:
        """The line of ``event`` with its newline (None: nothing to write)."""
        text = event.get(RELAYED_TEXT)
        if text is None:
            return formatEventAsClassicLogText(event, formatTime=self._format_time)
        level = event.get("log_level")
        system = event.get("log_system") or (
            f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        )
        return f"{self._format_time(event.get('log_time'))} [{system}] {text}\n"

    def _format_time(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = math.floor(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(when)
        return self._stamp


def relayed_json_event(line: str, **extra: Any) -> LogEvent | None:
    """The log event a worker wrote as a JSON line with :func:`format_json_line`, rebuilt.

    :param extra: fields to add, e.g. ``worker=slot``.
    :returns: the event (logged now, at its level and namespace), or None when ``line`` is
        not such a JSON object (the caller logs it as text).
    """
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        return None
    try:
        level = LogLevel.levelWithName(str(record.get("level", "info")))
    except InvalidLogLevelError:
        level = LogLevel.info
    event: LogEvent = {
        "log_format": MAIL_LINE_FORMAT,
        "log_level": level,
        "log_namespace": str(record.get("namespace") or NAMESPACE),
        "log_time": time.time(),
        "mail_line": record["text"],
        **extra,
    }
    if "event" in record and "queue_id" in record:
        known = {"time", "level", "namespace", "text", "event", "queue_id"}
        event["mail_event"] = record["event"]
        event["queue_id"] = record["queue_id"]
        event["mail_fields"] = {k: v for k, v in record.items() if k not in known}
    return event


def reemit_json_line(line: str, observer: ILogObserver | None = None, **extra: Any) -> bool:
    """Log again, with its structure, an event a worker wrote with :func:`format_json_line`.

    Workers log to their standard output and the master re-logs each line. In JSON mode this
    keeps a worker's mail events structured in the master's output (same namespace, level,
    ``event``, ``queue_id`` and fields) instead of nesting them as text.

    :param observer: where to log; the global log publisher by default.
    :param extra: fields to add, e.g. ``worker=slot``.
    :returns: False when ``line`` is not such a JSON object (the caller logs it as text).
    """
    event = relayed_json_event(line, **extra)
    if event is None:
        return False
    fields = {k: v for k, v in event.items() if not k.startswith("log_")}
    logger = Logger(namespace=event["log_namespace"], observer=observer)
    logger.emit(event["log_level"], MAIL_LINE_FORMAT, **fields)
    return True


# twistd's ``--logger`` is the dotted name of a zero-argument observer factory, imported by
# twistd's own postOptions (after the plugin's), so a callable placed there is refused. The
# options twistd was given reach the factories below through this mapping; "installed" says
# that one of them made the master's observer (so it understands RELAYED_EVENTS).
_twistd_log: dict[str, Any] = {"path": None, "nodaemon": True, "installed": False}


def _twistd_output() -> IO[str]:
    """Where twistd would log: ``--logfile`` (a size-rotated ``LogFile``) or standard output.

    As twistd's own observer does, SIGUSR1 rotates the file (unless a handler is set).
    """
    path = _twistd_log["path"]
    if path == "-" or (not path and _twistd_log["nodaemon"]):
        return sys.stdout
    import signal

    from twisted.python.logfile import LogFile

    log_file = LogFile.fromFullPath(path or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    # twisted.python.logfile is unannotated; LogFile has the write and flush used here.
    return cast(IO[str], log_file)


def twistd_json_observer() -> ILogObserver:
    """The ``--logger`` factory twistd calls for JSON lines; writes where twistd would."""
    _twistd_log["installed"] = True
    return json_lines_observer(_twistd_output())


def twistd_text_observer() -> ILogObserver:
    """The ``--logger`` factory for twistd's text lines, relaying worker lines in batches."""
    _twistd_log["installed"] = True
    return BatchFileLogObserver(_twistd_output(), ClassicTextFormatter())


def relayed_batches_observed() -> bool:
    """Whether the process's log observer writes :data:`RELAYED_EVENTS` (else log per line)."""
    return bool(_twistd_log["installed"])


def configure_twistd_logger(server_options: MutableMapping[str, Any], log_format: str) -> None:
    """Make twistd start its log with this module's observer (text or JSON lines).

    twistd builds its log observer from ``--logger`` before ``makeService`` runs, so the
    plugin's ``postOptions`` calls this with its parent (twistd's ServerOptions), which then
    imports the dotted name set here (:func:`twistd_json_observer` or
    :func:`twistd_text_observer`). Text mode with ``--syslog`` (or a daemon told to log to
    "-", which twistd refuses) keeps twistd's own observer.

    :param server_options: twistd's ``ServerOptions`` (reads "logfile", "nodaemon" and
        "syslog", sets "logger").
    :param log_format: ``config.log.format``, "text" (twistd's format) or "json".
    """
    path = server_options.get("logfile")
    nodaemon = bool(server_options.get("nodaemon"))
    factory = twistd_json_observer if log_format == "json" else twistd_text_observer
    if factory is twistd_text_observer and (
        server_options.get("syslog") or (path == "-" and not nodaemon)
    ):
        return
    _twistd_log["path"] = path
    _twistd_log["nodaemon"] = nodaemon
    server_options["logger"] = f"{__name__}.{factory.__name__}"


__all__ = [
    "NAMESPACE",
    "RELAYED_EVENTS",
    "RELAYED_TEXT",
    "BatchFileLogObserver",
    "ClassicTextFormatter",
    "MailLog",
    "configure_twistd_logger",
    "format_client",
    "format_json_line",
    "format_relay",
    "json_lines_observer",
    "reemit_json_line",
    "relayed_batches_observed",
    "relayed_json_event",
    "sanitize",
    "twistd_json_observer",
    "twistd_text_observer",
]
