"""redis-py against the state store's Redis protocol listener.

    redis_commands.py commands URL PROTOCOL   every command of the table, checked; prints "ok"
    redis_commands.py hold URL                authenticates, prints "ready", waits for a line on
                                              stdin, then sends GET and prints what came back

URL is redis://TENANT:TOKEN@HOST:PORT; PROTOCOL is 2 or 3.
"""
import sys
import time

import redis


def check(got, expected, what):
    if got != expected:
        raise AssertionError(f"{what}: got {got!r}, expected {expected!r}")


def error_of(call):
    try:
        call()
    except redis.ResponseError as error:
        return str(error)
    raise AssertionError("expected an error reply")


def commands(url, protocol):
    r = redis.Redis.from_url(url, protocol=protocol)
    check(r.ping(), True, "PING")
    check(r.echo("hi"), b"hi", "ECHO")
    check(r.set("plain", "v"), True, "SET")
    check(r.get("plain"), b"v", "GET")
    check(r.get("missing"), None, "GET of a missing key")
    check(r.set("plain", "w", nx=True), None, "SET NX on an existing key")
    check(r.set("fresh", "w", xx=True), None, "SET XX on a missing key")
    check(r.set("plain", "w", xx=True, get=True), b"v", "SET XX GET")
    check(r.set("b/ttl", "x", ex=100), True, "SET EX")
    check(r.ttl("b/ttl"), 100, "TTL")
    check(r.set("b/ttl", "y", keepttl=True), True, "SET KEEPTTL")
    check(0 < r.pttl("b/ttl") <= 100_000, True, "PTTL after KEEPTTL")
    check(r.set("b/px", "x", px=60_000), True, "SET PX")
    check(r.set("b/exat", "x", exat=int(time.time()) + 50), True, "SET EXAT")
    check(48 <= r.ttl("b/exat") <= 50, True, "TTL after EXAT")
    check(r.set("b/pxat", "x", pxat=int(time.time() * 1000) + 50_000), True, "SET PXAT")
    check(r.set("b/gone", "x", exat=1), True, "SET EXAT in the past")
    check(r.exists("b/gone"), 0, "a past expiry removes the key")
    check(r.getdel("b/px"), b"x", "GETDEL")
    check(r.exists("b/px"), 0, "GETDEL deleted")
    check(r.mset({"m/1": "1", "m/2": "2", "m/3": "3"}), True, "MSET")
    check(r.mget(["m/1", "missing", "m/3"]), [b"1", None, b"3"], "MGET")
    check(r.exists("m/1", "m/2", "missing", "m/1"), 3, "EXISTS counts repeats")
    check(r.delete("m/1", "missing"), 1, "DEL")
    check(r.unlink("m/2"), 1, "UNLINK")
    check(r.expire("m/3", 100), True, "EXPIRE")
    check(r.expire("m/3", 200, nx=True), False, "EXPIRE NX on a key with a TTL")
    check(r.expire("m/3", 50, gt=True), False, "EXPIRE GT with a smaller TTL")
    check(r.expire("m/3", 50, lt=True), True, "EXPIRE LT")
    check(r.pexpire("m/3", 30_000), True, "PEXPIRE")
    check(25 <= r.ttl("m/3") <= 30, True, "TTL after PEXPIRE")
    check(r.expireat("m/3", int(time.time()) + 40), True, "EXPIREAT")
    check(r.pexpireat("m/3", int(time.time() * 1000) + 40_000), True, "PEXPIREAT")
    check(r.persist("m/3"), True, "PERSIST")
    check(r.ttl("m/3"), -1, "TTL without expiry")
    check(r.ttl("missing"), -2, "TTL of a missing key")
    check(r.strlen("plain"), 1, "STRLEN")
    check(r.append("plain", "xyz"), 4, "APPEND")
    check(r.get("plain"), b"wxyz", "GET after APPEND")
    check(r.incr("n"), 1, "INCR of a missing key")
    check(r.incrby("n", 41), 42, "INCRBY")
    check(r.decr("n"), 41, "DECR")
    check(r.decrby("n", 1), 40, "DECRBY")
    check("not an integer" in error_of(lambda: r.incr("plain")), True, "INCR of text")
    r.set("big", str(2**63 - 1))
    check("overflow" in error_of(lambda: r.incr("big")), True, "INCR overflow")
    check(r.type("n"), b"string", "TYPE")
    check(r.type("missing"), b"none", "TYPE of a missing key")
    for i in range(25):
        r.set(f"scan/{i}", i)
    keys = set(r.scan_iter(match="scan/*", count=4))
    check(keys, {f"scan/{i}".encode() for i in range(25)}, "SCAN MATCH COUNT")
    check(sorted(r.keys("scan/1*")), sorted(f"scan/{i}".encode() for i in [1] + list(range(10, 20))), "KEYS")
    check(r.dbsize(), len(r.keys("*")), "DBSIZE")
    info = r.info()
    check(info["redis_version"], "7.0.0", "INFO server")
    check(info["db0"]["keys"], r.dbsize(), "INFO keyspace")
    check(isinstance(r.client_id(), int), True, "CLIENT ID")
    check(r.client_setname("worker-1"), True, "CLIENT SETNAME")
    check(r.client_getname() in ("worker-1", b"worker-1"), True, "CLIENT GETNAME")
    check(r.command_count() >= 30, True, "COMMAND COUNT")
    check(r.command()["get"]["arity"], 2, "COMMAND")
    check(r.execute_command("SELECT", 0) in (True, b"OK", "OK"), True, "SELECT 0")
    check("out of range" in error_of(lambda: r.execute_command("SELECT", 1)), True, "SELECT 1")
    check("unknown command 'LPUSH'" in error_of(lambda: r.lpush("l", 1)), True, "unknown commands")
    check("invalid key" in error_of(lambda: r.set("a/b/c", 1)), True, "a key with two slashes")
    # Jobs: registered, used by key prefix, persistent keys outlive the job.
    check(r.execute_command("SFAAS.REGISTER", "run-7") in (True, b"OK", "OK"), True, "SFAAS.REGISTER")
    check(r.set("{job:run-7}out/a", "kept"), True, "SET of a job's key")
    check(r.set("{job:run-7}out/b", "dropped"), True, "SET of a job's key")
    check(r.execute_command("SFAAS.PERSIST", "{job:run-7}out/a"), 1, "SFAAS.PERSIST")
    byte_seconds = r.execute_command("SFAAS.DEREGISTER", "run-7")
    check(b"." in byte_seconds, True, "SFAAS.DEREGISTER answers exact decimal byte-seconds")
    check(r.get("{job:run-7}out/a"), b"kept", "a persistent key outlives its job")
    check(r.get("{job:run-7}out/b"), None, "a job's other keys end with it")
    check("not registered" in error_of(lambda: r.set("{job:nope}b/k", 1)), True, "a job must be registered")
    # A pipeline: replies in order, errors in place.
    pipe = r.pipeline(transaction=False)
    for i in range(100):
        pipe.set(f"pipe/{i}", i)
    pipe.incr("plain")
    pipe.get("pipe/99")
    replies = pipe.execute(raise_on_error=False)
    check(replies[:100], [True] * 100, "pipelined SETs")
    check(isinstance(replies[100], redis.ResponseError), True, "an error in a pipeline stays in place")
    check(replies[101], b"99", "pipelined GET after an error")
    print("ok")


def hold(url):
    r = redis.Redis.from_url(url, single_connection_client=True)
    r.ping()
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        print(r.get("plain"))
    except redis.exceptions.RedisError as error:
        print(f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    if sys.argv[1] == "commands":
        commands(sys.argv[2], int(sys.argv[3]))
    else:
        hold(sys.argv[2])
