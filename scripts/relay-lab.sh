#!/usr/bin/env bash
# End-to-end test of the relay fallback (see lab-lib.sh for the topology).
# coturn in the "internet" offers TURN over UDP, TCP and TLS (a test
# certificate), with coturn's shared-secret (REST) credentials:
#
#   party 0: symmetric NAT (MASQUERADE --random-fully), relay over UDP
#   party 1: symmetric NAT, relay over TLS (turns:)
#   party 2: a router that drops every forwarded UDP packet, relay over TCP
#   party 3: cone NAT, no relay of its own
#
# No pair has a direct path. Every ordered pair gets a sha256-checked curl
# transfer and an ncat echo through ALL_PROXY, and each party's status must
# say relayed. Then a long transfer from party 3 to party 2 starts relayed,
# party 2's UDP block is lifted mid-transfer, and the same TCP connection
# must complete after the path switched to direct. A capture on the relay
# side during a transfer of a text file must show none of its text.
#
# Usage: scripts/relay-lab.sh [path/to/sfkit-proxy]   (env: SIZE_MB=10)
set -euo pipefail
LAB=relay-lab
SIZE_MB=${SIZE_MB:-10}
# shellcheck source=scripts/lab-lib.sh
. "$(dirname "$0")/lab-lib.sh"
command -v tcpdump >/dev/null || { echo "$LAB: tcpdump is missing (apt-get install tcpdump)" >&2; exit 1; }
command -v openssl >/dev/null || { echo "$LAB: openssl is missing (apt-get install openssl)" >&2; exit 1; }

# Text, so that a capture would show it if it ever crossed the relay in the clear.
MARKER="SFKIT-PLAINTEXT-MARKER-$ID"
FILE_GEN="marker_file"
marker_file() { yes "$MARKER the quick brown fox jumps over the lazy dog" | head -c "$((SIZE_MB << 20))" || true; }

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=203.0.113.10 \
	-addext subjectAltName=IP:203.0.113.10 -keyout "$DIR/turn-key.pem" -out "$DIR/turn-cert.pem" 2>/dev/null
head -c 24 /dev/urandom | base64 >"$DIR/turn-secret"
# coturn runs with the operators' example configuration (docs/operations.md,
# block turnserver); the command line gives only the lab's secret, address,
# certificate and the documentation range the lab's parties live in, which
# the example denies as it denies every reserved range.
turn_block=$(doc_block docs/operations.md turnserver)
[ "$turn_block" = "turnserver -c examples/turnserver.conf" ] || { echo "$LAB: docs/operations.md's turnserver block is not the command this lab runs: $turn_block" >&2; exit 1; }
TURN_CONF="$REPO/examples/turnserver.conf"
TURN_ARGS=("--static-auth-secret=$(cat "$DIR/turn-secret")" --relay-ip=203.0.113.10
	"--cert=$DIR/turn-cert.pem" "--pkey=$DIR/turn-key.pem" --allowed-peer-ip=203.0.113.0-203.0.113.255)
internet
REGISTRY_ARGS=()
start_registry

SIDECAR_ARGS=(--study e2e --registry http://203.0.113.10:8080/ --stun 203.0.113.10:3478,203.0.113.11:3478
	--allow-ports 8000,9000,9100 --log-level debug --relay-secret-file "$DIR/turn-secret")
KINDS=(symmetric symmetric udp-blocked cone)
RELAYS=("turn:203.0.113.10:3478?transport=udp" "turns:203.0.113.10:5349" "turn:203.0.113.10:3478?transport=tcp" "")
for i in 0 1 2 3; do
	addns "p$i"
	router "$i" "$(ns "p$i")" "${KINDS[$i]}"
	services "$i"
	relay=()
	[ -n "${RELAYS[$i]}" ] && relay=(--relay "${RELAYS[$i]}" --relay-user "party$i" --relay-ca "$DIR/turn-cert.pem")
	spawn "p$i" "$DIR/p$i.log" "$BIN" --pid "$i" "${SIDECAR_ARGS[@]}" "${relay[@]}" --state-dir "$DIR/state$i" \
		--auth-key-file "$DIR/token$i"
done
wait_registered 4
for i in 0 1 2; do
	if grep -q 'msg="relay allocated"' "$DIR/p$i.log"; then pass; else fail "party $i allocated no relay"; fi
done

# netcheck: party 2's UDP is blocked, its TURN relay over TCP answers.
netcheck_is 2 unknown False --relay "turn:203.0.113.10:3478?transport=tcp" --relay-user party2 \
	--relay-secret-file "$DIR/turn-secret"
netcheck_is 0 endpoint-dependent True

matrix 4
for a in 0 1 2 3; do check_status "$a" 4 "'relayed'"; done
inns p3 "$BIN" status | tee "$DIR/status-table.txt"

# The relay sees only ciphertext: capture the "internet" side of the relay
# while party 0 fetches party 1's text file (both behind symmetric NATs, so
# relayed both ways through coturn).
spawn inet "$DIR/tcpdump.log" tcpdump -i br0 -s 512 -U -w "$DIR/relay.pcap" udp or tcp
TCPDUMP=$!
sleep 1
fetch 0 1 >/dev/null
sleep 1
kill "$TCPDUMP"
wait "$TCPDUMP" 2>/dev/null || true
no_plaintext $((SIZE_MB << 18)) "$DIR/relay.pcap"

# A long transfer that starts relayed; party 2's UDP block is lifted in the
# middle; the same TCP connection must complete, over the direct path. The
# source paces itself: 40 chunks of 100 kB, a second apart.
paced_source 3 40
log "long transfer 3 -> 2 (4 MB over 40 s); lifting party 2's UDP block after 5 s"
ip netns exec "$(ns p2)" timeout 120 ncat --recv-only --proxy 127.0.0.1:1080 --proxy-type socks5 10.0.0.3 9100 \
	>"$DIR/slow.out" 2>"$DIR/slow.err" &
LONG=$!
PIDS+=($LONG)
sleep 5
ip netns exec "$(ns r2)" iptables -D FORWARD -p udp -j DROP
for _ in $(seq 1 120); do
	grep -q 'msg="path switched"' "$DIR/p2.log" && break
	sleep 0.5
done
if ! grep -q 'msg="path switched" party=2 component=quicmux peer=3 from=relayed to=direct' "$DIR/p2.log"; then
	fail "party 2 did not switch to the direct path"
elif ! kill -0 "$LONG" 2>/dev/null; then
	fail "the long transfer ended before the path switched: it proves nothing"
else
	log "party 2 moved its connection to party 3 onto the direct path while the transfer ran ($(stat -c %s "$DIR/slow.out") bytes in so far)"
	pass
fi
wait "$LONG" || true
if [ "$(sha256sum <"$DIR/slow.out" | cut -d' ' -f1)" = "$(cat "$DIR/slow.sum")" ]; then
	log "the same TCP connection completed after the switch: $(stat -c %s "$DIR/slow.out") bytes, sha256 ok"
	pass
else
	fail "the long transfer did not survive the switch: $(stat -c %s "$DIR/slow.out") bytes, $(cat "$DIR/slow.err")"
fi
check_status 2 4 "'direct' if b == 3 else 'relayed'"
finish
