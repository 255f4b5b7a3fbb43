"""The queue-worker: consumes async calls from JetStream, invokes functions, posts callbacks."""
