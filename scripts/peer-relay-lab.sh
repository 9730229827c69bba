#!/usr/bin/env bash
# Peer relays, with no TURN server (see lab-lib.sh for the topology; STUN
# only in the internet, as sfkit's own deployments have):
#
#   party 0: symmetric NAT (MASQUERADE --random-fully)
#   party 1: symmetric NAT
#   party 2: cone NAT (home-router firewall)
#   party 3: a public address, no NAT (a cloud VM)
#
# No pair with a symmetric or a cone party has a direct path except to
# party 3, which reaches everyone: the other pairs must connect through
# party 3, with no flag given (peer relay is on by default, for sfkit's
# fixed command line). Every ordered pair gets a sha256-checked curl
# transfer and an ncat echo through ALL_PROXY; each party's status must
# say direct for party 3 and relayed via peer 3 for the others; party 3's
# status counts its sessions and the bytes it relayed; and a capture on
# party 3 during a transfer of a text file from party 1 to party 0 must
# show none of its text.
#
# Usage: scripts/peer-relay-lab.sh [path/to/sfkit-proxy]   (env: SIZE_MB=10)
set -euo pipefail
LAB=peer-relay-lab
SIZE_MB=${SIZE_MB:-10}
# shellcheck source=scripts/lab-lib.sh
. "$(dirname "$0")/lab-lib.sh"
command -v tcpdump >/dev/null || { echo "$LAB: tcpdump is missing (apt-get install tcpdump)" >&2; exit 1; }

MARKER="SFKIT-PLAINTEXT-MARKER-$ID"
FILE_GEN="marker_file"
marker_file() { yes "$MARKER the quick brown fox jumps over the lazy dog" | head -c "$((SIZE_MB << 20))" || true; }

TURN_ARGS=(--stun-only --no-tls)
internet
REGISTRY_ARGS=()
start_registry

KINDS=(symmetric symmetric cone public)
for i in 0 1 2 3; do
	addns "p$i"
	if [ "${KINDS[$i]}" = public ]; then
		public "$i" "$(ns "p$i")"
	else
		router "$i" "$(ns "p$i")" "${KINDS[$i]}"
	fi
	services "$i"
	spawn "p$i" "$DIR/p$i.log" "$BIN" --pid "$i" --study e2e --registry http://203.0.113.10:8080/ \
		--stun 203.0.113.10:3478,203.0.113.11:3478 --allow-ports 8000,9000 --log-level debug \
		--state-dir "$DIR/state$i" --auth-key-file "$DIR/token$i"
done
wait_registered 4

matrix 4
for a in 0 1 2 3; do check_status "$a" 4 "'direct' if 3 in (b, me) else 'relayed'"; done
inns p0 "$BIN" status | tee "$DIR/status-table.txt"

# The relayed pairs name their relay; the relay counts what it carried.
for a in 0 1 2; do
	if inns "p$a" "$BIN" status --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
bad = [p for p in s["peers"] if p["pid"] != 3 and (p.get("path") != "peer-relayed" or p.get("via") != "peer 3")]
sys.exit(1 if bad else 0)'; then pass; else fail "party $a: a relayed peer does not say peer-relayed via peer 3"; fi
done
inns p3 "$BIN" status --json >"$DIR/status3.json"
if python3 - "$DIR/status3.json" "$SIZE_MB" <<'PY'; then pass; else fail "party 3's status does not show three sessions and the bytes of six transfers"; fi
import json, sys
r = json.load(open(sys.argv[1]))["peer_relay"]
print(f"party 3 relays {r['sessions']} sessions, {r['bytes_forwarded']} bytes forwarded, {r['dropped']} packets dropped")
sys.exit(0 if r["enabled"] and r["sessions"] >= 3 and r["bytes_forwarded"] >= 6 * (1 << 20) * int(sys.argv[2]) else 1)
PY

# The relay sees only ciphertext: capture on party 3 while party 0 fetches
# party 1's text file (both behind symmetric NATs: through party 3).
spawn p3 "$DIR/tcpdump.log" tcpdump -i eth0 -s 1600 -U -w "$DIR/relay.pcap" udp
TCPDUMP=$!
sleep 1
fetch 0 1 >/dev/null
sleep 1
kill "$TCPDUMP"
wait "$TCPDUMP" 2>/dev/null || true
captured=$(stat -c %s "$DIR/relay.pcap")
if [ "$captured" -lt $((SIZE_MB << 20)) ]; then
	fail "capture holds only $captured bytes; the transfer did not cross party 3"
elif grep -c -a "$MARKER" "$DIR/relay.pcap" >/dev/null; then
	fail "the relay's capture shows the file's text"
else
	log "party 3's capture: $captured bytes, none of the file's text"
	pass
fi
grep -q -a "$MARKER" "$DIR/www1/file" || fail "the marker check is vacuous: the file lacks the marker"
finish
