#!/usr/bin/env bash
# A Ray head on this machine for `ray job submit`: every listener on 127.0.0.1, token authentication on.
#
#   cluster/local-head.sh start [more `ray start` flags]   # prints the address to submit to
#   cluster/local-head.sh status
#   cluster/local-head.sh stop
#
# Start it from the environment the jobs should run in: a submitted job's `python` is the one on the head's PATH.
# AUDIODIFF_HEAD_DIR holds its pid, log and Ray's temp dir: a folder only you can enter (mode 0700, yours, not a link;
# one that is not is refused, so a name another user made first is never trusted), by default
# $XDG_RUNTIME_DIR/audiodiff-head, else ${TMPDIR:-/tmp}/audiodiff-head-$UID (short: Ray's unix socket paths end
# 68 characters below it, of 107). AUDIODIFF_DASHBOARD_PORT (default 8265) is the dashboard and job API
# port. The token is Ray's own: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (made here if none is set).
set -euo pipefail
umask 077  # the state folder, the log and Ray's files are the user's alone

if [[ -n "${AUDIODIFF_HEAD_DIR:-}" ]]; then
  state="$(realpath -m "$AUDIODIFF_HEAD_DIR")"
elif [[ -d "${XDG_RUNTIME_DIR:-}" ]]; then
  state="$XDG_RUNTIME_DIR/audiodiff-head"
else
  state="${TMPDIR:-/tmp}/audiodiff-head-$(id -u)"
fi
address="http://127.0.0.1:${AUDIODIFF_DASHBOARD_PORT:-8265}"
# Without this Ray swaps 127.0.0.1 for the machine's other address; with it nothing leaves loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE=token

# The state folder, made if need be; refused unless it is a folder (not a link) of this user's that only they can
# enter: everything `stop` kills is named by the pid kept there.
private_state() {
  mkdir -p "$state"
  if [[ -L "$state" || ! -d "$state" || "$(stat -c %u "$state")" != "$(id -u)" ]] \
     || (( 8#$(stat -c %a "$state") & 8#077 )); then
    echo "$state: not a folder of yours that only you can enter ($(stat -c '%A, owner %U' "$state")); remove it," \
      "or set AUDIODIFF_HEAD_DIR to a folder of your own with mode 0700" >&2
    exit 1
  fi
}

# The head this script started from $state: the pid kept there is alive, runs as this user, leads its own session,
# and is `ray start --head` with this folder's temp dir (a reused pid is not ours to end).
running() {
  [[ -f "$state/head.pid" ]] || return 1
  local pid
  pid="$(cat "$state/head.pid")"
  [[ "$pid" =~ ^[0-9]+$ && -n "$(alive "$pid")" ]] || return 1
  [[ "$(ps -o uid= -p "$pid" | tr -d ' ')" == "$(id -u)" && "$(ps -o sid= -p "$pid" | tr -d ' ')" == "$pid" ]] \
    || return 1
  [[ "$(ps -o args= -p "$pid")" == *"ray start --head"*"--temp-dir=$state/ray"* ]]
}

# Those of the given pids that still run (a zombie has finished; where pid 1 does not reap, they stay).
alive() {
  local IFS=,
  ps -o pid=,stat= -p "$*" 2>/dev/null | awk '$2 !~ /^Z/ { print $1 }' || true
}

# The head's session and all descendants of its processes (job drivers run in sessions of their own), this user's only.
session_tree() {
  ps -eo pid=,ppid=,sid=,uid= | awk -v sid="$1" -v uid="$(id -u)" '
    $4 != uid { next }
    { parent[$1] = $2; if ($3 == sid) tree[$1] = 1 }
    END {
      do { grew = 0; for (p in parent) if (!(p in tree) && (parent[p] in tree)) { tree[p] = 1; grew = 1 } } while (grew)
      for (p in tree) print p
    }'
}

start() {
  if running; then
    echo "a head is already running from $state (session $(cat "$state/head.pid")); stop it first" >&2
    exit 1
  fi
  if [[ -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ]]; then ray get-auth-token --generate >/dev/null; fi
  # A session of its own, so that `stop` ends exactly these processes (never `ray stop`, which ends any Ray). No drain
  # on SIGTERM: it waits for a node with idle workers to go idle, the whole of `stop`'s wait (it is for Serve's
  # replicas). Ray Train's controller checks its workers every 0.5 s and starts no preemption watcher (this machine's
  # nodes are not preempted), as a local Ray's (audiodiff.runtime).
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5 RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 \
    setsid ray start --head --block --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
    --dashboard-port="${address##*:}" --temp-dir="$state/ray" --disable-usage-stats "$@" >"$state/head.log" 2>&1 &
  echo $! >"$state/head.pid"
  local deadline=$((SECONDS + 120))
  until ray job list --address "$address" >/dev/null 2>&1; do
    if ! running || ((SECONDS > deadline)); then
      echo "the Ray head did not come up; its log, $state/head.log, ends with:" >&2
      tail -n 20 "$state/head.log" >&2
      stop >/dev/null
      exit 1
    fi
    sleep 1
  done
  echo "Ray head up: ray job submit --address $address ... (log: $state/head.log)"
}

# Up to $1 half-seconds for the processes in the caller's `pids` to end; `pids` keeps those still running.
wait_gone() {
  for _ in $(seq "$1"); do
    mapfile -t pids < <(alive "${pids[@]}")
    ((${#pids[@]})) || return 0
    sleep 0.5
  done
}

stop() {
  if ! running; then
    rm -f "$state/head.pid"
    echo "no head running from $state"
    return
  fi
  local head pids
  head="$(cat "$state/head.pid")"
  mapfile -t pids < <(session_tree "$head")
  # `ray start --block` stops its node's processes in order (in about 3 s); TERMed all at once, Ray's GCS and raylet
  # wait for each other the whole 15 s
  kill -TERM "$head" 2>/dev/null || true
  wait_gone 30
  if ((${#pids[@]})); then
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait_gone 20  # SIGKILL is not instant on a loaded machine: nothing outlives `stop`
  fi
  rm -f "$state/head.pid"
  echo "Ray head stopped (logs kept in $state)"
}

status() {
  if running; then
    echo "Ray head running: $address (session $(cat "$state/head.pid"), log $state/head.log)"
  else
    echo "no head running from $state"
    return 1
  fi
}

command="${1:-}"
private_state
case "$command" in
  start) shift; start "$@" ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start [ray start flags] | status | stop" >&2; exit 2 ;;
esac
