# shellcheck shell=bash disable=SC2154  # the variables named below are bench-prefetch's
# The boots of scripts/bench-prefetch (sourced by it, not run): the vmtd under test, the counters of
# the shaped link, and one timed boot of the Debian guest under libvirt per variant, A or B
# through vmthunder on a fresh node cache, C from a qcow2 overlay over the local file.
#
# Uses bench-prefetch's settings (bin, work, deb, id, pool, boot_limit, digest, saved_profile,
# base_owner, run_dir, cache_dir, profile_dir, ctl), its domains list (for the cleanup) and
# common.sh's origin; run_vmthunder and run_local append their samples to its result arrays
# (wall, uptime, reads, waited, origin_bytes, pf_info, drops, retrans, upstream).

vmt() { "$bin/vmt" --socket "$ctl" "$@"; }

# start_vmtd: starts vmtd on $work/vmtd.toml and waits until it answers and serves the export.
vmtd_pid=
vmtd_serves() { [ -S "$run_dir/exports/debian.sock" ] && vmt status >/dev/null 2>&1; }
start_vmtd() {
  VMT_LOG=info "$bin/vmtd" --config "$work/vmtd.toml" 2>>"$work/vmtd.log" &
  vmtd_pid=$!
  wait_for --pid "$vmtd_pid" "vmtd answering (see vmtd.log)" 30 vmtd_serves
}
stop_vmtd() {
  [ -n "$vmtd_pid" ] || return 0
  stop_pid "$vmtd_pid" 30   # vmtd should never need the SIGKILL: reported
  vmtd_pid=
}

# fresh_vmtd [PROFILE]: vmtd on an empty node cache; profile_dir holds PROFILE, or nothing.
# The run dir (and its marker, which the hook looks for) stays across restarts.
fresh_vmtd() {
  stop_vmtd
  rm -rf "$cache_dir" "$profile_dir"
  mkdir -p "$profile_dir"
  [ -z "${1:-}" ] || cp "$1" "$profile_dir/$digest.profile"
  start_vmtd
}

# field JSONFILE KEY: one value of image "debian" from a saved `vmt status --json`, dotted keys
# for nested ones ("prefetch.done_chunks"); prints "-" when absent.
field() { image_field debian "$2" < "$1"; }

# link_counters: "DROPS RETRANS": packets the two tbf qdiscs dropped, and TCP segments the
# origin's side retransmitted (per-namespace /proc/net/snmp), so far: a guest read that waits
# on a reply whose packets were dropped waits for TCP to recover, not just for the wire.
link_counters() {
  local d1 d2 r
  d1=$(tc -s qdisc show dev "$origin_veth" | sed -n 's/.*(dropped \([0-9]*\),.*/\1/p' | head -1)
  d2=$(ip netns exec "$origin_ns" tc -s qdisc show dev eth0 | sed -n 's/.*(dropped \([0-9]*\),.*/\1/p' | head -1)
  # shellcheck disable=SC2016  # awk's own $1, $2, $13
  r=$(ip netns exec "$origin_ns" awk '$1 == "Tcp:" && $2 ~ /^[0-9]/ {print $13}' /proc/net/snmp)
  echo "$((d1 + d2)) $r"
}

# boot NAME: starts the defined domain NAME and waits for the VMT-BOOTED line, then for shut off.
# Sets boot_wall (virsh start -> marker seen, s), boot_uptime (the guest's own uptime at the
# marker) and, when vmtd runs, prefetch_done_at (s after virsh start at which the prefetch was
# seen finished, "-" if not while booting). vmtd's status is polled about once a second in A and
# B alike; the console is polled every 0.1 s.
domain_off() { [ "$(virsh -q domstate "$1" 2>/dev/null)" = "shut off" ]; }
boot() {
  local name=$1 console=$work/$1.console t0 line n=0 state deadline
  prefetch_done_at=-
  deadline=$((SECONDS + boot_limit))
  t0=$(now)
  virsh -q start "$name" >/dev/null
  while :; do
    line=$(grep -a -o -m1 'VMT-BOOTED [0-9.]*' "$console" 2>/dev/null || true)
    if [ -n "$line" ]; then boot_wall=$(secs_since "$t0"); break; fi
    n=$((n + 1))
    if ((n % 10 == 0)); then
      if [ -n "$vmtd_pid" ] && [ "$prefetch_done_at" = - ] &&
         vmt status --json 2>/dev/null | grep -q '"finished": true'; then
        prefetch_done_at=$(secs_since "$t0")
      fi
      state=$(virsh -q domstate "$name" 2>/dev/null || true)
      [ "$state" = running ] || { tail -n 20 "$console" >&2 || true; die "$name is '$state' before VMT-BOOTED"; }
    fi
    # Plain shell arithmetic here: this loop must cost the guests next to no CPU.
    ((SECONDS < deadline)) || { tail -n 20 "$console" >&2 || true; die "$name printed no VMT-BOOTED within $boot_limit s"; }
    sleep 0.1
  done
  boot_uptime=${line#VMT-BOOTED }
  # The guest powers itself off right after the marker.
  wait_for "$name shutting off after VMT-BOOTED" 120 domain_off "$name"
}

# forget_domain NAME: undefines a shut-off domain and drops it from the cleanup list.
forget_domain() {
  local d rest=()
  virsh -q undefine "$1" >/dev/null
  for d in "${domains[@]}"; do [ "$d" = "$1" ] || rest+=("$d"); done
  domains=("${rest[@]}")
}

# run_vmthunder A|B: one boot through vmthunder on a fresh node cache.
nboot=0
run_vmthunder() {
  local v=$1 name disk s0 s1 p
  nboot=$((nboot + 1))
  name=vmtb-$id-$v$nboot
  if [ "$v" = B ]; then fresh_vmtd "$saved_profile"; else fresh_vmtd; fi
  vmt status --json > "$work/s0.json"
  if [ "$v" = B ]; then
    [ "$(field "$work/s0.json" profile_chunks)" != - ] || die "vmtd did not load the saved profile"
  else
    [ "$(field "$work/s0.json" profile_chunks)" = - ] || die "vmtd has a profile before an A boot"
  fi
  disk=$(vmt vol create --image debian --pool "$pool" "vol$nboot.qcow2" 2>/dev/null)
  debian_domain "$name" "$disk" "$work/$name.console" "$deb" > "$work/$name.xml"
  virsh -q define "$work/$name.xml" >/dev/null
  domains+=("$name")
  # Counters just before the start, so that nothing done to set up the boot is counted.
  vmt status --json > "$work/s0.json"
  read -r drops0 retrans0 <<< "$(link_counters)"
  boot "$name"
  if [ "$v" = A ]; then
    # The hook's `release end` stops the recording and vmtd saves the profile: wait for it.
    p=$profile_dir/$digest.profile
    for _ in $(seq 300); do [ -s "$p" ] && [ "$(vmt status --json | image_field debian recording)" = - ] && break; sleep 0.1; done
    [ -s "$p" ] || die "no profile after an A boot: is the libvirt hook loaded (kill -HUP libvirtd)?"
    # The profile for B comes from the first A boot only.
    [ -s "$saved_profile" ] || { cp "$p" "$saved_profile"; log "saved the profile of $name"; }
  fi
  vmt status --json > "$work/s1.json"
  read -r drops1 retrans1 <<< "$(link_counters)"
  drops[$v]+=" $((drops1 - drops0))"; retrans[$v]+=" $((retrans1 - retrans0))"
  s0=$work/s0.json s1=$work/s1.json
  upstream[$v]+=" $(( $(field "$s1" upstream_reads) - $(field "$s0" upstream_reads) ))"
  wall[$v]+=" $boot_wall"; uptime[$v]+=" $boot_uptime"
  reads[$v]+=" $(( $(field "$s1" reads) - $(field "$s0" reads) ))"
  waited[$v]+=" $(( $(field "$s1" reads_waited) - $(field "$s0" reads_waited) ))"
  origin_bytes[$v]+=" $(( $(field "$s1" bytes_from_origin) - $(field "$s0" bytes_from_origin) ))"
  if [ "$v" = B ]; then
    pf_info[$v]+="; $(field "$s1" prefetch.done_chunks)/$(field "$s1" prefetch.total_chunks) chunks, finished $(field "$s1" prefetch.finished), error $(field "$s1" prefetch.error), seen finished ${prefetch_done_at} s after start"
  fi
  log "$v: wall ${boot_wall}s, guest uptime ${boot_uptime}s, reads ${reads[$v]##* }, waited ${waited[$v]##* }, from origin ${origin_bytes[$v]##* } bytes in ${upstream[$v]##* } reads, link drops ${drops[$v]##* }, retransmits ${retrans[$v]##* }${pf_info[$v]:+ (prefetch${pf_info[$v]##*;})}"
  forget_domain "$name"
  vmt vol delete --pool "$pool" "vol$nboot.qcow2" >/dev/null 2>&1
}

# run_local: one boot from a qcow2 overlay over the local debian.raw; no vmthunder involved.
run_local() {
  local name overlay
  nboot=$((nboot + 1))
  name=vmtb-$id-C$nboot
  overlay=$work/local$nboot.qcow2
  stop_vmtd
  qemu-img create -q -f qcow2 -F raw -b "$deb/debian.raw" "$overlay"
  # relabel='no' on the backing file: otherwise libvirt chowns the shared base image to
  # libvirt-qemu and never gives it back. It is world-readable, so QEMU needs no relabel.
  debian_domain "$name" "<disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$overlay'/>
      <backingStore type='file'>
        <format type='raw'/>
        <source file='$deb/debian.raw'><seclabel model='dac' relabel='no'/></source>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>" "$work/$name.console" "$deb" > "$work/$name.xml"
  virsh -q define "$work/$name.xml" >/dev/null
  domains+=("$name")
  boot "$name"
  [ "$(stat -c %u:%g "$deb/debian.raw")" = "$base_owner" ] ||
    die "libvirt changed the owner of $deb/debian.raw to $(stat -c %u:%g "$deb/debian.raw")"
  wall[C]+=" $boot_wall"; uptime[C]+=" $boot_uptime"
  log "C: wall ${boot_wall}s, guest uptime ${boot_uptime}s"
  forget_domain "$name"
  rm -f "$overlay"
}
