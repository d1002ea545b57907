#!/usr/bin/env bash
# Make a Docker engine available on a Debian host without one (a CI box, a dev VM):
#   images/local/docker-engine.sh start   install docker.io + debootstrap if missing, start dockerd
#                                         if no daemon answers; prints "started <pid>" or "running"
#   images/local/docker-engine.sh stop    stop the dockerd this script started (by its PID file)
# dockerd runs without its bridge network and iptables rules: builds use --network host and the
# image tests run with --network none, so neither is needed, and both fail in many sandboxes.
set -euo pipefail
PIDFILE=${MEDCRITICAL_DOCKERD_PIDFILE:-/tmp/medcritical-dockerd.pid}
LOG=${MEDCRITICAL_DOCKERD_LOG:-/tmp/medcritical-dockerd.log}

start() {
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
    fi
    if docker info >/dev/null 2>&1; then
        echo running
        return
    fi
    nohup dockerd --iptables=false --ip6tables=false --bridge=none >"$LOG" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 60); do
        if docker info >/dev/null 2>&1; then
            echo "started $(cat "$PIDFILE")"
            return
        fi
        sleep 1
    done
    echo "dockerd did not come up; see $LOG" >&2
    tail -20 "$LOG" >&2
    exit 1
}

stop() {
    [ -f "$PIDFILE" ] || { echo "no $PIDFILE: nothing started here"; return; }
    pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    rm -f "$PIDFILE"
    echo "stopped $pid"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
