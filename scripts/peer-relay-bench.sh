#!/usr/bin/env bash
# Peer relay against TURN on the same lab link (see lab-lib.sh for the
# topology; `make bench`, not `make test`): parties 0 and 1 behind
# symmetric NATs, party 3 on a public address, coturn in the internet.
# Two rounds with fresh sidecars: through TURN (every party has a TURN
# relay and peer relays are off), then through party 3 (no TURN). Each
# round measures the time from the sidecars' start to the first byte of a
# tunnelled fetch from party 1 to party 0, a 64 MiB transfer's rate, and
# the CPU the relay spent on it (coturn's, or party 3's sidecar's) per GB,
# then the peer relay's rate as a share of TURN's (the target: 0.8) and
# how many packets party 3 sent raw (rawhop.go) rather than as datagrams.
#
# Usage: scripts/peer-relay-bench.sh [path/to/sfkit-proxy]   (env: SIZE_MB=64)
set -euo pipefail
LAB=peer-relay-bench
SIZE_MB=${SIZE_MB:-64}
# shellcheck source=scripts/lab-lib.sh
. "$(dirname "$0")/lab-lib.sh"

head -c 24 /dev/urandom | base64 >"$DIR/turn-secret"
TURN_ARGS=(--use-auth-secret "--static-auth-secret=$(cat "$DIR/turn-secret")" --realm=sfkit --relay-ip=203.0.113.10
	--no-tls --min-port=49152 --max-port=65535)
internet
REGISTRY_ARGS=()
start_registry
KINDS=(symmetric symmetric "" public)
for i in 0 1 3; do
	addns "p$i"
	if [ "${KINDS[$i]}" = public ]; then public "$i" "$(ns "p$i")"; else router "$i" "$(ns "p$i")" "${KINDS[$i]}"; fi
	services "$i"
done
echo 1 >"$DIR/www1/one" # the first byte's file
# cpu PID: the process's user and system time so far, in clock ticks.
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# round NAME RELAY_PID ARGS...: the sidecars with ARGS, measured.
round() {
	local name=$1 relay_pid=$2 t0 t1 first c0 c1 secs pids=()
	shift 2
	t0=$(date +%s.%N)
	for i in 0 1 3; do
		spawn "p$i" "$DIR/$name-p$i.log" "$BIN" --pid "$i" --study e2e --registry http://203.0.113.10:8080/ \
			--stun 203.0.113.10:3478,203.0.113.11:3478 --allow-ports 8000 --state-dir "$DIR/state$i" \
			--auth-key-file "$DIR/token$i" "$@" --relay-user "party$i"
		pids+=($!)
	done
	[ "$relay_pid" = party3 ] && relay_pid=${pids[2]}
	for _ in $(seq 1 200); do
		inns p0 env ALL_PROXY=socks5h://127.0.0.1:1080 curl -s --max-time 2 -o /dev/null http://10.0.0.1:8000/one && break
		sleep 0.05
	done
	first=$(awk "BEGIN{print $(date +%s.%N) - $t0}")
	c0=$(cpu "$relay_pid")
	t0=$(date +%s.%N)
	inns p0 env ALL_PROXY=socks5h://127.0.0.1:1080 curl -sS --fail --max-time 300 -o "$DIR/out" http://10.0.0.1:8000/file
	t1=$(date +%s.%N)
	c1=$(cpu "$relay_pid")
	[ "$(sha256sum <"$DIR/out" | cut -d' ' -f1)" = "$(cat "$DIR/sum1")" ] || fail "$name: sha256 differs"
	secs=$(awk "BEGIN{print $t1 - $t0}")
	local path
	path=$(inns p0 "$BIN" status --json | python3 -c 'import json,sys; p=[p for p in json.load(sys.stdin)["peers"] if p["pid"]==1][0]; print(p.get("path"), p.get("via", ""))')
	RATE[$name]=$(awk "BEGIN{print $SIZE_MB*1.048576/$secs}")
	[ "$name" = peer-relay ] && RAW=$(inns p3 "$BIN" status --json | python3 -c 'import json,sys; r=json.load(sys.stdin)["peer_relay"]; print(r["raw_out"])')
	printf '%-11s %-28s %9.2f %9.1f %12.1f\n' "$name" "$path" "$first" "${RATE[$name]}" \
		"$(awk -v t="$(getconf CLK_TCK)" "BEGIN{print ($c1-$c0)/t/($SIZE_MB*1.048576/1000)}")"
	for p in "${pids[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
	rm -f "$DIR/out"
}

declare -A RATE
RAW=0
wait_for_registry() { for _ in $(seq 1 50); do inns p0 curl -s -o /dev/null http://203.0.113.10:8080/ && return; sleep 0.1; done; }
wait_for_registry
printf '%-11s %-28s %9s %9s %12s\n' round path "first s" "MB/s" "relay CPU-s/GB"
round turn "$(cat "$DIR/turn.pid")" --peer-relay off --relay "turn:203.0.113.10:3478?transport=udp" --relay-secret-file "$DIR/turn-secret"
round peer-relay party3
echo "peer relay / TURN: $(awk "BEGIN{printf \"%.2f\", ${RATE[peer-relay]}/${RATE[turn]}}")x (target 0.8x); party 3 sent $RAW packets raw"
finish
