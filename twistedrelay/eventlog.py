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
import re
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    Logger,
    LogLevel,
    formatEvent,
)

from twistedrelay.smtp.replies import Reply

NAMESPACE = "twistedrelay.mail"
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
        self._log.info(
            "{mail_line}",
            mail_line=line if queue_id is None else f"{sanitize(queue_id)}: {line}",
            mail_event=event,
            queue_id=queue_id,
            mail_fields=clean,
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
    return FileLogObserver(out, format_json_line)


def reemit_json_line(line: str, observer: ILogObserver | None = None, **extra: Any) -> bool:
    """Log again, with its structure, an event a worker wrote with :func:`format_json_line`.

    Workers log to their standard output and the master re-logs each line. In JSON mode this
    keeps a worker's mail events structured in the master's output (same namespace, level,
    ``event``, ``queue_id`` and fields) instead of nesting them as text.

    :param observer: where to log; the global log publisher by default.
    :param extra: fields to add, e.g. ``worker=slot``.
    :returns: False when ``line`` is not such a JSON object (the caller logs it as text).
    """
    try:
        record = json.loads(line)
    except ValueError:
        return False
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        return False
    try:
        level = LogLevel.levelWithName(str(record.get("level", "info")))
    except InvalidLogLevelError:
        level = LogLevel.info
    fields: dict[str, Any] = {"mail_line": record["text"], **extra}
    if "event" in record and "queue_id" in record:
        known = {"time", "level", "namespace", "text", "event", "queue_id"}
        fields["mail_event"] = record["event"]
        fields["queue_id"] = record["queue_id"]
        fields["mail_fields"] = {k: v for k, v in record.items() if k not in known}
    logger = Logger(namespace=str(record.get("namespace") or NAMESPACE), observer=observer)
    logger.emit(level, "{mail_line}", **fields)
    return True


# twistd's ``--logger`` is the dotted name of a zero-argument observer factory, imported by
# twistd's own postOptions (after the plugin's), so a callable placed there is refused. The
# log file twistd was given reaches :func:`twistd_json_observer` through this mapping.
_twistd_log: dict[str, str | None] = {"path": None}


def twistd_json_observer() -> ILogObserver:
    """The ``--logger`` factory twistd calls for JSON lines; writes where twistd would.

    That is ``--logfile`` (rotated by twistd's ``LogFile``) if given, else standard output.
    """
    path = _twistd_log["path"]
    if not path or path == "-":
        return json_lines_observer(sys.stdout)
    from twisted.python.logfile import LogFile

    return json_lines_observer(LogFile.fromFullPath(path))


def configure_twistd_logger(server_options: MutableMapping[str, Any], log_format: str) -> None:
    """Make twistd start its log with JSON lines when ``[log] format = "json"``.

    twistd builds its log observer from ``--logger`` before ``makeService`` runs, so the
    plugin's ``postOptions`` calls this with its parent (twistd's ServerOptions), which then
    imports the dotted name set here (:func:`twistd_json_observer`).

    :param server_options: twistd's ``ServerOptions`` (reads "logfile", sets "logger").
    :param log_format: ``config.log.format``, "text" (twistd's own format) or "json".
    """
    if log_format != "json":
        return
    _twistd_log["path"] = server_options.get("logfile")
    server_options["logger"] = f"{__name__}.{twistd_json_observer.__name__}"


__all__ = [
    "NAMESPACE",
    "MailLog",
    "configure_twistd_logger",
    "format_client",
    "format_json_line",
    "format_relay",
    "json_lines_observer",
    "reemit_json_line",
    "sanitize",
    "twistd_json_observer",
]
