"""The mail log: Postfix-like lines with the queue ID, sanitised, and JSON lines."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.application.app import ServerOptions
from twisted.logger import Logger, LogLevel, formatEvent, formatEventAsClassicLogText
from twisted.python.failure import Failure

from twistedrelay.eventlog import (
    NAMESPACE,
    RELAYED_EVENTS,
    RELAYED_TEXT,
    BatchFileLogObserver,
    ClassicTextFormatter,
    MailLog,
    configure_twistd_logger,
    format_json_line,
    format_relay,
    json_lines_observer,
    reemit_json_line,
    sanitize,
)
from twistedrelay.smtp.replies import Reply

QID = "18C2F3A4B5D6E0010A21"


def capture() -> tuple[MailLog, list[dict[str, Any]]]:
    """A MailLog whose events land in a list (no I/O)."""
    events: list[dict[str, Any]] = []
    return MailLog(Logger(namespace=NAMESPACE, observer=events.append)), events


def lines(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events]


def test_default_logger_uses_the_mail_namespace():
    """Without an injected logger, events go to twistd's log under twistedrelay.mail."""
    assert MailLog()._log.namespace == "twistedrelay.mail"


def test_connect_and_disconnect_name_the_client_and_listener():
    """Session lines carry the client address, port and listener."""
    log, events = capture()
    log.connect("192.0.2.7", 40123, "smtp")
    log.disconnect("192.0.2.7", "ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5")
    assert lines(events) == [
        "connect from [192.0.2.7]:40123 listener=smtp",
        "disconnect from [192.0.2.7] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5",
    ]
    assert events[0]["log_level"] is LogLevel.info
    assert events[0]["log_namespace"] == NAMESPACE


def test_auth_lines_name_the_client_user_and_result():
    """AUTH success and failure are logged with a stable, matchable form."""
    log, events = capture()
    log.auth("192.0.2.7", "bob", ok=True)
    log.auth("203.0.113.9", "mallory\r\nforged", ok=False)
    assert lines(events) == [
        "auth ok from [192.0.2.7] user=bob",
        "auth failed from [203.0.113.9] user=mallory??forged",
    ]


def test_queued_line_has_sender_size_and_recipient_count():
    """The queued line reads like Postfix's qmgr line, prefixed with the queue ID."""
    log, events = capture()
    log.queued(QID, "alice@example.org", 1234, 2, "192.0.2.7", 40123)
    assert lines(events) == [
        f"{QID}: client=[192.0.2.7]:40123, from=<alice@example.org>, size=1234, nrcpt=2 "
        "(queue active)"
    ]
    assert events[0]["queue_id"] == QID
    assert events[0]["mail_event"] == "queued"


def test_null_sender_is_written_as_empty_angle_brackets():
    """A bounce's null reverse-path shows as from=<>, as in Postfix."""
    log, events = capture()
    log.queued(QID, "", 10, 1, "127.0.0.1")
    assert "from=<>," in lines(events)[0]


def test_delivery_line_has_relay_delay_dsn_status_and_reply():
    """One line per recipient attempt, Postfix's to=, relay=, delay=, dsn=, status= form."""
    log, events = capture()
    relay = format_relay("mx1.example.net", "198.51.100.25", 25)
    log.delivery(QID, "bob@example.net", relay, 0.4219, "2.0.0", "sent", "250 2.0.0 Ok: queued")
    assert lines(events) == [
        f"{QID}: to=<bob@example.net>, relay=mx1.example.net[198.51.100.25]:25, delay=0.42, "
        "dsn=2.0.0, status=sent (250 2.0.0 Ok: queued)"
    ]


@pytest.mark.parametrize(
    ("status", "word"),
    [("delivered", "sent"), ("sent", "sent"), ("deferred", "deferred"), ("bounced", "bounced")],
)
def test_delivery_status_uses_postfix_words(status: str, word: str):
    """The outcome names map onto Postfix's status words."""
    log, events = capture()
    log.delivery(QID, "b@x.example", "none", 1.0, "4.4.1", status, "connect timed out")
    assert f"status={word} (connect timed out)" in lines(events)[0]
    assert events[0]["mail_fields"]["status"] == word


def test_delivery_with_an_unknown_status_is_refused():
    """A typo in a status must not produce a line no one will grep for."""
    log, _ = capture()
    with pytest.raises(ValueError):
        log.delivery(QID, "b@x.example", "none", 1.0, "4.4.1", "failed", "x")


def test_delivery_shows_tls_when_used():
    """The TLS version appears when the attempt used TLS."""
    log, events = capture()
    log.delivery(QID, "b@x.example", "h[192.0.2.1]:25", 1, "2.0.0", "sent", "250 ok", "TLSv1.3")
    assert ", tls=TLSv1.3, status=sent" in lines(events)[0]


def test_rejection_before_queueing_is_a_noqueue_line():
    """A refused RCPT logs NOQUEUE: reject: with the reply, sender and recipient."""
    log, events = capture()
    reply = Reply(554, "5.7.1", "<bob@elsewhere.example>: Relay access denied")
    log.rejected(
        "rcpt", "203.0.113.9", reply, sender="a@example.org", recipient="bob@elsewhere.example"
    )
    assert lines(events) == [
        "NOQUEUE: reject: RCPT from [203.0.113.9]: 554 5.7.1 <bob@elsewhere.example>: "
        "Relay access denied; from=<a@example.org> to=<bob@elsewhere.example>"
    ]


def test_message_lifecycle_lines_all_start_with_the_queue_id():
    """bounce, expiry, hold, release and removal lines are found by grepping the queue ID."""
    log, events = capture()
    log.bounce_created(QID, "18C2F3A4B5D6E0020B32")
    log.expired(QID, "a@example.org", 432001.2)
    log.held(QID, "data hook: suspicious attachment")
    log.released(QID, "operator")
    log.removed(QID)
    assert lines(events) == [
        f"{QID}: sender non-delivery notification: 18C2F3A4B5D6E0020B32",
        f"{QID}: from=<a@example.org>, status=expired, returned to sender (age=432001s)",
        f"{QID}: hold: data hook: suspicious attachment",
        f"{QID}: released from hold: operator",
        f"{QID}: removed",
    ]


def test_client_supplied_crlf_cannot_forge_a_log_line():
    """Log injection: CR/LF and other controls in client values become "?"."""
    log, events = capture()
    evil = f"x@y\r\n{QID}: removed\x1b[31m\x85"
    log.rejected("MAIL", "192.0.2.1", "553 5.1.3 bad", sender=evil, helo="h\x00elo")
    (line,) = lines(events)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\x85" not in line
    assert f"from=<x@y??{QID}: removed?[31m?>" in line
    assert "helo=<h?elo>" in line


def test_braces_in_client_values_are_not_format_fields():
    """Values are data, never part of the log format string."""
    log, events = capture()
    log.queued(QID, "{log_namespace}@example.org", 1, 1, "192.0.2.1")
    assert "from=<{log_namespace}@example.org>" in lines(events)[0]


def test_very_long_values_are_cut():
    """A 100 kB reply text does not make a 100 kB log line."""
    log, events = capture()
    log.delivery(QID, "b@x.example", "none", 1.0, "5.0.0", "bounced", "x" * 100_000)
    assert len(lines(events)[0]) < 1200


@given(st.text())
def test_sanitize_never_leaves_a_control_character(text: str):
    """Whatever the input, the output is one printable line."""
    out = sanitize(text)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in out)
    assert "\u2028" not in out and "\u2029" not in out


def test_json_line_is_one_object_with_the_mail_fields():
    """JSON output carries event, queue_id, the fields and the text line."""
    log, events = capture()
    log.delivery(QID, "b@x.example", "h[192.0.2.1]:25", 0.5, "4.2.0", "deferred", "451 try later")
    out = format_json_line(events[0])
    assert out is not None and out.endswith("\n") and out.count("\n") == 1
    record = json.loads(out)
    assert record["event"] == "delivery"
    assert record["queue_id"] == QID
    assert record["recipient"] == "b@x.example"
    assert record["status"] == "deferred"
    assert record["delay"] == 0.5
    assert record["level"] == "info"
    assert record["namespace"] == NAMESPACE
    assert record["text"].startswith(f"{QID}: to=<b@x.example>")
    assert record["time"].endswith("+00:00")


def test_json_observer_writes_other_events_and_failures_too():
    """Non-mail events (and tracebacks) also become single JSON lines."""
    out = io.StringIO()
    logger = Logger(namespace="twistedrelay.app", observer=json_lines_observer(out))
    logger.warn("worker {pid} died", pid=1234)
    try:
        raise ZeroDivisionError("test")
    except ZeroDivisionError:
        logger.failure("boom", Failure())
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["text"] == "worker 1234 died" and first["level"] == "warn"
    assert "event" not in first
    assert "ZeroDivisionError" in second["traceback"]


def _twistd_observer(log_file, log_format):
    """The observer twistd builds for ``--logfile log_file`` once the plugin configured it."""
    options = ServerOptions()
    options["logfile"] = str(log_file)
    configure_twistd_logger(options, log_format)
    # twistd's own postOptions runs after the plugin's and imports --logger by dotted name.
    options.postOptions()
    return options["logger"]()


def test_configure_twistd_logger_installs_json_when_asked(tmp_path):
    """format = "json" sets twistd's logger factory to JSON lines, honouring --logfile."""
    observer = _twistd_observer(tmp_path / "relay.log", "json")
    Logger(namespace="t", observer=observer).info("hello {who}", who="ops")
    observer._out.close()
    (line,) = (tmp_path / "relay.log").read_text().splitlines()
    assert json.loads(line)["text"] == "hello ops"


def test_configure_twistd_logger_text_writes_twistds_format(tmp_path):
    """format = "text" installs an observer writing exactly twistd's own classic lines."""
    observer = _twistd_observer(tmp_path / "relay.log", "text")
    event = {
        "log_format": "hello {who}",
        "who": "ops",
        "log_time": 1.5e9,
        "log_namespace": "t",
        "log_level": LogLevel.warn,
    }
    observer(event)
    observer._out.close()
    assert (tmp_path / "relay.log").read_text() == formatEventAsClassicLogText(event)


def test_configure_twistd_logger_leaves_syslog_text_to_twistd():
    """With --syslog, text mode keeps twistd's observer (it has no file to batch into)."""
    options = ServerOptions()
    options["syslog"] = True
    configure_twistd_logger(options, "text")
    assert options["logger"] is None


def test_a_batch_of_relayed_events_is_one_line_each_in_one_write():
    """RELAYED_EVENTS: every relayed event is its own classic line, written and flushed once."""
    writes: list[str] = []

    class Out(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    observer = BatchFileLogObserver(Out(), ClassicTextFormatter())
    relayed = [
        {
            "log_format": "worker {slot}: {line}",
            "slot": 1,
            "line": f"x{n}",
            "log_time": 1.5e9 + n,
            "log_namespace": "m",
            "log_level": LogLevel.info,
            RELAYED_TEXT: f"worker 1: x{n}",
        }
        for n in range(3)
    ]
    observer({"log_format": "batch", RELAYED_EVENTS: relayed, "log_time": 1.5e9})
    (text,) = writes
    expected = [
        formatEventAsClassicLogText({k: v for k, v in e.items() if k != RELAYED_TEXT})
        for e in relayed
    ]
    assert text.splitlines(keepends=True) == expected


def test_a_workers_json_line_is_reemitted_with_its_structure():
    """The master re-logs a worker's JSON mail event as the same structured event."""
    log, events = capture()
    log.queued(QID, "alice@example.org", 99, 1, "192.0.2.7")
    worker_line = format_json_line(events[0]).strip()
    relayed: list[dict[str, Any]] = []
    assert reemit_json_line(worker_line, relayed.append, worker=1)
    (event,) = relayed
    assert event["log_namespace"] == NAMESPACE
    assert event["log_level"] is LogLevel.info
    assert event["worker"] == 1
    assert formatEvent(event) == formatEvent(events[0])
    again = json.loads(format_json_line(event))
    original = json.loads(worker_line)
    assert {k: v for k, v in again.items() if k != "time"} == {
        k: v for k, v in original.items() if k != "time"
    } | {"worker": 1}


@pytest.mark.parametrize("line", ["[twistedrelay.mail#info] x", "{not json", "[1, 2]", '{"a": 1}'])
def test_lines_that_are_not_json_events_are_left_to_the_caller(line: str):
    """Text lines (text mode, tracebacks on stderr) are not swallowed."""
    relayed: list[dict[str, Any]] = []
    assert not reemit_json_line(line, relayed.append)
    assert relayed == []
