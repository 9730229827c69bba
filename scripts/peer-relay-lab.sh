#!/usr/bin/env bash
# Peer relays, with no TURN server (see lab-lib.sh for the topology; STUN
# only in the internet, as sfkit's own deployments have):
#
#   party 0: symmetric NAT (MASQUERADE --random-fully)
#   party 1: symmetric NAT
#   party 2: cone NAT (home-router firewall)
#   parties 3 and 4: public addresses, no NAT (cloud VMs)
#
# No pair of parties 0 to 2 has a direct path; parties 3 and 4 reach
# everyone. So the pairs of parties 0 to 2 must connect through party 3 or
# 4, with no flag given (peer relay is on by default, for sfkit's fixed
# command line). Every ordered pair gets a sha256-checked curl transfer and
# an ncat echo through ALL_PROXY; each party's status must say direct for
# parties 3 and 4 and relayed via one of them for the others; the relays'
# status counts their sessions and the bytes they relayed; a capture on the
# relays during a transfer of a text file from party 1 to party 0 must show
# none of its text. Last, the relay carrying a paced transfer from party 1
# to party 0 is stopped mid-transfer: the same connection completes through
# the other, sha256-checked. `sfkit-proxy netcheck` must tell the
# symmetric, cone and public parties apart.
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
tokens e2e 5
REGISTRY_ARGS=()
start_registry

KINDS=(symmetric symmetric cone public public)
RELAY_PID=()
for i in 0 1 2 3 4; do
	addns "p$i"
	if [ "${KINDS[$i]}" = public ]; then
		public "$i" "$(ns "p$i")"
	else
		router "$i" "$(ns "p$i")" "${KINDS[$i]}"
	fi
	services "$i"
done

# netcheck tells each kind of network (run before the sidecars start).
netcheck_is 0 endpoint-dependent True
netcheck_is 2 endpoint-independent True
netcheck_is 3 none True

for i in 0 1 2 3 4; do
	spawn "p$i" "$DIR/p$i.log" "$BIN" --pid "$i" --study e2e --registry http://203.0.113.10:8080/ \
		--stun 203.0.113.10:3478,203.0.113.11:3478 --allow-ports 8000,9000,9100 --log-level debug \
		--state-dir "$DIR/state$i" --auth-key-file "$DIR/token$i"
	RELAY_PID[$i]=$!
done
wait_registered 5

matrix 5
# The symmetric parties, with no TURN relay, were told what that means.
for i in 0 1; do
	if grep -q 'behind an endpoint-dependent (\\"symmetric\\") NAT, with no TURN relay: peers with public addresses' "$DIR/p$i.log"; then pass
	else fail "party $i logged no warning about its endpoint-dependent NAT"; fi
done
for a in 0 1 2 3 4; do check_status "$a" 5 "'direct' if b >= 3 or me >= 3 else 'relayed'"; done
inns p0 "$BIN" status | tee "$DIR/status-table.txt"

# via A B: the relay party A names for B ("peer 3").
via() { inns "p$1" "$BIN" status --json | python3 -c 'import json, sys; print(next(p.get("via", "") for p in json.load(sys.stdin)["peers"] if p["pid"] == int(sys.argv[1])))' "$2"; }
# The relayed pairs name their relay; the relays count what they carried.
for a in 0 1 2; do
	for b in 0 1 2; do
		[ "$a" = "$b" ] && continue
		v=$(via "$a" "$b")
		case "$v" in "peer 3" | "peer 4") pass ;; *) fail "party $a says peer $b is reached via '$v'; want peer 3 or peer 4" ;; esac
	done
done
for r in 3 4; do inns "p$r" "$BIN" status --json >"$DIR/status$r.json"; done
if python3 - "$DIR/status3.json" "$DIR/status4.json" "$SIZE_MB" <<'PY'; then pass; else fail "the relays' status does not show three sessions and the bytes of six transfers"; fi
import json, sys
n = fwd = 0
for f in sys.argv[1:3]:
    r = json.load(open(f))["peer_relay"]
    print(f"{f.split('/')[-1]}: relaying {r['sessions']} sessions, {r['bytes_forwarded']} bytes forwarded, {r['dropped']} packets dropped")
    n, fwd = n + r["sessions"], fwd + r["bytes_forwarded"]
    assert r["enabled"]
sys.exit(0 if n >= 3 and fwd >= 6 * (1 << 20) * int(sys.argv[3]) else 1)
PY

# The relays' metrics name the pairs they carry.
for r in 3 4; do inns "p$r" curl -s http://127.0.0.1:1081/metrics >"$DIR/metrics$r.txt" || true; done
if cat "$DIR/metrics3.txt" "$DIR/metrics4.txt" | grep -q '^sfkit_proxy_peer_relay_session_bytes_total{from="[0-2]",to="[0-2]"} [1-9]'; then pass
else fail "no relay's /metrics shows the bytes of a session: $(cat "$DIR/metrics3.txt" "$DIR/metrics4.txt" | grep peer_relay | tr '\n' ' ')"; fi

# The relay sees only ciphertext: capture on parties 3 and 4 while party 0
# fetches party 1's text file (both behind symmetric NATs: through one).
for r in 3 4; do
	spawn "p$r" "$DIR/tcpdump$r.log" tcpdump -i eth0 -s 1600 -U -w "$DIR/relay$r.pcap" udp
	TCPDUMP[$r]=$!
done
sleep 1
fetch 0 1 >/dev/null
sleep 1
for r in 3 4; do
	kill "${TCPDUMP[$r]}"
	wait "${TCPDUMP[$r]}" 2>/dev/null || true
done
no_plaintext $((SIZE_MB << 20)) "$DIR/relay3.pcap" "$DIR/relay4.pcap"

# The relay goes away mid-transfer: a source that paces itself over 20 s
# (20 chunks of 100 kB) at party 1, fetched by party 0; its relay is
# stopped 5 s in; the same connection completes through the other.
paced_source 1 20
first=$(via 0 1)
log "a paced transfer 1 -> 0 (2 MB over 20 s) through $first; stopping it after 5 s"
ip netns exec "$(ns p0)" timeout 120 ncat --recv-only --proxy 127.0.0.1:1080 --proxy-type socks5 10.0.0.1 9100 \
	>"$DIR/slow.out" 2>"$DIR/slow.err" &
LONG=$!
PIDS+=($LONG)
sleep 5
kill "${RELAY_PID[${first#peer }]}"
wait "$LONG" || true
if [ "$(sha256sum <"$DIR/slow.out" | cut -d' ' -f1)" = "$(cat "$DIR/slow.sum")" ]; then
	log "the same connection completed through $(via 0 1) after $first stopped: $(stat -c %s "$DIR/slow.out") bytes, sha256 ok"
	pass
else
	fail "the transfer did not survive its relay stopping: $(stat -c %s "$DIR/slow.out") bytes, $(cat "$DIR/slow.err")"
fi
finish
