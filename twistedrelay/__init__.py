"""twistedrelay: an SMTP relay (MTA) on a Twisted reactor."""

__version__ = "0.1.0.dev0"
