"""Helpers of the load harness ``benchmarks/run.py``: processes, sink, sender, relay, Postfix.

Nothing here is imported by the relay; these modules drive it (and Postfix) from outside,
as an operator would, over loopback only.
"""
