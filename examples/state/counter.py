"""A Python exec function that keeps a counter in the state store over HTTP.

The gateway gives each invocation SFAAS_STATE_URL and a token (SFAAS_STATE_TOKEN) valid while
the invocation runs; within a flow run, SFAAS_JOB names the run's job. Only the standard
library is used.
"""
import json
import os
import sys
import urllib.error
import urllib.request

base = os.environ["SFAAS_STATE_URL"]
token = os.environ["SFAAS_STATE_TOKEN"]
bucket = "counters"
key = sys.stdin.read().strip() or "default"
url = f"{base}/buckets/{bucket}/objects/{key}"


def call(method, data=None):
    request = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request) as response:
        return response.read()


try:
    count = int(call("GET"))
except urllib.error.HTTPError as error:
    if error.code != 404:
        raise
    count = 0
count += 1
call("PUT", str(count).encode())
json.dump({"key": key, "count": count}, sys.stdout)
