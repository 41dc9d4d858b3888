# shellcheck shell=bash
# Numbers for the benchmarks' reports (sourced, not run): medians, ratios, formatting, whether a
# goal is met, MiB, elapsed wall-clock time and a process's CPU time. Uses python3 (scripts/setup
# installs it).

# median SAMPLES...: the median of numbers; each argument may hold several, separated by blanks.
median() {
  python3 -c 'import statistics,sys; print(statistics.median(float(x) for a in sys.argv[1:] for x in a.split()))' "$@"
}
# ratio A B [DECIMALS]: A / B with DECIMALS decimals (2); "inf" when B is 0.
ratio() {
  python3 -c 'import sys; a, b, d = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]); print("%.*f" % (d, a / b) if b else "inf")' \
    "$1" "$2" "${3:-2}"
}
# fmt VALUE SPEC: VALUE formatted with the Python format spec SPEC (".1f").
fmt() { python3 -c 'import sys; print(format(float(sys.argv[1]), sys.argv[2]))' "$1" "$2"; }
# verdict VALUE OP LIMIT: "met" if VALUE OP LIMIT holds (OP: ge or le), else "NOT met".
verdict() {
  python3 -c 'import sys,operator as o; v,op,l=sys.argv[1:]; print("met" if {"ge":o.ge,"le":o.le}[op](float(v),float(l)) else "NOT met")' "$@"
}
# mib BYTES [DECIMALS]: BYTES in MiB, without unit: whole MiB rounded down (BYTES an integer), or
# with DECIMALS decimals.
mib() {
  if [ $# -eq 1 ]; then echo $(($1 / 1048576)); return; fi
  python3 -c 'import sys; print("%.*f" % (int(sys.argv[2]), float(sys.argv[1]) / 1048576))' "$1" "$2"
}
# now: the wall-clock time, seconds since the epoch. secs_since T0 [DECIMALS]: seconds from the
# time T0 to now, with DECIMALS decimals (2).
now() { date +%s.%N; }
secs_since() { python3 -c 'import sys; print("%.*f" % (int(sys.argv[3]), float(sys.argv[2]) - float(sys.argv[1])))' "$1" "$(now)" "${2:-2}"; }
# cpu_ticks PID: clock ticks (clk_tck a second) of CPU time, user and system, that process PID
# has used so far; 0 once it is gone. cpu_secs_since PID TICKS [DECIMALS]: CPU seconds it has
# used since cpu_ticks said TICKS, with DECIMALS decimals (2).
clk_tck=$(getconf CLK_TCK)
cpu_ticks() {
  local f
  f=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  awk '{print $12 + $13}' <<< "$f"
}
cpu_secs_since() {
  python3 -c 'import sys; print("%.*f" % (int(sys.argv[4]), (int(sys.argv[2]) - int(sys.argv[1])) / int(sys.argv[3])))' \
    "$2" "$(cpu_ticks "$1")" "$clk_tck" "${3:-2}"
}
