# shellcheck shell=bash
# Shared set-up of vmthunder's scripts (sourced, not run): logging, waiting on a condition, a
# qemu-nbd origin behind a shaped link, libvirt, and a guest domain. Callers `set -euo pipefail`
# and define `me` (their name, for messages) before sourcing.

log() { echo "${me:-vmthunder}: $*" >&2; }
die() { log "$*"; exit 1; }

# wait_for WHAT SECS CMD...: runs CMD until it succeeds, at most SECS seconds; dies otherwise.
wait_for() {
  local what=$1 secs=$2 t0=$SECONDS
  shift 2
  until "$@"; do
    [ $((SECONDS - t0)) -lt "$secs" ] || die "$what: not within ${secs}s"
    sleep 0.2
  done
}

# A qemu-nbd origin serving FILE as export "img", read-only, in network namespace $origin_ns,
# reached over a veth pair shaped with tc tbf at RATE in both directions (network storage).
# origin_up NAME RATE FILE sets origin_ns, origin_veth (the host side), origin_uri and
# origin_pid; origin_down removes it all (idempotent, for traps).
origin_ns='' origin_veth='' origin_uri='' origin_pid=''
origin_up() {
  local name=$1 rate=$2 file=$3 x subnet=''
  # A /30 in 10.214.0.0/16 that nothing on the host uses yet.
  for ((x = $$ % 250 + 1, i = 0; i < 250; i++, x = x % 250 + 1)); do
    if ! ip -4 addr show | grep -q "inet 10\.214\.$x\." && ! ip -4 route show | grep -q "^10\.214\.$x\."; then
      subnet=10.214.$x
      break
    fi
  done
  [ -n "$subnet" ] || die "no free 10.214.X.0/30 subnet on this host"
  origin_ns=$name origin_veth=${name:0:12}h
  ip netns add "$origin_ns"
  ip link add "$origin_veth" type veth peer name eth0 netns "$origin_ns"
  ip addr add "$subnet.1/30" dev "$origin_veth"
  ip link set "$origin_veth" up
  ip -n "$origin_ns" addr add "$subnet.2/30" dev eth0
  ip -n "$origin_ns" link set eth0 up
  ip -n "$origin_ns" link set lo up
  # Shaping egress on both ends shapes both directions: requests and replies.
  tc qdisc add dev "$origin_veth" root tbf rate "$rate" burst 128kb latency 50ms
  tc -n "$origin_ns" qdisc add dev eth0 root tbf rate "$rate" burst 128kb latency 50ms
  # `ip netns exec` execs qemu-nbd: $! is qemu-nbd's own pid.
  ip netns exec "$origin_ns" qemu-nbd -t -r -e 0 -x img -f raw -b "$subnet.2" -p 10809 "$file" \
    </dev/null >/dev/null 2>&1 &
  origin_pid=$!
  origin_uri=nbd://$subnet.2:10809/img
  local size
  size=$(stat -c %s "$file")
  origin_answers() { [ "$(timeout 5 nbdinfo --size "$origin_uri" 2>/dev/null)" = "$size" ]; }
  wait_for "the origin at $origin_uri" 30 origin_answers
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

# guest_domain NAME DISK_XML CONSOLE GUEST_DIR: the XML of a test-guest domain (TCG, 256 MiB,
# the guest of scripts/build-guest, which checksums its disk and prints VMT-DONE on CONSOLE).
guest_domain() {
  cat <<XML
<domain type='qemu'>
  <name>$1</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>$4/vmlinuz</kernel><initrd>$4/initrd.img</initrd>
    <cmdline>console=ttyS0 panic=-1 vmt.mode=checksum</cmdline></os>
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
