#!/usr/bin/env bash
# npm run demo: install what is missing, build, then boot a guest with every daemon attached.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then bash scripts/install-deps.sh; else echo "demo: not root, skipping scripts/install-deps.sh" >&2; fi
[ -d node_modules ] || npm install
[ -f native/build/Release/vhostd_native.node ] || npm run build:native
npm run build:ts
exec node build/scripts/demo.js
