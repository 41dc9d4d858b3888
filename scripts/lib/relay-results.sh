# shellcheck shell=bash
# The results of scripts/bench-relay (sourced by it, not run): one run's raw counters made into
# its result file (JSON, one per run, read back by scripts/calibrate-sim too), and the markdown
# table of every result.

# relay_result RAW OUT FOOTPRINT OWN_FOOTPRINT: writes the result of the run whose counters
# bench-relay wrote to RAW to OUT; FOOTPRINT is the trace's `vmt bench footprint --json` in
# 64 KiB chunks, OWN_FOOTPRINT the same in the run's own chunk size.
relay_result() {
  python3 - "$1" "$2" "$3" "$4" <<'PY'
import json, os, sys
raw, out, footprint, own = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
lines = open(raw).read().splitlines()
head = dict(kv.split("=", 1) for kv in lines[0].split())
r = {"strategy": head["strategy"], "n": int(head["n"]), "rate": head["rate"],
     "origin_rate": head["origin_rate"], "scale": float(head["scale"]), "p2p": head["p2p"] == "1",
     "from": float(head.get("from", "0")), "dilate": float(head.get("dilate", "1")),
     "added_us": int(head["added_us"]) if "added_us" in head else None,
     "footprint": footprint, "chunk_size": own["chunk_size"], "own_working_set": own["chunks"] * own["chunk_size"],
     "nodes": []}
for line in lines[1:]:
    f = line.split(" ", 5) if line.startswith("node ") else line.split()
    if f[0] == "origin_tx": r["origin_tx"] = int(f[1])
    elif f[0] == "origin_cpu": r["origin_cpu_s"] = float(f[1])
    else:
        rep = json.loads(f[5]) if f[5].strip() else {}
        r["nodes"].append({"node": int(f[1]), "tx": int(f[2]), "rx": int(f[3]), "cpu_s": float(f[4]),
                           "elapsed_s": rep.get("elapsed_s"), "bytes": rep.get("bytes"),
                           "read_errors": rep.get("read_errors", None), "waiting_s": rep.get("waiting_s"),
                           "p50_ms": rep.get("latency_ms_p50"), "p99_ms": rep.get("latency_ms_p99")})
# vmtd's own status after the run (vmthunder runs): the most session places each node held.
for x in r["nodes"]:
    try:
        st = json.load(open(os.path.join(os.path.dirname(raw), f"n{x['node']}.status.json")))
    except (OSError, ValueError):
        continue
    img = [i for i in st if isinstance(i, dict) and i.get("name") == "img"] if isinstance(st, list) else []
    p2p = img[0].get("p2p") if img else None
    if isinstance(p2p, dict) and isinstance(p2p.get("sessions_peak"), int):
        x["sessions_peak"] = p2p["sessions_peak"]
json.dump(r, open(out, "w"), indent=1)
PY
}

# relay_table RESULTS: the table of every result in the directory RESULTS, to stdout.
relay_table() {
  python3 - "$1" <<'PY'
import glob, json, os, sys
rs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")))]
if not rs:
    sys.exit("no results")
fp = rs[0]["footprint"]
ws = fp["chunks"] * fp["chunk_size"]
MiB, GiB = 1 << 20, 1 << 30
dist = fp["distinct_bytes"]
print(f"Trace: {fp['reads']} reads, {fp['bytes_read'] / MiB:.1f} MiB read, {dist / MiB:.1f} MiB distinct, "
      f"working set {fp['chunks']} chunks of 64 KiB ({ws / MiB:.1f} MiB); the working set column counts "
      f"chunks of the run's own chunk size.\n")
print("| strategy | from (s) | origin link | N | makespan (s) | ×N=1 | node times min / median (s) | origin egress (MiB) "
      "| ÷ distinct bytes | ÷ working set | per node down / up, mean (MiB) | max node up (MiB) | read errors "
      "| serving CPU (s) | CPU s per GiB relayed | origin CPU (s) | waiting, mean (s) | read latency p50 / p99, median node (ms) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
order = {"direct": 0, "cor-tree": 1, "vmthunder": 2, "vmthunder-prefetch": 3}
rs.sort(key=lambda r: (r.get("from", 0), r["origin_rate"] != r["rate"], r["origin_rate"], order.get(r["strategy"], 9), r["n"]))
def label(r):
    extra = []
    if r["strategy"].startswith("vmthunder") and not r["p2p"]:
        extra.append("no p2p")
    if r.get("chunk_size", 65536) != 65536:
        extra.append(f"{r['chunk_size'] // 1024} KiB chunks")
    if r.get("dilate", 1) != 1:
        extra.append(f"dilated ×{r['dilate']:g}")
    return r["strategy"] + (f" ({', '.join(extra)})" if extra else "")
base = {(label(r), r["origin_rate"], r.get("from", 0)): r for r in rs if r["n"] == 1}
for r in rs:
    times = sorted(x["elapsed_s"] for x in r["nodes"] if x["elapsed_s"] is not None)
    if len(times) < r["n"]:
        mk = None
    else:
        mk = times[-1]
    b = base.get((label(r), r["origin_rate"], r.get("from", 0)))
    bmk = max((x["elapsed_s"] or 0) for x in b["nodes"]) if b else None
    ratio = f"{mk / bmk:.2f}" if mk and bmk else "–"
    errs = sum((x["read_errors"] if x["read_errors"] is not None else 1) for x in r["nodes"])
    down = sum(x["rx"] for x in r["nodes"]) / len(r["nodes"]) / MiB
    up = sum(x["tx"] for x in r["nodes"]) / len(r["nodes"]) / MiB
    upmax = max(x["tx"] for x in r["nodes"]) / MiB
    cpu = sum(x["cpu_s"] for x in r["nodes"])
    relayed = sum(x["tx"] for x in r["nodes"]) / GiB
    name = label(r)
    per = f"{cpu / relayed:.1f}" if r["strategy"] != "direct" and relayed > 0.01 else "–"
    mks = f"{mk:.2f}" if mk else "incomplete"
    med = times[len(times) // 2] if times else 0
    def median(key):
        v = sorted(x[key] for x in r["nodes"] if x.get(key) is not None)
        return v[len(v) // 2] if v else None
    waits = [x["waiting_s"] for x in r["nodes"] if x.get("waiting_s") is not None]
    wait = f"{sum(waits) / len(waits):.2f}" if waits else "–"
    lat = f"{median('p50_ms'):.1f} / {median('p99_ms'):.1f}" if median("p50_ms") is not None else "–"
    print(f"| {name} | {r.get('from', 0):g} | {r['origin_rate']} | {r['n']} | {mks} | {ratio} "
          f"| {times[0] if times else 0:.2f} / {med:.2f} | {r['origin_tx'] / MiB:.0f} | {r['origin_tx'] / dist:.2f} "
          f"| {r['origin_tx'] / r.get('own_working_set', ws):.2f} | {down:.1f} / {up:.1f} | {upmax:.1f} | {errs} "
          f"| {cpu:.1f} | {per} | {r['origin_cpu_s']:.1f} | {wait} | {lat} |")
print("\nPer-node completion times (s), node 1 first:\n")
for r in rs:
    name = label(r)
    times = " ".join(f"{x['elapsed_s']:.2f}" if x["elapsed_s"] is not None else "–" for x in r["nodes"])
    print(f"- {name}, from {r.get('from', 0):g} s, origin {r['origin_rate']}, N={r['n']}: {times}")
peaks = [r for r in rs if any("sessions_peak" in x for x in r["nodes"])]
if peaks:
    print("\nMost places among the image's peer sessions a node held at once, both ways (vmtd's "
          "`sessions_peak`, what `p2p.max_sessions` bounds), largest / median over the nodes that reported it:\n")
for r in peaks:
    v = sorted(x["sessions_peak"] for x in r["nodes"] if "sessions_peak" in x)
    print(f"- {label(r)}, from {r.get('from', 0):g} s, origin {r['origin_rate']}, N={r['n']}: "
          f"{v[-1]} / {v[len(v) // 2]} ({len(v)} of {len(r['nodes'])} nodes)")
PY
}
