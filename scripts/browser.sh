#!/usr/bin/env bash
# The headless browser that the browser tests (tests/browser) drive: Debian's chromium and its chromedriver.
#
#   scripts/browser.sh check     # exit 0 when chromium and a chromedriver of the same major version run, else
#                                # print why and exit 1; changes nothing
#   scripts/browser.sh ensure    # apt-get install chromium chromium-driver when either is missing (root)
#
# KFP_MLOPS_CHROMIUM and KFP_MLOPS_CHROMEDRIVER name other binaries (default: chromium and chromedriver on PATH);
# the tests read the same two variables. `make test BROWSER=require` (CI) runs ensure before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMIUM=${KFP_MLOPS_CHROMIUM:-chromium}
CHROMEDRIVER=${KFP_MLOPS_CHROMEDRIVER:-chromedriver}

say() { echo "browser.sh: $*" >&2; }
fail() { say "$*"; exit 1; }

# The first number of a `--version` line ("Chromium 156.0.8078.129 built on Debian" -> 156).
major_version() { "$1" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9.]+' | head -n 1 | cut -d. -f1; }

why_not() {
    command -v "$CHROMIUM" >/dev/null || { echo "no $CHROMIUM (Debian package chromium)"; return; }
    command -v "$CHROMEDRIVER" >/dev/null || { echo "no $CHROMEDRIVER (Debian package chromium-driver)"; return; }
    local browser driver
    browser=$(major_version "$CHROMIUM") || true
    driver=$(major_version "$CHROMEDRIVER") || true
    [ -n "$browser" ] || { echo "$CHROMIUM --version does not answer"; return; }
    [ -n "$driver" ] || { echo "$CHROMEDRIVER --version does not answer"; return; }
    # chromedriver drives only its own major version of the browser.
    [ "$browser" = "$driver" ] || echo "$CHROMIUM is version $browser but $CHROMEDRIVER drives version $driver"
}

check() {
    local why
    why=$(why_not)
    [ -z "$why" ] && return 0
    echo "$why"
    return 1
}

ensure() {
    check >/dev/null && { echo "a browser for the tests: $("$CHROMIUM" --version 2>/dev/null)"; return 0; }
    [ "$(id -u)" -eq 0 ] || fail "$(why_not); installing needs root: sudo apt-get install chromium chromium-driver"
    say "apt-get install chromium chromium-driver"
    apt-get update -q >/dev/null
    # Installed together, so the driver matches the browser's version.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
    local why
    why=$(why_not)
    [ -z "$why" ] || fail "after apt-get install: $why"
    echo "a browser for the tests: $("$CHROMIUM" --version 2>/dev/null)"
}

case "${1:-}" in
    ensure) ensure ;;
    check) check ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) say "usage: $0 ensure|check (see --help)"; exit 2 ;;
esac
