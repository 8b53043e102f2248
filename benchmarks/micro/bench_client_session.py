"""Time the outbound pure core: one pipelined transaction, and content encoding throughput.

Run: ``.venv/bin/python benchmarks/micro/bench_client_session.py``

1. A transaction on a reused connection, as the pool runs it: begin() (MAIL, RCPT, DATA
   pipelined), the host's replies, the 1 KiB content, end of data, RSET and its reply.
2. ContentEncoder on a 1 MiB message of 76-byte lines (every tenth starting with ".") in
   16 KiB chunks, against the bare ``bytes.replace`` Twisted's SMTPClient.transformChunk
   does (which is wrong at chunk boundaries, so it is a floor, not a rival).

Measured on the 2-core development VM (Python 3.11, Twisted 26.10), best of 5, while other
test runs kept the load average near 8, so read them as upper bounds (two runs: 28-186 us
and 60-231 us for the transactions, 2.9-5.7 ms and 1.4-2.6 ms for the encoding):

    transaction (1 recipient, 1 KiB)        ~28 us
    transaction (10 recipients, 1 KiB)      ~60 us
    ContentEncoder 1 MiB / 16 KiB chunks    ~2.9 ms  (~0.4 GB/s; about 2x the floor, the
                                                      price of the line-ending checks)
    bytes.replace floor                     ~1.4 ms

Reply parsing (one ReplyParser._line per reply line) is most of a transaction's time.
The numbers printed by a run are the ones to quote; the machine must be stated with them.
"""

from __future__ import annotations

import timeit

from twistedrelay.smtp.client_session import ClientSession, ContentEncoder

EHLO = b"250-mx.bench.test\r\n250-PIPELINING\r\n250-SIZE 0\r\n250 8BITMIME\r\n"
OK = b"250 2.0.0 Ok\r\n"
GO_AHEAD = b"354 go ahead\r\n"
MESSAGE_1K = b"Subject: bench\r\n\r\n" + (b"x" * 62 + b"\r\n") * 15
LINES = [(b"." if i % 10 == 0 else b"") + b"y" * 74 + b"\r\n" for i in range(1000)]
MESSAGE_1M = (b"".join(LINES) * 14)[: 1 << 20]
CHUNK = 16384


def ready_session() -> ClientSession:
    session = ClientSession("relay.bench.test")
    session.receive(b"220 mx.bench.test ESMTP\r\n")
    session.receive(EHLO)
    session.data_to_send()
    return session


def transaction(
    session: ClientSession, recipients: list[tuple[str, dict[str, str | None]]]
) -> None:
    session.begin("sender@example.org", recipients, len(MESSAGE_1K))
    session.data_to_send()
    session.receive(OK * (len(recipients) + 1) + GO_AHEAD)
    session.encode_content(MESSAGE_1K)
    session.end_content()
    session.data_to_send()
    session.receive(OK)
    session.reset()
    session.data_to_send()
    session.receive(OK)


def encode_chunks() -> None:
    encoder = ContentEncoder()
    for i in range(0, len(MESSAGE_1M), CHUNK):
        encoder.encode(MESSAGE_1M[i : i + CHUNK])
    encoder.finish()


def replace_chunks() -> None:
    for i in range(0, len(MESSAGE_1M), CHUNK):
        MESSAGE_1M[i : i + CHUNK].replace(b"\r\n.", b"\r\n..")


def best(function, number: int) -> float:
    return min(timeit.repeat(function, number=number, repeat=5)) / number


def main() -> None:
    for count in (1, 10):
        recipients = [(f"r{i}@example.net", {}) for i in range(count)]
        session = ready_session()
        seconds = best(lambda s=session, r=recipients: transaction(s, r), 2000)
        print(f"transaction ({count} recipients, 1 KiB)   {seconds * 1e6:8.1f} us")
    encoder_seconds = best(encode_chunks, 50)
    rate = len(MESSAGE_1M) / encoder_seconds / 1e9
    print(
        f"ContentEncoder 1 MiB / 16 KiB chunks  {encoder_seconds * 1e3:8.2f} ms  ({rate:.1f} GB/s)"
    )
    print(f"bytes.replace floor                   {best(replace_chunks, 50) * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
