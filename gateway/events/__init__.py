"""Events: trigger fires and connector events, from one durable write to the queued calls.

``fires.py`` publishes each accepted event to the fire stream (the one durable write before
a 202); ``fanout.py`` turns each fire into its invocations on the async queue; ``scheduler.py``
publishes alarm ticks and cron-function schedules; ``subjects.py`` holds the NATS
subscriptions of subject feeds and topic annotations. docs/events.md has the whole.
"""
