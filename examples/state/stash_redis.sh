#!/bin/sh
# A shell exec function that stores its input in the state store over the Redis protocol and
# answers its size, using redis-cli: SET the body, keep it ten minutes, then STRLEN it.
set -eu
key="stash/${Http_X_Call_Id:-stash}"
cli() { redis-cli --no-auth-warning -u "$SFAAS_STATE_REDIS_URL" "$@"; }
cli -x SET "$key" >/dev/null
cli EXPIRE "$key" 600 >/dev/null
printf '{"key":"%s","stored_bytes":%s}\n' "$key" "$(cli STRLEN "$key")"
