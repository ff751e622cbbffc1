"""A Python exec function that keeps a counter in the state store over the Redis protocol.

The gateway gives each invocation SFAAS_STATE_REDIS_URL, redis://TENANT:TOKEN@HOST:PORT with a
token valid while the invocation runs. It uses redis-py: install it beside this file, as a
function's own dependencies are (`pip install --target examples/state redis async-timeout`;
redis-py needs async-timeout on Python before 3.11.3), or system-wide.
Counters are INCR: atomic, so concurrent invocations never lose a count.
"""
import json
import os
import sys

import redis

store = redis.Redis.from_url(os.environ["SFAAS_STATE_REDIS_URL"])
name = sys.stdin.read().strip() or "default"
count = store.incr(f"counters/{name}")
json.dump({"counter": name, "count": count}, sys.stdout)
