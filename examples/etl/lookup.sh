#!/bin/sh
# Puts the zone lookup table into a tenant's state store (persistent object etl-lookup/zones).
# Usage: examples/etl/lookup.sh GATEWAY_URL TOKEN NAMESPACE
set -eu
curl -fsS -X PUT "$1/state/buckets/etl-lookup/objects/zones?persist=true" \
  -H "Authorization: Bearer $2" -H "X-Scope-OrgID: $3" \
  --data-binary @"$(dirname "$0")/zones.json"
