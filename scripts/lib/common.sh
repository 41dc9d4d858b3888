# shellcheck shell=bash
# Shared set-up of vmthunder's scripts (sourced, not run): logging, tools, waiting on a condition,
# stopping a process, showing logs, usage, reading `vmt status`, a qemu-nbd origin behind a
# shaped link, libvirt, and guest domains. Callers `set -euo pipefail` and define `me` (their name, for messages) before
# sourcing.

log() { echo "${me:-vmthunder}: $*" >&2; }
die() { log "$*"; exit 1; }

# need TOOL...: dies unless every TOOL is on the PATH.
need() {
  local t
  for t in "$@"; do command -v "$t" >/dev/null || die "$t not found (run scripts/setup)"; done
}

# usage: prints the caller's usage, its header comment from the line `#   scripts/$me` to the
# next line `#`, to stderr and exits 2.
usage() { sed -n "\\|^#   scripts/$me|,/^#\$/p" "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# wait_for [--pid PID] [--log FILE] WHAT SECS CMD...: runs CMD every $wait_step seconds (0.2 unless
# the caller sets another) until it succeeds; dies if it did not within SECS seconds or, with
# --pid, as soon as process PID has exited. --log: shows FILE's last lines before dying.
wait_step=0.2
wait_for() {
  local pid='' file='' what secs t0=$SECONDS
  while :; do
    case $1 in
      --pid) pid=$2; shift 2 ;;
      --log) file=$2; shift 2 ;;
      *) break ;;
    esac
  done
  what=$1 secs=$2
  shift 2
  until "$@"; do
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      [ -z "$file" ] || tail_logs 20 "$file"
      die "$what: process $pid exited"
    fi
    if [ $((SECONDS - t0)) -ge "$secs" ]; then
      [ -z "$file" ] || tail_logs 20 "$file"
      die "$what: not within ${secs}s"
    fi
    sleep "$wait_step"
  done
}

# stop_pid PID [SECS]: SIGTERM, up to SECS seconds (10) for PID to exit, then SIGKILL (reported);
# reaps PID when it is this shell's child.
stop_pid() {
  local pid=$1 secs=${2:-10} i
  if kill -TERM "$pid" 2>/dev/null; then
    for ((i = 0; i < secs * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid ignored SIGTERM for $secs s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}

# tail_logs LINES FILE...: the last LINES lines of every FILE that is not empty, each under a
# header line, to stderr.
tail_logs() {
  local lines=$1 f
  shift
  for f in "$@"; do
    [ -s "$f" ] || continue
    echo "--- last lines of $(basename "$f") ---" >&2
    tail -n "$lines" "$f" >&2
  done
}

# image_field IMAGE KEY: one value of image IMAGE in the `vmt status --json` on stdin, a dotted
# KEY for a nested one ("prefetch.done_chunks"); "-" when absent, booleans as true or false.
image_field() {
  python3 -c '
import json, sys
v = next(i for i in json.load(sys.stdin) if i["name"] == sys.argv[1])
for k in sys.argv[2].split("."):
    v = v.get(k) if isinstance(v, dict) else None
print("-" if v is None else str(v).lower() if isinstance(v, bool) else v)' "$1" "$2"
}

# A network namespace joined to the host by a veth pair in a /30 of 10.214.0.0/16 that nothing on
# the host uses yet (the host's end .1, the namespace's .2), shaped with tc tbf at RATE on both
# ends, so in both directions (an image server behind a node's link). origin_link NAME RATE sets
# origin_ns (NAME), origin_veth (the host's side; the namespace's side is eth0) and origin_addr
# (the namespace's address). origin_up NAME RATE FILE [LOG] also serves FILE read-only as export
# "img" with qemu-nbd in the namespace (its stderr to LOG, /dev/null by default) and sets
# origin_uri and origin_pid. origin_down removes it all (idempotent, for traps).
origin_ns='' origin_veth='' origin_addr='' origin_uri='' origin_pid=''
origin_link() {
  local name=$1 rate=$2 x i subnet=''
  for ((x = $$ % 250 + 1, i = 0; i < 250; i++, x = x % 250 + 1)); do
    if ! ip -4 addr show | grep -q "inet 10\.214\.$x\." && ! ip -4 route show | grep -q "^10\.214\.$x\."; then
      subnet=10.214.$x
      break
    fi
  done
  [ -n "$subnet" ] || die "no free 10.214.X.0/30 subnet on this host"
  origin_ns=$name origin_veth=${name:0:12}h origin_addr=$subnet.2
  ip netns add "$origin_ns"
  ip link add "$origin_veth" type veth peer name eth0 netns "$origin_ns"
  ip addr add "$subnet.1/30" dev "$origin_veth"
  ip link set "$origin_veth" up
  ip -n "$origin_ns" addr add "$origin_addr/30" dev eth0
  ip -n "$origin_ns" link set eth0 up
  ip -n "$origin_ns" link set lo up
  # Shaping egress on both ends shapes both directions: requests and replies.
  tc qdisc add dev "$origin_veth" root tbf rate "$rate" burst 128kb latency 50ms
  tc -n "$origin_ns" qdisc add dev eth0 root tbf rate "$rate" burst 128kb latency 50ms
}
origin_up() {
  local file=$3 size
  origin_link "$1" "$2"
  # `ip netns exec` execs qemu-nbd: $! is qemu-nbd's own pid.
  ip netns exec "$origin_ns" qemu-nbd -t -r -e 0 -x img -f raw -b "$origin_addr" -p 10809 "$file" \
    </dev/null >/dev/null 2>"${4:-/dev/null}" &
  origin_pid=$!
  origin_uri=nbd://$origin_addr:10809/img
  size=$(stat -c %s "$file")
  origin_answers() { [ "$(timeout 5 nbdinfo --size "$origin_uri" 2>/dev/null)" = "$size" ]; }
  wait_for --pid "$origin_pid" "the origin at $origin_uri" 30 origin_answers
}
origin_down() {
  if [ -n "$origin_pid" ]; then kill "$origin_pid" 2>/dev/null || true; wait "$origin_pid" 2>/dev/null || true; fi
  if [ -n "$origin_veth" ]; then ip link del "$origin_veth" 2>/dev/null || true; fi
  if [ -n "$origin_ns" ]; then ip netns del "$origin_ns" 2>/dev/null || true; fi
  origin_pid='' origin_veth='' origin_ns=''
}
# origin_tx_bytes: bytes the origin's side of the link has sent so far.
origin_tx_bytes() { ip netns exec "$origin_ns" cat /sys/class/net/eth0/statistics/tx_bytes; }

# libvirt_up: starts virtlogd and libvirtd when libvirt does not answer; libvirt_down stops
# them again only if libvirt_up started them.
libvirt_started=0
libvirt_up() {
  export LIBVIRT_DEFAULT_URI=qemu:///system
  if ! virsh -q version >/dev/null 2>&1; then scripts/libvirt-svc start; libvirt_started=1; fi
}
libvirt_down() { if [ "$libvirt_started" = 1 ]; then scripts/libvirt-svc stop; libvirt_started=0; fi; }

# domain_xml NAME DISK_XML CONSOLE KERNEL_DIR CMDLINE MEMORY_MIB VCPUS: the XML of a TCG domain
# booting KERNEL_DIR's vmlinuz and initrd.img with CMDLINE, with DISK_XML as its disk and its
# serial console written to the file CONSOLE; it is destroyed when the guest powers off.
domain_xml() {
  cat <<XML
<domain type='qemu'>
  <name>$1</name>
  <memory unit='MiB'>$6</memory>
  <vcpu>$7</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>$4/vmlinuz</kernel><initrd>$4/initrd.img</initrd>
    <cmdline>$5</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    $2
    <serial type='file'><source path='$3'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
XML
}
# guest_domain NAME DISK_XML CONSOLE GUEST_DIR: the test guest of scripts/build-guest (256 MiB,
# 1 vCPU), which checksums its disk and prints VMT-DONE on CONSOLE.
guest_domain() { domain_xml "$1" "$2" "$3" "$4" "console=ttyS0 panic=-1 vmt.mode=checksum" 256 1; }
# debian_domain NAME DISK_XML CONSOLE DEBIAN_DIR: the Debian guest of scripts/build-debian-guest
# as tests/libvirt.rs boots it (1 GiB, 2 vCPUs), which prints VMT-BOOTED on CONSOLE once booted
# and powers off.
debian_domain() { domain_xml "$1" "$2" "$3" "$4" "root=/dev/vda ro console=ttyS0" 1024 2; }
