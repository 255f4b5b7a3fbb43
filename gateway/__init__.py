"""The gateway: proxies sync calls to functions and enqueues async calls on JetStream."""
