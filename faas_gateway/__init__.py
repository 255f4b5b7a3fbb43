"""Contracts shared by the gateway and the queue-worker.

Everything both processes must agree on lives here once: the queued message, header names,
JetStream stream and consumer names, the function registry, settings parsing and logging.
"""

__version__ = "0.1.0"
