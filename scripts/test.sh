#!/usr/bin/env bash
# npm test: everything a fresh Debian 12 machine needs, then lint, typecheck and every test
# (unit, protocol, systemd, real-guest end-to-end). Idempotent steps are quick when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
  bash scripts/install-deps.sh
else
  echo "test: not root, assuming scripts/install-deps.sh has been run" >&2
fi
[ -x node_modules/.bin/ava ] || npm install --no-audit --no-fund
[ -f native/build/Release/vhostd_native.node ] || npm run build:native
npm run build:ts
npm run lint
bash scripts/build-guest-image.sh >/dev/null
# QEMU 10.2 for the balloon's real-guest tests (built once into the cache, about 10 minutes; then
# instant). A failed build does not stop the run: those tests report why (and fail under CI).
if [ -z "${VHOSTD_QEMU_10_2:-}" ]; then
  if qemu102=$(bash scripts/qemu-10.2.sh 2>"${TMPDIR:-/tmp}/vhostd-qemu-10.2.log" | tail -n 1) && [ -n "$qemu102" ]; then
    export VHOSTD_QEMU_10_2=$qemu102
  else
    export VHOSTD_QEMU_10_2_ERROR="scripts/qemu-10.2.sh failed: $(tail -n 3 "${TMPDIR:-/tmp}/vhostd-qemu-10.2.log" | tr '\n' ' ')"
    echo "test: $VHOSTD_QEMU_10_2_ERROR" >&2
  fi
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
npx ava "$@" 2>&1 | tee "$log" || status=$?
plain=$(sed 's/\x1b\[[0-9;]*m//g' "$log")
# ava's closing "N tests failed / N known failures / N tests skipped" lines, 0 when absent.
total() { grep -Eo "^ *[0-9]+ (tests? )?$1" <<<"$plain" | grep -Eo '[0-9]+' | tail -n 1 || echo 0; }
# ava prints "N tests passed" only when nothing failed: count the per-test lines instead. A known
# failure (test.failing) shows as "✔ [expected fail]"; it and a skip are not passes.
passed=$(grep -E '^ *✔ ' <<<"$plain" | grep -cv '✔ \[expected fail\]' || true)
# The plain closing line CI reads, whatever the reporter printed above it.
echo "ava: ${passed} passed, $(total failed) failed, $(total 'known failures?') known failures, $(total skipped) skipped"
exit "$status"
