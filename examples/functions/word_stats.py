"""An exec function: request body on stdin, JSON answer on stdout.

The gateway passes the call id and the W3C trace context in the environment
(Http_X_Call_Id, TRACEPARENT), so the function's own logs and spans can join the trace.
Each line it writes to stderr is one of its logs (`sfaas logs word-stats`).
"""
import json
import os
import sys
from collections import Counter

text = sys.stdin.read()
words = [w.strip(".,;:!?\"'()").lower() for w in text.split()]
counts = Counter(w for w in words if w)
print(f"INFO counted {sum(counts.values())} words, {len(counts)} distinct", file=sys.stderr)
json.dump(
    {
        "call_id": os.environ.get("Http_X_Call_Id"),
        "traceparent": os.environ.get("TRACEPARENT"),
        "words": sum(counts.values()),
        "top": counts.most_common(3),
    },
    sys.stdout,
)
