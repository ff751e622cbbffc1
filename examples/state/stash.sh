#!/bin/sh
# A shell exec function that stores its input in the state store and answers its size,
# using curl: PUT the body, then HEAD it for the size the store holds.
set -eu
key="${Http_X_Call_Id:-stash}"
url="$SFAAS_STATE_URL/buckets/stash/objects/$key?ttl=10m"
curl -sf -X PUT -H "Authorization: Bearer $SFAAS_STATE_TOKEN" --data-binary @- "$url" >/dev/null
size=$(curl -sfI -H "Authorization: Bearer $SFAAS_STATE_TOKEN" "$SFAAS_STATE_URL/buckets/stash/objects/$key" \
  | tr -d '\r' | awk -F': ' 'tolower($1) == "content-length" { print $2 }')
printf '{"key":"%s","stored_bytes":%s}\n' "$key" "$size"
