#!/usr/bin/env bash
# npm run demo: install what is missing, build, then boot a guest with every daemon attached.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then bash scripts/install-deps.sh; else echo "demo: not root, skipping scripts/install-deps.sh" >&2; fi
[ -d node_modules ] || npm install
[ -f native/build/Release/vhostd_native.node ] || npm run build:native
npm run build:ts
# The balloon's front-end exists only in QEMU 10.2: built once into the cache (about 10 minutes, its
# progress shows here); if that fails the demo runs the other daemons on the system QEMU and says why.
if [ -z "${VHOSTD_QEMU_10_2:-}" ] && [ -z "${VHOSTD_QEMU:-}" ]; then
  if qemu102=$(bash scripts/qemu-10.2.sh | tail -n 1) && [ -n "$qemu102" ]; then
    export VHOSTD_QEMU_10_2=$qemu102
  else
    export VHOSTD_QEMU_10_2_ERROR="scripts/qemu-10.2.sh failed (its messages are above)"
  fi
fi
exec node build/scripts/demo.js
