#!/usr/bin/env bash
# Set everything up, then run Coffer on its embedded defaults: SMTP on 127.0.0.1:2525,
# delivering to a Maildir under the data directory (./data unless COFFER_DATA says otherwise).
# The first run writes a working configuration with `coffer init` (local domain example.test,
# or COFFER_DOMAIN); later runs reuse it.  Extra arguments are passed on to `coffer serve`.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

"$repo/scripts/setup.sh"

data=${COFFER_DATA:-data}
domain=${COFFER_DOMAIN:-example.test}
coffer="$repo/.venv/bin/coffer"

if [ ! -f "$data/coffer.yaml" ]; then
    echo "run-gateway: writing a new configuration into $data/ (local domain $domain)" >&2
    "$coffer" init "$data" --domain "$domain"
fi

echo "run-gateway: starting Coffer with $data/coffer.yaml (Ctrl-C stops it)" >&2
exec "$coffer" serve --config "$data/coffer.yaml" "$@"
