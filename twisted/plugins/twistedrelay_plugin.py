from twisted.application.service import ServiceMaker

twistedrelay = ServiceMaker(
    "twistedrelay",
    "twistedrelay.app",
    "An SMTP relay: ESMTP in, durable queue, pooled delivery, Prometheus metrics.",
    "twistedrelay",
)
