"""SMTPClientProtocol's writes: how many, and what each holds (an in-memory transport).

The transports write at once (twistedrelay.transport), so every transport.write is a send
and a packet: a small message must go out in one write with its terminator.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twistedrelay.delivery.connection import (
    CONTENT_WRITE_BYTES,
    OutboundMessage,
    SMTPClientProtocol,
)
from twistedrelay.smtp.client_session import ClientSession


class _CountingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def _ready_protocol(
    ehlo: bytes = b"250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n", chunking: bool = True
) -> tuple[SMTPClientProtocol, _CountingTransport]:
    protocol = SMTPClientProtocol(ClientSession("relay.test"), Clock(), 300, 600, chunking=chunking)
    transport = _CountingTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"220 mx.test\r\n")
    protocol.dataReceived(ehlo)
    assert protocol.is_ready
    transport.writes.clear()
    return protocol, transport


def _message(content: bytes, **fields: Any) -> OutboundMessage:
    return OutboundMessage(
        sender="s@example.org",
        recipients=[("r@example.net", {})],
        content_size=len(content),
        open_content=lambda: io.BytesIO(content),
        prepend=b"Received: by relay.test\r\n",
        **fields,
    )


CHUNKING = b"250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n"


def test_a_chunking_host_gets_commands_and_message_in_one_write() -> None:
    """BDAT: one write per message (commands, BDAT and the raw message), one reply batch."""
    protocol, transport = _ready_protocol(CHUNKING)
    body = b"Subject: x\r\n\r\n.dot\r\n"
    result = protocol.send(_message(body))
    whole = b"Received: by relay.test\r\n" + body
    assert transport.writes == [
        b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\n"
        b"BDAT %d LAST\r\n" % len(whole) + whole
    ]
    protocol.dataReceived(b"250 ok\r\n250 ok\r\n250 queued\r\n")
    assert [r.reply.code for r in result.result.recipients] == [250]
    assert len(transport.writes) == 1


def test_with_chunking_off_a_chunking_host_gets_data() -> None:
    """delivery.chunking = false: DATA even when the host offers CHUNKING."""
    protocol, transport = _ready_protocol(CHUNKING, chunking=False)
    protocol.send(_message(b"Subject: x\r\n\r\nbody\r\n"))
    assert transport.writes[0].endswith(b"DATA\r\n")


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (b"Subject: x\r\n\r\nbare\nline feed\r\n", {}),
        (b"Subject: x\r\n\r\nno final line break", {}),
        (b"Subject: x\r\n\r\nbody\r\n", {"drop_headers": (("subject", None),)}),
        (b"x" * (CONTENT_WRITE_BYTES + 1) + b"\r\n", {}),
    ],
    ids=["bare LF", "no final CRLF", "headers to drop", "large"],
)
def test_messages_bdat_cannot_carry_as_they_are_go_with_data(body: bytes, fields: Any) -> None:
    """A message DATA's encoder must repair, filter or stream is sent with DATA."""
    protocol, transport = _ready_protocol(CHUNKING)
    protocol.send(_message(body, **fields))
    assert transport.writes[0].endswith(b"DATA\r\n")
    assert b"BDAT" not in transport.writes[0]


def test_commands_then_the_whole_message_in_one_write_each() -> None:
    """MAIL/RCPT/DATA in one write; after 354 the trace header, content and "." in one."""
    protocol, transport = _ready_protocol()
    result = protocol.send(_message(b"Subject: x\r\n\r\n.dot\r\n"))
    assert transport.writes == [b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"]
    protocol.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert transport.writes[1:] == [
        b"Received: by relay.test\r\nSubject: x\r\n\r\n..dot\r\n.\r\n",
    ]
    protocol.dataReceived(b"250 queued\r\n")
    assert [r.reply.code for r in result.result.recipients] == [250]


def test_a_large_message_is_written_in_bounded_pieces_in_order() -> None:
    """Content past CONTENT_WRITE_BYTES goes out as it is encoded, not held whole."""
    protocol, transport = _ready_protocol()
    content = b"x" * 100 + b"\r\n"
    big = content * (3 * CONTENT_WRITE_BYTES // len(content))
    protocol.send(_message(big))
    protocol.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    content_writes = transport.writes[1:]
    assert 3 <= len(content_writes) <= 5
    assert b"".join(content_writes) == b"Received: by relay.test\r\n" + big + b".\r\n"
