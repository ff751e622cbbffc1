"""etl-clean: validates trip records and enriches them with their borough.

The ETL pipeline's Python stage (an `exec` function: the batch on stdin, the result on stdout).
It reads the zone lookup table from the tenant's state store over HTTP (persistent object
`etl-lookup/zones`), rejects bad records into the `etl-rejects` bucket with the reason, and
hands the clean ones on the way ETL_TRANSPORT says: `inline` (in its answer), `state` (in the
flow run's job in the state store; it answers a reference) or `s3` (beside its input, in the
folder of the operator's S3-compatible bucket that the previous stage's reference names). Only
the standard library is used.

The gateway gives each invocation SFAAS_STATE_URL, SFAAS_STATE_TOKEN and, within a flow run,
SFAAS_JOB. The rules (first failing one wins) match stateful_faas_core::etl::expected.
Run it with `python3 -S`: it needs nothing outside the standard library.
"""
import json
import os
import re
import socket
import sys
import time

DECIMAL = re.compile(r"^-?[0-9]+\.[0-9]{2}$")
REQUIRED = ("trip_id", "ts", "zone", "distance_km", "fare", "passengers")
INTEGERS = ("trip_id", "ts", "zone", "passengers")

STATE = os.environ["SFAAS_STATE_URL"]
TOKEN = os.environ["SFAAS_STATE_TOKEN"]
JOB = os.environ.get("SFAAS_JOB")
TRANSPORT = os.environ.get("ETL_TRANSPORT", "inline")


def http(method, url, data=None, auth=True):
    """One plain-HTTP/1.1 request (urllib and http.client take 50-60 ms to import, more than the
    work of a small batch, and every invocation is a new process). Requests to S3 (`auth=False`)
    are tried three times on 500 and 503, as S3's own clients do: S3 answers them for transient
    faults and asks for a retry."""
    for attempt in range(3 if not auth else 1):
        status, content = request(method, url, data, auth)
        if status not in (500, 503):
            break
        time.sleep(0.05 * (attempt + 1))
    if status >= 300:
        raise SystemExit(f"{method} {url}: HTTP {status}: {content[:200]!r}")
    return content


def request(method, url, data, auth):
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    body = data or b""
    head = f"{method} /{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    if auth:
        head += f"Authorization: Bearer {TOKEN}\r\n"
    with socket.create_connection((host, int(port or 80)), timeout=30) as connection:
        connection.sendall(head.encode() + b"\r\n" + body)
        chunks = []
        while chunk := connection.recv(1 << 20):
            chunks.append(chunk)
    response = b"".join(chunks)
    header, _, content = response.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in header.lower():
        content = dechunk(content)
    return status, content


def dechunk(data):
    out, rest = [], data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2:]
    return b"".join(out)


def job_object(key):
    if not JOB:
        raise SystemExit("ETL_TRANSPORT=state needs a flow run (SFAAS_JOB)")
    return f"{STATE}/jobs/{JOB}/buckets/etl/objects/{key}"


def receive(body):
    """The input data, fetched if the previous stage passed a reference."""
    ref = json.loads(body) if len(body) < 4096 else None
    if not isinstance(ref, dict) or "ref" not in ref:
        return body
    if ref["ref"] == "state":
        return http("GET", job_object(ref["key"]) + "?delete_after_read=true")
    data = http("GET", ref["url"], auth=False)
    http("DELETE", ref["url"], auth=False)
    global S3_FOLDER
    S3_FOLDER = ref["url"].rsplit("/", 2)[0]
    return data


# The namespace's folder in the S3 bucket, learned from the reference this stage received.
S3_FOLDER = None


def send(stage, data, batch):
    if TRANSPORT == "inline":
        return data
    if TRANSPORT == "state":
        http("PUT", job_object(stage), data)
        return json.dumps({"ref": "state", "key": stage}).encode()
    if TRANSPORT == "s3":
        if S3_FOLDER is None:
            raise SystemExit("ETL_TRANSPORT=s3 needs its input as an S3 reference")
        url = f"{S3_FOLDER}/{batch}/{stage}"
        http("PUT", url, data, auth=False)
        return json.dumps({"ref": "s3", "url": url}).encode()
    raise SystemExit(f"ETL_TRANSPORT {TRANSPORT!r}: use inline, state or s3")


def judge(record, zones):
    """The reason to reject a record, or None."""
    if any(field not in record for field in REQUIRED):
        return "missing_field"
    if any(not isinstance(record[f], int) or isinstance(record[f], bool) for f in INTEGERS):
        return "bad_value"
    if any(not isinstance(record[f], str) or not DECIMAL.match(record[f]) for f in ("distance_km", "fare")):
        return "bad_value"
    if record["distance_km"].startswith("-"):
        return "negative_distance"
    if record["fare"].startswith("-"):
        return "negative_fare"
    if record["passengers"] < 1:
        return "no_passengers"
    if str(record["zone"]) not in zones:
        return "unknown_zone"
    return None


def main():
    batch = json.loads(receive(sys.stdin.buffer.read()))
    zones = json.loads(http("GET", f"{STATE}/buckets/etl-lookup/objects/zones"))
    clean, rejects = [], []
    for record in batch["records"]:
        reason = judge(record, zones)
        if reason:
            rejects.append({"stage": "clean", "reason": reason, "record": json.dumps(record)})
            batch["rejected"][reason] = batch["rejected"].get(reason, 0) + 1
        else:
            record["borough"] = zones[str(record["zone"])]
            clean.append(record)
    if rejects:
        lines = "".join(json.dumps(r) + "\n" for r in rejects).encode()
        http("PUT", f"{STATE}/buckets/etl-rejects/objects/{batch['batch']}.clean?persist=true", lines)
    batch["records"] = clean
    sys.stdout.buffer.write(send("clean", json.dumps(batch).encode(), batch["batch"]))


main()
