#!/usr/bin/env bash
# The WAN lab: two parties on a long, lossy path. This kernel has no netem,
# so scripts/wanem bridges the path in a namespace of its own over
# AF_PACKET, holding each frame for half the round trip and dropping a
# fraction; tbf limits the rate. Offloads are off on every interface the
# frames cross. Party 1 serves scripts/wanperf's pattern; party 0 pulls it,
# straight over TCP or through the tunnel (SOCKS), on 1 or 8 connections.
#
#   p0 203.0.113.1 (registry :8080) -- eth0 | wa [wanem + tbf] wb | eth0 -- p1 203.0.113.2
#
# Without --bench (part of `make test`, lean): 8 and then 1 connection
# through the tunnel on a 50 ms, 200 Mbit/s path with 0.1% loss, every byte
# checked, and the sidecar's pool must have carried the 8 on 8 QUIC
# connections. With --bench (`make bench`): throughput of plain TCP (CUBIC
# and BBR) against the tunnel (its default pool and one connection per
# peer), 1 and 8 connections, loss 0, 0.01% and 0.1%; medians of WAN_RUNS
# runs, each counting WAN_SECONDS after WAN_WARMUP (steady state: a study's
# connections last hours); WAN_ROWS picks rows; a table on stdout and
# wan.json.
#
# Usage: scripts/wan-lab.sh [--bench] [path/to/sfkit-proxy]
set -euo pipefail
BENCH=0
if [ "${1:-}" = --bench ]; then
	BENCH=1
	shift
fi
LAB=wan-lab
# shellcheck source=scripts/lab-lib.sh
. "$(dirname "$0")/lab-lib.sh"
for tool in ethtool tc sysctl; do
	command -v "$tool" >/dev/null || { echo "$LAB: $tool is missing (apt-get install ethtool iproute2 procps)" >&2; exit 1; }
done
RTT_MS=${WAN_RTT_MS:-50}
RATE=${WAN_RATE:-200mbit}
RUNS=${WAN_RUNS:-3}
SECONDS_PER_RUN=${WAN_SECONDS:-8}
WARMUP=${WAN_WARMUP:-2}
JSON_OUT=${WAN_JSON:-wan.json}

(cd "$(dirname "$0")/.." && go build -o "$DIR/wanem" ./scripts/wanem && go build -o "$DIR/wanperf" ./scripts/wanperf)

# The bench compares CUBIC and BBR: CUBIC must be allowed before a
# namespace may choose it; the host's list is put back on exit.
ALLOWED=$(sysctl -n net.ipv4.tcp_allowed_congestion_control)
case "$BENCH: $ALLOWED " in
0:* | *" cubic "*) ;;
*)
	CLEANUPS+=("sysctl -qw net.ipv4.tcp_allowed_congestion_control='$ALLOWED'")
	sysctl -qw net.ipv4.tcp_allowed_congestion_control="$ALLOWED cubic"
	;;
esac

addns w
addns p0
addns p1
veth "$(ns p0)" "$(ns w)" eth0 wa a
veth "$(ns w)" "$(ns p1)" wb eth0 b
ip -n "$(ns p0)" addr add 203.0.113.1/24 dev eth0
ip -n "$(ns p1)" addr add 203.0.113.2/24 dev eth0
for pair in "p0 eth0" "w wa" "w wb" "p1 eth0"; do
	set -- $pair
	inns "$1" ethtool -K "$2" tx off rx off tso off gso off gro off >/dev/null 2>&1 || true
	ip -n "$(ns "$1")" link set "$2" up
done
# The bottleneck: tbf where wanem writes, a queue of one bandwidth-delay
# product.
BDP=$(awk -v r="${RATE%mbit}" -v t="$RTT_MS" 'BEGIN{printf "%d", r * 1e6 / 8 * t / 1000}')
for dev in wa wb; do
	inns w tc qdisc add dev "$dev" root tbf rate "$RATE" burst 64kb limit "$BDP"
done

WANEM=""
# path LOSS: (re)start the emulator with this loss fraction.
path() {
	if [ -n "$WANEM" ]; then
		kill "$WANEM"
		wait "$WANEM" 2>/dev/null || true
	fi
	spawn w "$DIR/wanem.log" "$DIR/wanem" -a wa -b wb -delay "$((RTT_MS / 2))ms" -loss "$1"
	WANEM=$!
	sleep 0.3
}
path 0

tokens wan 2
stun_server p0 203.0.113.1
spawn p0 "$DIR/registry.log" "$BIN" registry --listen 203.0.113.1:8080 --tokens "$DIR/tokens" --data "$DIR/registry"
spawn p1 "$DIR/serve.log" "$DIR/wanperf" serve -listen 0.0.0.0:9200
sleep 0.2
inns p0 "$DIR/wanperf" get -to 203.0.113.2:9200 -bytes 100000 >/dev/null || { echo "$LAB: no path through the emulator" >&2; exit 1; }

SIDECARS=()
# sidecars ARGS...: (re)start both parties' sidecars with ARGS, and wait
# until party 0 has a direct path to party 1.
sidecars() {
	for p in "${SIDECARS[@]}"; do
		kill "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	SIDECARS=()
	for i in 0 1; do
		spawn "p$i" "$DIR/p$i.log" "$BIN" --pid "$i" --study wan --registry http://203.0.113.1:8080/ --stun 203.0.113.1:3478 \
			--allow-ports 9200 --state-dir "$DIR/state$i" --auth-key-file "$DIR/token$i" "$@"
		SIDECARS+=($!)
	done
	for _ in $(seq 1 60); do
		if inns p0 "$BIN" status --json 2>/dev/null | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if any(p["pid"]==1 and p["state"]=="direct" for p in s["peers"]) else 1)' 2>/dev/null; then
			return 0
		fi
		sleep 0.5
	done
	echo "$LAB: party 0 found no direct path to party 1" >&2
	exit 1
}

# congestion ALG: both parties' TCP uses ALG.
congestion() {
	for i in 0 1; do inns "p$i" sysctl -qw net.ipv4.tcp_congestion_control="$1"; done
}

# rate HOW CONNS: one timed pull; prints MB/s.
rate() {
	local args=(-to 203.0.113.2:9200)
	[ "$1" = tunnel ] && args=(-to 10.0.0.1:9200 -socks 127.0.0.1:1080)
	inns p0 "$DIR/wanperf" get "${args[@]}" -conns "$2" -warmup "${WARMUP}s" -time "${SECONDS_PER_RUN}s" |
		python3 -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["MBps"])'
}

# pool_conns: how many QUIC connections party 0 holds to party 1.
pool_conns() {
	inns p0 "$BIN" status --json | python3 -c 'import json,sys; print([p for p in json.load(sys.stdin)["peers"] if p["pid"]==1][0].get("quic_conns", 0))'
}

if [ "$BENCH" = 0 ]; then
	log "path: ${RTT_MS} ms round trip, $RATE, 0.1% loss each way"
	path 0.001
	sidecars
	log "8 connections through the tunnel"
	if inns p0 "$DIR/wanperf" get -to 10.0.0.1:9200 -socks 127.0.0.1:1080 -conns 8 -bytes $((3 << 20)); then pass; else fail "8 connections"; fi
	n=$(pool_conns)
	if [ "$n" = 8 ]; then pass; else fail "party 0 carried 8 tunnelled connections on $n QUIC connections, not 8"; fi
	log "1 connection through the tunnel"
	if inns p0 "$DIR/wanperf" get -to 10.0.0.1:9200 -socks 127.0.0.1:1080 -conns 1 -bytes $((2 << 20)); then pass; else fail "1 connection"; fi
	finish
	exit 0
fi

log "path: ${RTT_MS} ms round trip, $RATE; $RUNS runs of ${SECONDS_PER_RUN} s each after ${WARMUP} s"
: >"$DIR/results"
measure() { # measure LABEL HOW
	local label=$1 how=$2 loss conns r
	for loss in 0 0.0001 0.001; do
		path "$loss"
		for conns in 1 8; do
			for r in $(seq 1 "$RUNS"); do
				echo "$label $loss $conns $(rate "$how" "$conns")" | tee -a "$DIR/results" >&2
				sleep 1
			done
		done
	done
}
ROWS=${WAN_ROWS:-tcp-cubic tcp-bbr tunnel tunnel-1conn}
for row in $ROWS; do
	case $row in
	tcp-cubic) congestion cubic && measure tcp-cubic tcp ;;
	tcp-bbr) congestion bbr && measure tcp-bbr tcp ;;
	tunnel) congestion cubic && sidecars && measure tunnel tunnel ;;
	tunnel-1conn) congestion cubic && sidecars --conns-per-peer 1 && measure tunnel-1conn tunnel ;;
	*) echo "$LAB: unknown row $row in WAN_ROWS" >&2; exit 2 ;;
	esac
done
python3 - "$DIR/results" "$JSON_OUT" "$RTT_MS" "$RATE" <<'PY'
import json, statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
runs = {}
for label, loss, conns, mbps in rows:
    runs.setdefault((label, loss, conns), []).append(float(mbps))
med = {k: statistics.median(v) for k, v in runs.items()}
labels = ["tcp-cubic", "tcp-bbr", "tunnel", "tunnel-1conn"]
print(f"\nWAN: {sys.argv[3]} ms round trip, {sys.argv[4]}; MB/s in steady state, medians of {len(next(iter(runs.values())))} runs; ratios against TCP CUBIC")
print(f"{'loss':>7} {'conns':>5} " + " ".join(f"{l:>12}" for l in labels) + f" {'tunnel/cubic':>13} {'1conn/cubic':>12}")
out = []
for loss in ["0", "0.0001", "0.001"]:
    for conns in ["1", "8"]:
        v = [med.get((l, loss, conns), float("nan")) for l in labels]
        print(f"{float(loss)*100:>6.2f}% {conns:>5} " + " ".join(f"{x:>12.2f}" for x in v) + f" {v[2]/v[0]:>12.2f}× {v[3]/v[0]:>11.2f}×")
        out.append({"loss": float(loss), "conns": int(conns), **{l: x for l, x in zip(labels, v)},
                    "runs": {l: runs.get((l, loss, conns), []) for l in labels}})
json.dump({"rtt_ms": int(sys.argv[3]), "rate": sys.argv[4], "rows": out}, open(sys.argv[2], "w"), indent=1)
PY
