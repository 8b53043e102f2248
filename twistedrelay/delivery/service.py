"""DeliveryService: the delivery loop of one worker.

Owns the life of claimed queue entries in this process: claiming (at once when this
worker queued the message, and by a periodic scan of incoming/ and of deferred/ entries
that are due), splitting each entry into one job per destination (routing.py), handing jobs
to the scheduler (scheduler.py: which job starts when), running a started job (resolver →
pool → one transaction), and, when every job of an entry is done, recording the outcome:
removal, a deferral with backoff, and a DSN for bounced recipients.

Invariant: an entry leaves active/ only after its outcome is durable: a DSN is committed
before the bounced entry is completed or deferred; a deferral's status is fsync'd before
the rename. If this worker dies midway, the master returns its entries to incoming/ and
they are delivered again (at-least-once).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from twistedrelay.bounce import FailedRecipient, build_dsn, extract_headers
from twistedrelay.config import Config
from twistedrelay.delivery.connection import OutboundMessage
from twistedrelay.delivery.headers import drop_header_fields
from twistedrelay.delivery.outcome import (
    Outcome,
    Result,
    apply_lifetime,
    classify_dns_failure,
    classify_reply,
    next_attempt_delay,
)
from twistedrelay.delivery.pool import AllHostsFailedError, DestinationPool, PoolSettings
from twistedrelay.eventlog import MailLog
from twistedrelay.hooks import Decision, DeliverContext, HookRunner, OutcomeContext, Verdict
from twistedrelay.metrics import RelayMetrics
from twistedrelay.queue.entry import Envelope, Recipient
from twistedrelay.queue.store import ClaimedEntry, QueueStore
from twistedrelay.resolver import MailHost, Resolver, ResolverError
from twistedrelay.routing import Destination, RouteTable
from twistedrelay.scheduler import Job, Lane, Scheduler
from twistedrelay.smtp import replies
from twistedrelay.tls import ClientTLS, ClientTLSOptions, tls_level_for

_log = Logger(namespace="twistedrelay.delivery")

#: The most entries one worker keeps claimed at once (Postfix's active queue limit).
CLAIM_WINDOW = 20000
#: The most message content one worker keeps in memory for delivery (bytes), taken from
#: its own commits; beyond it, and for every other entry, delivery reads the queue file.
CONTENT_IN_MEMORY_BUDGET = 16 * 1024 * 1024
#: After the outcome of a round could not be recorded (a full or failing disk), the entry
#: stays claimed and the record is tried again after this many seconds, doubling up to
#: RECORD_RETRY_MAX_SECONDS. Delivering it again instead would repeat what was delivered.
RECORD_RETRY_SECONDS = 5.0
RECORD_RETRY_MAX_SECONDS = 300.0
#: How long a destination that refused connections is left alone, at first and at most
#: (dead_destination_backoff caps both by the retry backoff of the config).
DEAD_BACKOFF_INITIAL_SECONDS = 60.0
DEAD_BACKOFF_MAX_SECONDS = 600.0
#: How much of a bounced message is read to find its header section for the DSN.
HEADER_READ_LIMIT = 256 * 1024
#: Spread retries of mail deferred together by up to this share of minimal_backoff.
RETRY_JITTER = 0.1


@dataclass(eq=False, slots=True)
class ActiveEntry:
    """A claimed entry and what its jobs have found out so far in this round."""

    claimed: ClaimedEntry
    jobs_left: int = 0
    finished: bool = False
    outcomes: dict[str, tuple[Recipient, Outcome, str]] = field(default_factory=dict)
    dsn_queued: bool = False
    record_failures: int = 0

    @property
    def queue_id(self) -> str:
        """The entry's queue ID."""
        return self.claimed.queue_id


@dataclass(frozen=True, slots=True)
class JobPayload:
    """What a started job delivers: some recipients of one entry to one destination."""

    entry: ActiveEntry
    destination: Destination
    recipients: tuple[Recipient, ...]


class DeliveryService(Service):
    """Claims, schedules and delivers queue entries; see the module docstring.

    :param owner: this worker's queue owner name (claims go to active/<owner>/).
    :param concurrency_limit: connections per destination for this process (the relay-wide
        ``destination_concurrency`` divided among the workers).
    """

    def __init__(
        self,
        config: Config,
        owner: str,
        reactor: Any,
        store: QueueStore,
        resolver: Resolver,
        metrics: RelayMetrics,
        maillog: MailLog,
        hooks: HookRunner,
        concurrency_limit: int,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.owner = owner
        self.reactor = reactor
        self.store = store
        self.resolver = resolver
        self.metrics = metrics
        self.maillog = maillog
        self.hooks = hooks
        self.rng = rng or random.Random()
        self.routes = RouteTable(config.delivery.routes)
        dead_initial, dead_max = dead_destination_backoff(config)
        self.scheduler: Scheduler[JobPayload] = Scheduler(
            concurrency_limit, dead_backoff_initial=dead_initial, dead_backoff_max=dead_max
        )
        self.client_tls = ClientTLS(config.delivery.ca_file, config.source)
        self.pools: dict[str, DestinationPool] = {}
        self.active: dict[str, ActiveEntry] = {}
        self.content_in_memory = 0
        """Bytes of content the active entries hold in memory (ClaimedEntry.content)."""
        self.last_failure: dict[str, Outcome] = {}
        self._attempts: set[defer.Deferred[None]] = set()
        self._scan = LoopingCall(self.scan_queue)
        self._scan.clock = reactor
        self._stopping = False
        self._pumping = False
        self._pump_again = False

    # -- service life ---------------------------------------------------------------------

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        self._stopping = False
        self._scan.start(self.config.delivery.queue_scan_interval, now=True).addErrback(
            lambda f: _log.failure("queue scan stopped", f)
        )

    @override
    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        return defer.ensureDeferred(self._drain())

    async def _drain(self) -> None:
        """Stop starting work, give running attempts a bounded time, requeue the rest."""
        self._stopping = True
        if self._scan.running:
            self._scan.stop()
        deadline = self.reactor.seconds() + self.config.workers.shutdown_timeout / 2
        while self._attempts and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05, lambda: None)
        for entry in list(self.active.values()):
            self.store.release(entry.claimed)
            self._forget(entry)
        for pool in self.pools.values():
            pool.close()

    def reload_config(self, config: Config) -> None:
        """Apply new routes, limits and nameservers (SIGHUP); connections in use are not dropped.

        New nameservers get a new resolver, so that no answer of the old ones is reused;
        lookups already running finish with the old one.
        """
        if config.dns != self.config.dns:
            self.resolver = build_resolver(config, self.reactor)
        self.config = config
        self.routes = RouteTable(config.delivery.routes)
        self.client_tls = ClientTLS(config.delivery.ca_file, config.source)
        self.scheduler.set_concurrency_limit(concurrency_share(config))
        self.scheduler.dead_backoff_initial, self.scheduler.dead_backoff_max = (
            dead_destination_backoff(config)
        )
        # New pools pick up the new timeouts, reuse limit and TLS policy; connections busy
        # in the old ones finish their transaction and then close when idle.
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()

    # -- claiming -------------------------------------------------------------------------

    def notify_queued(self, queue_id: str) -> None:
        """Claim ``queue_id``, just made durable in incoming/ by this worker: no polling lag."""
        if not self._stopping:
            self._claim(queue_id, "incoming", "new")
            self._pump()

    def owner_for_new(self) -> str | None:
        """Where this worker's inbound commits a new message (active/<owner>/), claimed at once.

        :returns: this worker's owner name, or None while it takes no new claims (stopping,
            or CLAIM_WINDOW entries active): the message then goes to incoming/.
        """
        if self._stopping or len(self.active) >= CLAIM_WINDOW:
            return None
        return self.owner

    def claimed_new(self, claimed: ClaimedEntry) -> None:
        """Deliver an entry this worker committed straight into active/<owner>/.

        Its content, when the commit still had it in memory, is kept for delivery while
        the worker holds less than CONTENT_IN_MEMORY_BUDGET of such content.
        """
        if self._stopping:
            self.store.release(claimed)  # back to incoming/ for whoever delivers next
            return
        content = claimed.content
        if content is not None:
            if self.content_in_memory + len(content) > CONTENT_IN_MEMORY_BUDGET:
                claimed = replace(claimed, content=None)
            else:
                self.content_in_memory += len(content)
        self._schedule(claimed, "new")
        self._pump()

    def scan_queue(self) -> None:
        """Claim what other processes queued, and deferred entries whose time has come."""
        if self._stopping:
            return
        for queue_id in self.store.scan_incoming():
            self._claim(queue_id, "incoming", "new")
        now = self.reactor.seconds()
        for queue_id, next_attempt_at in self.store.scan_deferred():
            if next_attempt_at <= now:
                self._claim(queue_id, "deferred", "deferred")
        self.scheduler.forget_idle()
        # Pools with no connection left are dropped, as the scheduler drops idle destinations.
        self.pools = {name: pool for name, pool in self.pools.items() if not pool.is_empty}
        self._pump()

    def _claim(self, queue_id: str, from_state: str, lane: Lane) -> None:
        if queue_id in self.active or len(self.active) >= CLAIM_WINDOW:
            return
        try:
            claimed = self.store.claim(queue_id, self.owner, from_state)
        except (OSError, ValueError) as e:
            _log.error("{queue_id}: cannot claim: {error}", queue_id=queue_id, error=e)
            return
        if claimed is not None:
            self._schedule(claimed, lane)

    def _schedule(self, claimed: ClaimedEntry, lane: Lane) -> None:
        entry = ActiveEntry(claimed)
        self.active[entry.queue_id] = entry
        groups: dict[Destination, list[Recipient]] = {}
        for recipient in claimed.status.pending(claimed.envelope):
            groups.setdefault(self.routes.destination_for(recipient.domain), []).append(recipient)
        entry.jobs_left = len(groups)
        if not groups:
            self._finish_entry(entry)
            return
        now = self.reactor.seconds()
        refused = []
        for destination, recipients in groups.items():
            job = Job(
                entry.queue_id,
                destination.name,
                lane,
                JobPayload(entry, destination, tuple(recipients)),
            )
            if not self.scheduler.add(job, now):
                refused.append(job)
        # Each refused job counts down jobs_left; the last one finishes the entry.
        for job in refused:
            self._refuse(job)

    def _refuse(self, job: Job[JobPayload]) -> None:
        """A job of a dead destination: its recipients are deferred with the last error.

        As in Postfix, the log says that no connection was tried this time.
        """
        payload = job.payload
        # A destination turns dead only in finished() after a failure recorded just before.
        failure = self.last_failure[job.destination]
        outcome = replace(
            failure, diagnostic=f"delivery temporarily suspended: {failure.diagnostic}"
        )
        for recipient in payload.recipients:
            self._record(payload.entry, recipient, outcome, "none")
        self._job_done(payload.entry)

    # -- running jobs ---------------------------------------------------------------------

    def _pump(self) -> None:
        """Start every job the scheduler lets start now (re-entrant calls are folded)."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again and not self._stopping:
                self._pump_again = False
                for job in self.scheduler.select(self.reactor.seconds()):
                    attempt = defer.ensureDeferred(self._attempt(job))
                    self._attempts.add(attempt)
                    attempt.addErrback(lambda f: _log.failure("delivery attempt failed", f))
                    attempt.addBoth(self._forget_attempt, attempt)
                for job in self.scheduler.take_refused():
                    self._refuse(job)
        finally:
            self._pumping = False

    def _forget_attempt(self, result: object, attempt: defer.Deferred[None]) -> None:
        self._attempts.discard(attempt)

    async def _attempt(self, job: Job[JobPayload]) -> None:
        payload = job.payload
        entry, destination = payload.entry, payload.destination
        failure: Outcome | None = None
        try:
            hosts = await self._resolve(destination)
            if isinstance(hosts, Outcome):
                if hosts.result is Result.DEFERRED:
                    failure = hosts
                self._record_all(entry, payload.recipients, hosts, "none")
                return
            rerouted = False
            if self.hooks.has_hook("deliver"):
                decision, ctx = await self._run_deliver_hook(payload, hosts)
                if decision.verdict is Verdict.TEMPFAIL:
                    outcome = _hook_outcome(decision, ctx)
                    self._record_all(entry, payload.recipients, outcome, "none")
                    return
                if decision.verdict is Verdict.REROUTE and decision.next_hop is not None:
                    # The original destination is not at fault for what happens at the new
                    # next hop: its failures do not back the original destination off.
                    rerouted = True
                    destination = Destination(str(decision.next_hop), decision.next_hop)
                    hosts = await self._resolve(destination)
                    if isinstance(hosts, Outcome):
                        self._record_all(entry, payload.recipients, hosts, "none")
                        return
            pool = self._pool_for(destination)
            try:
                pooled = await pool.acquire(hosts)
                result = await pooled.protocol.send(
                    self._outbound(entry.claimed, payload.recipients)
                )
                if pooled.reused and not result.answered:
                    # A reused connection failed before the host answered anything (it was
                    # closed while idle, or refused the RSET): send now on a new one rather
                    # than defer the message for a backoff it did nothing to earn.
                    await pool.release(pooled)
                    pooled = await pool.acquire(hosts, fresh=True)
                    result = await pooled.protocol.send(
                        self._outbound(entry.claimed, payload.recipients)
                    )
            except AllHostsFailedError as e:
                if e.outcome.result is Result.DEFERRED and not rerouted:
                    failure = e.outcome
                self._record_all(entry, payload.recipients, e.outcome, "none")
                return
            relay = str(pooled.host)
            by_address = {r.address: r for r in payload.recipients}
            for recipient_result in result.recipients:
                recipient = by_address[recipient_result.recipient]
                outcome = classify_reply(recipient_result.reply)
                self._record(entry, recipient, outcome, relay, pooled.tls_description)
            await pool.release(pooled)
        finally:
            if failure is not None:
                self.last_failure[job.destination] = failure
            else:
                self.last_failure.pop(job.destination, None)
            self.scheduler.finished(job, failure is None, self.reactor.seconds())
            self._job_done(entry)
            self._pump()

    async def _resolve(self, destination: Destination) -> list[MailHost] | Outcome:
        """The destination's mail hosts, or the outcome of a failed resolution."""
        queries_before = self.resolver.queries_sent
        try:
            hosts = await self.resolver.resolve_destination(
                destination, self.config.delivery.smtp_port
            )
        except ResolverError as e:
            if self.resolver.queries_sent > queries_before:
                self.metrics.dns_lookup("mx", failed=True)
            return classify_dns_failure(e)
        if self.resolver.queries_sent > queries_before:
            self.metrics.dns_lookup("mx")
        return hosts

    async def _run_deliver_hook(
        self, payload: JobPayload, hosts: list[MailHost]
    ) -> tuple[Decision, DeliverContext]:
        """Ask the deliver hooks about one destination batch (docs/hooks.md, call points)."""
        ctx = DeliverContext.for_envelope(
            payload.entry.claimed.envelope,
            destination=payload.destination,
            recipients=tuple(r.address for r in payload.recipients),
            mail_hosts=tuple(str(host) for host in hosts),
            now=self.reactor.seconds(),
        )
        decision = await self.hooks.run("deliver", ctx)
        return decision, ctx

    def _pool_for(self, destination: Destination) -> DestinationPool:
        pool = self.pools.get(destination.name)
        if pool is None:
            delivery = self.config.delivery
            settings = PoolSettings(
                helo_name=self.config.hostname,
                reuse_limit=delivery.connection_reuse_limit,
                chunking=delivery.chunking,
                idle_timeout=delivery.idle_timeout,
                connect_timeout=delivery.connect_timeout,
                command_timeout=delivery.command_timeout,
                data_timeout=delivery.data_timeout,
            )
            # A route's text carries brackets and a port: its policy key is the next hop's host.
            hop = destination.next_hop
            policy_name = hop.host if hop is not None else destination.name
            level = tls_level_for(policy_name, delivery.tls, delivery.tls_policy)

            def tls_for_host(host: str) -> ClientTLSOptions:
                return self.client_tls.options_for(host, level)

            pool = self.pools[destination.name] = DestinationPool(
                destination.name, settings, self.reactor, self.metrics, tls_for_host
            )
        return pool

    @staticmethod
    def _outbound(claimed: ClaimedEntry, recipients: Iterable[Recipient]) -> OutboundMessage:
        envelope = claimed.envelope
        return OutboundMessage(
            sender=envelope.sender,
            recipients=[(r.address, r.params) for r in recipients],
            content_size=claimed.content_size,
            open_content=claimed.open_content,
            prepend="".join(envelope.prepend_headers).encode("utf-8"),
            body_8bit=envelope.body_8bit,
            smtputf8=envelope.smtputf8,
            mail_params=envelope.mail_params,
            drop_headers=envelope.drop_headers,
        )

    # -- outcomes -------------------------------------------------------------------------

    def _record_all(
        self, entry: ActiveEntry, recipients: Iterable[Recipient], outcome: Outcome, relay: str
    ) -> None:
        for recipient in recipients:
            self._record(entry, recipient, outcome, relay)

    def _record(
        self,
        entry: ActiveEntry,
        recipient: Recipient,
        outcome: Outcome,
        relay: str,
        tls: str | None = None,
    ) -> None:
        now = self.reactor.seconds()
        envelope = entry.claimed.envelope
        outcome = apply_lifetime(
            outcome, envelope.arrival_time, now, self.config.delivery.maximal_queue_lifetime
        )
        entry.outcomes[recipient.address] = (recipient, outcome, relay)
        status = {"delivered": "sent"}.get(outcome.result.value, outcome.result.value)
        self.maillog.delivery(
            entry.queue_id,
            recipient.address,
            relay,
            now - envelope.arrival_time,
            outcome.status,
            status,
            outcome.diagnostic,
            tls=tls,
        )
        self.metrics.delivery(outcome.result.value, now - envelope.arrival_time)
        if self.hooks.has_hook(outcome.result.value):
            self.hooks.run(
                outcome.result.value,
                OutcomeContext.for_envelope(
                    envelope,
                    recipient=recipient.address,
                    reply=outcome.diagnostic,
                    attempt=entry.claimed.status.attempts + 1,
                    result=outcome.result.value,
                ),
            )

    def _job_done(self, entry: ActiveEntry) -> None:
        entry.jobs_left -= 1
        if entry.jobs_left <= 0:
            self._finish_entry(entry)

    def _forget(self, entry: ActiveEntry) -> None:
        """The entry is no longer this worker's to deliver."""
        del self.active[entry.queue_id]
        if entry.claimed.content is not None:
            self.content_in_memory -= len(entry.claimed.content)

    def _remember(self, entry: ActiveEntry) -> None:
        """Undo _forget: the entry is this worker's again."""
        self.active[entry.queue_id] = entry
        if entry.claimed.content is not None:
            self.content_in_memory += len(entry.claimed.content)

    def _finish_entry(self, entry: ActiveEntry) -> None:
        if entry.finished or (self._stopping and entry.queue_id not in self.active):
            return  # finishing already, or released at shutdown before a retry came
        entry.finished = True
        finishing = defer.ensureDeferred(self._finalize(entry))
        finishing.addErrback(self._record_failed, entry)

    def _record_failed(self, failure: Failure, entry: ActiveEntry) -> None:
        """Keep the entry claimed and try the record again later (RECORD_RETRY_SECONDS)."""
        entry.record_failures += 1
        delay = min(
            RECORD_RETRY_MAX_SECONDS, RECORD_RETRY_SECONDS * 2 ** (entry.record_failures - 1)
        )
        _log.failure(
            "{queue_id}: cannot record the outcome; trying again in {delay:.0f} s",
            failure,
            queue_id=entry.queue_id,
            delay=delay,
        )
        if self._stopping or entry.queue_id not in self.active:
            return  # released at shutdown, or left in active/ for the master to reclaim
        entry.finished = False
        self.reactor.callLater(delay, self._finish_entry, entry)

    async def _finalize(self, entry: ActiveEntry) -> None:
        """Make the round's outcome durable: DSN first, then removal or deferral."""
        claimed, now = entry.claimed, self.reactor.seconds()
        envelope = claimed.envelope
        status = claimed.status.with_attempt(now)
        bounced: list[FailedRecipient] = []
        deferred = False
        for address, (recipient, outcome, relay) in entry.outcomes.items():
            status = status.with_outcome(address, outcome.result.value, outcome.diagnostic)
            if outcome.result is Result.BOUNCED:
                remote_mta = relay.partition("[")[0] if relay != "none" else None
                bounced.append(FailedRecipient.from_outcome(recipient, outcome, remote_mta))
            elif outcome.result is Result.DEFERRED:
                deferred = True
        # A recipient this round found no outcome for (an attempt failed unexpectedly) is
        # tried again later, never dropped.
        if any(r.address not in entry.outcomes for r in claimed.status.pending(envelope)):
            deferred = True
        if bounced and not envelope.is_bounce and not entry.dsn_queued:
            await self._queue_dsn(claimed, bounced, now)
            entry.dsn_queued = True  # a retry of the record must not bounce twice
        if self._stopping and entry.queue_id not in self.active:
            return  # released at shutdown
        # Forgotten before the await, so that a shutdown meanwhile does not release it too.
        self._forget(entry)
        if deferred:
            delivery = self.config.delivery
            delay = next_attempt_delay(
                envelope.arrival_time,
                now,
                delivery.minimal_backoff,
                delivery.maximal_backoff,
                jitter=self.rng.uniform(0, delivery.minimal_backoff * RETRY_JITTER),
            )
            try:
                await self.store.mark_deferred(claimed, now + delay, status)
            except OSError:
                if not self._stopping:
                    self._remember(entry)  # still in active/<owner>/: ours to record
                raise
        else:
            await self.store.complete_later(claimed)
            self.maillog.removed(entry.queue_id)

    async def _queue_dsn(
        self, claimed: ClaimedEntry, failed: list[FailedRecipient], now: float
    ) -> None:
        envelope = claimed.envelope
        with claimed.open_content() as content:
            # The returned headers are the delivered ones: without what hooks dropped.
            headers = extract_headers(
                drop_header_fields(content.read(HEADER_READ_LIMIT), envelope.drop_headers)
            )
        message = self.store.open_message()
        message.write(build_dsn(envelope, failed, headers, self.config.hostname, now))
        dsn = Envelope(
            queue_id=message.queue_id,
            sender="",
            recipients=(Recipient(envelope.sender),),
            arrival_time=now,
            client_helo=self.config.hostname,
            listener="local",
        )
        await message.commit(dsn)
        self.maillog.bounce_created(envelope.queue_id, dsn.queue_id)
        self.notify_queued(dsn.queue_id)


def _hook_outcome(decision: Decision, ctx: DeliverContext) -> Outcome:
    """A deliver hook's tempfail as the batch's outcome; the log line names the plugin."""
    outcome = classify_reply(decision.reply or replies.PLUGIN_ERROR)
    note = f"deliver hook {decision.decided_by}"
    if ctx.results:
        note += f": {ctx.results.format()}"
    return replace(outcome, diagnostic=f"{outcome.diagnostic} ({note})")


def dead_destination_backoff(config: Config) -> tuple[float, float]:
    """How long an unreachable destination is left alone (scheduler.py), first and at most.

    60 s doubling to 600 s, but never longer than the retry backoff the operator set, so
    that mail is not held past ``maximal_backoff`` once the destination is back.
    """
    delivery = config.delivery
    return (
        min(DEAD_BACKOFF_INITIAL_SECONDS, delivery.minimal_backoff),
        min(DEAD_BACKOFF_MAX_SECONDS, delivery.maximal_backoff),
    )


def concurrency_share(config: Config) -> int:
    """One worker's share of ``destination_concurrency`` (the limit is relay-wide)."""
    return max(1, config.delivery.destination_concurrency // config.worker_count)


def build_delivery_service(
    config: Config,
    slot: int,
    reactor: Any,
    *,
    store: QueueStore,
    metrics: RelayMetrics,
    maillog: MailLog,
    hooks: HookRunner,
) -> DeliveryService:
    """The delivery loop of worker ``slot`` (app.py's worker payload calls this).

    The relay-wide ``destination_concurrency`` is shared among the workers, so the limit
    holds for the whole relay: each worker may open limit // workers (at least one).
    """
    share = concurrency_share(config)
    resolver = build_resolver(config, reactor)
    return DeliveryService(
        config, f"w{slot}", reactor, store, resolver, metrics, maillog, hooks, share
    )


def build_resolver(config: Config, reactor: Any) -> Resolver:
    """The resolver of ``[dns]`` (nameservers, timeout)."""
    return Resolver(
        reactor,
        [(ns.host, ns.port) for ns in config.dns.nameservers],
        timeout_seconds=config.dns.timeout,
    )
