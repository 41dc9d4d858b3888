# shellcheck shell=bash disable=SC2154  # bin, dir and trace are the caller's
# The emulated testbed of scripts/testbed, for it and for the scripts that run on it (sourced, not
# run): its addresses, and what bench-relay and bench-relay-faults do on it: wait until every
# node's vmtd knows its peers, and start a boot-trace replay on every node at one instant. Uses
# the caller's bin (where vmt is), dir (the testbed's directory) and trace (the trace replayed),
# and common.sh.

net=10.77.0

# testbed_lock: waits (30 min at most) until no other script on this machine uses the testbed,
# then holds it until this script exits. Its names (vmtb-*) are fixed, so two testbeds at once
# (say two test runs side by side) would collide. The lock is fd 9, which the testbed's daemons
# do not inherit (scripts/testbed closes it for them).
testbed_lock() {
  exec 9>/run/lock/vmthunder-testbed.lock
  if ! flock -n 9; then
    echo "$me: waiting for another user of the testbed to finish" >&2
    flock -w 1800 9 || { echo "$me: the testbed stayed in use for 30 minutes" >&2; exit 1; }
  fi
}
# shellcheck disable=SC2034  # for the callers
origin_ip=$net.1 tracker_ip=$net.2
node_ip() { echo "$net.$((10 + $1))"; }

# node_ready NODE WANT: node NODE's vmtd serves image "img" and, unless WANT is 0, knows at least
# WANT peers.
node_ready() {
  { "$bin/vmt" --socket "$dir/n$1/run/control.sock" status --json | python3 -c '
import json, sys
want = int(sys.argv[1])
img = [i for i in json.load(sys.stdin) if i["name"] == "img"]
sys.exit(0 if img and ("peers" not in img[0] or want == 0 or img[0]["peers"] >= want) else 1)' "$2"; } 2>/dev/null
}
# wait_nodes_ready N WANT: waits, up to 60 s a node, until nodes 1 to N are node_ready.
wait_nodes_ready() {
  local i
  for ((i = 1; i <= $1; i++)); do
    wait_for "node $i's vmtd to serve img and know its $2 peers" 60 node_ready "$i" "$2"
  done
}

# start_time N: a wall-clock time (seconds since the epoch) late enough for N replays to have
# connected first: 2 s and 0.15 s a node from now.
start_time() {
  local margin
  margin=$(awk -v n="$1" 'BEGIN {printf "%.1f", 2 + n * 0.15}')
  awk -v now="$(date +%s.%N)" -v m="$margin" 'BEGIN {printf "%.3f", now + m}'
}
# sleep_until T [BASE]: sleeps until the wall-clock time BASE + T (without BASE, T is the time).
sleep_until() {
  sleep "$(awk -v t="$1" -v s="${2:-0}" -v now="$(date +%s.%N)" 'BEGIN {d = s + t - now; printf "%.3f", (d > 0 ? d : 0)}')"
}

# replay_on NODE EXPORT SCALE FROM START_AT OUT [ADDED_US]: in the background (its pid in
# replay_pid), node NODE replays $trace against EXPORT from FROM s into the trace, think times ×
# SCALE, starting at the wall-clock time START_AT, each burst ADDED_US µs slower (a dilated
# testbed's stretch of a local read; 0 by default); its JSON report goes to OUT.json, its errors
# to OUT.err.
replay_on() {
  ip netns exec "vmtb-n$1" timeout 600 "$bin/vmt" bench replay --trace "$trace" --export "$2" \
    --scale "$3" --from "$4" --start-at "$5" --added-latency-us "${7:-0}" \
    --timeout "$(awk -v k="${dilate:-1}" 'BEGIN { print 30 * k }')" --json </dev/null >"$6.json" 2>"$6.err" &
  # shellcheck disable=SC2034  # for the caller
  replay_pid=$!
}
