#!/bin/sh
# The container image's one entrypoint (deploy/docker/Dockerfile, docs/deploy.md):
#
#   relay [twistd relay options]       a relay node; RELAY_* variables become its options
#   tunnel-client COMMAND [options]    the agent; TUNNEL_RELAY, TUNNEL_TOKEN_FILE, TUNNEL_CA
#                                      as tunnel-client reads them, TUNNEL_METRICS_PORT too
#   healthcheck [relay|agent]          the image's HEALTHCHECK (default: $TUNNEL_HEALTHCHECK, else relay)
#   anything else                      run as given (relay-admin, sh, ...)
#
# Options given on the command line win over the variables: the variables'
# options go first, and twistd and argparse keep the last of a repeated option.
# Every command is exec'd, so it is PID 1's child no longer: signals (docker
# stop's SIGTERM) reach it directly.
set -eu

here=$(dirname "$0")

relay() {
  # option name -> RELAY_<NAME> (dashes as underscores, upper case); RELAY_STATE_DIR
  # and RELAY_INTERFACE below, with the container's own defaults
  for name in agent-port agent-interface tls-port domain cert key cert-check-seconds \
              admin-port admin-interface admin-allowed-hosts ports public-host \
              grace-seconds port-quarantine-seconds keepalive-interval keepalive-timeout \
              handshake-timeout tokens-check-seconds log-format config; do
    var=RELAY_$(printf '%s' "$name" | tr 'a-z-' 'A-Z_')
    eval "value=\${$var:-}"
    if [ -n "$value" ]; then
      set -- "--$name=$value" "$@"
    fi
  done
  # In a container the public ports and the agent port face the network
  # (publish them with -p); the admin port stays on loopback (--admin-interface).
  set -- "--state-dir=${RELAY_STATE_DIR:-/var/lib/tunnel-relay}" "--interface=${RELAY_INTERFACE:-0.0.0.0}" "$@"
  exec twistd --nodaemon --pidfile= relay "$@"
}

agent() {
  if [ $# -eq 0 ]; then
    echo "tunnel-entrypoint: tunnel-client needs a command, e.g. tunnel-client forward web:8000" >&2
    exit 2
  fi
  command=$1
  shift
  if [ -n "${TUNNEL_METRICS_PORT:-}" ]; then
    set -- "--metrics-port=$TUNNEL_METRICS_PORT" "$@"
  fi
  case "$command" in
    forward|expose) set -- "$command" --no-console "$@" ;;  # a container's stdout is a log, not a person
    *) set -- "$command" "$@" ;;
  esac
  exec tunnel-client "$@"
}

case "${1:-relay}" in
  relay) if [ $# -gt 0 ]; then shift; fi; relay "$@" ;;
  tunnel-client|agent) shift; agent "$@" ;;
  healthcheck) shift; exec python3 "$here/healthcheck.py" "$@" ;;
  *) exec "$@" ;;
esac
