#!/bin/sh
# `make demo`: a local cluster of two masters and two slaves on 127.0.0.1, made the way an
# operator makes one (init, token create, join, run --data-dir). Ctrl-C stops it all.
set -eu
MESHMAIL=${MESHMAIL:-.venv/bin/meshmail}
ROOT=$(mktemp -d /tmp/meshmail-demo.XXXXXX)
PIDS=""
stop() {
    trap - INT TERM EXIT
    for pid in $PIDS; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "demo stopped; its files stay in $ROOT"
}
trap stop INT TERM EXIT

head -c 12 /dev/urandom | base64 > "$ROOT/admin-password"
chmod 600 "$ROOT/admin-password"
run() {  # name: start `meshmail run` for the node in $ROOT/name
    "$MESHMAIL" run --data-dir "$ROOT/$1" 2> "$ROOT/$1.log" &
    PIDS="$PIDS $!"
    sleep 1
}
at() {  # n: the placement options of node number n
    echo --bind 127.0.0.1 --gossip-port $((17945 + $1)) --http-port $((18442 + $1))
}

"$MESHMAIL" init --name demo --node-name m1 --data-dir "$ROOT/m1" $(at 1) --admin-password-file "$ROOT/admin-password"
run m1
TOKEN=$("$MESHMAIL" token create --role master --quiet --data-dir "$ROOT/m1")
"$MESHMAIL" join "$TOKEN" --role master --name m2 --data-dir "$ROOT/m2" $(at 2)
TOKEN=$("$MESHMAIL" token create --role slave --uses 2 --note demo --quiet --data-dir "$ROOT/m1")
"$MESHMAIL" join "$TOKEN" --role slave --name s1 --data-dir "$ROOT/s1" $(at 3)
"$MESHMAIL" join "$TOKEN" --role slave --name s2 --data-dir "$ROOT/s2" $(at 4)
for node in m2 s1 s2; do run $node; done
sleep 2
"$MESHMAIL" domains assign example.com s1 --data-dir "$ROOT/m1"
"$MESHMAIL" status --data-dir "$ROOT/m2"
cat <<INFO

meshmail demo cluster in $ROOT (logs: $ROOT/*.log)
  admin API of m1: https://127.0.0.1:18443/login   account admin, password $(cat "$ROOT/admin-password")
                   (certificate from the demo's own CA: $ROOT/m1/ca.pem)
  try:  $MESHMAIL status --data-dir $ROOT/s1
        $MESHMAIL route user@example.com --data-dir $ROOT/m2
        $MESHMAIL keyring rotate --data-dir $ROOT/m1
        $MESHMAIL token list --data-dir $ROOT/m1
Ctrl-C stops the cluster.
INFO
wait
