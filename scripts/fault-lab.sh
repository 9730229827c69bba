#!/usr/bin/env bash
# Durable tunnels across real faults (see lab-lib.sh for the topology): two
# parties behind cone NATs with home-router firewalls, a TURN relay on both,
# the registry. For each fault, party 0 pulls a paced stream from party 1
# through ALL_PROXY (scripts/faultpeer checks every byte against its seed)
# while an echo conversation runs on a second connection; the fault hits a
# few seconds in, and both must complete with no byte lost or repeated and
# no line dropped. The repair time of each fault is printed.
#
#   the direct path blocked for good (the relay carries on), then, while
#   relayed, the NAT of the TURN client rebinds (it allocates again), then
#   the relay dies while the direct path is back
#   the dialing party's NAT rebinds (new port range, mappings flushed)
#   the accepting party's NAT rebinds
#   the dialing party's router gets a new WAN address
#   all UDP dropped for 10 s, then for 30 s (60 s with FAULT_LONG=1)
#   the registry down for 20 s
#   the path's MTU shrinks to 1280 under a live transfer (a black hole for
#   full-size packets; the transfer stands still 12 s at most), then a new
#   transfer on the shrunk path, then the MTU back at 1500 (the packets grow
#   back), then an MTU below QUIC's minimum for 45 s (the log names it as
#   the likely cause)
#   an idle connection across NAT mappings that time out after 10 s
#   the peer's sidecar stopped: the application sees a reset (ECONNRESET),
#   not a hang and not an end of stream; new connections work once it is back
#
# Usage: scripts/fault-lab.sh [path/to/sfkit-proxy]   (env: FAULT_LONG=1)
set -euo pipefail
LAB=fault-lab
# shellcheck source=scripts/lab-lib.sh
. "$(dirname "$0")/lab-lib.sh"
command -v conntrack >/dev/null || { echo "$LAB: conntrack is missing (apt-get install conntrack)" >&2; exit 1; }
LONG_DROP=30
[ "${FAULT_LONG:-0}" = 1 ] && LONG_DROP=60

(cd "$(dirname "$0")/.." && go build -o "$DIR/faultpeer" ./scripts/faultpeer)
head -c 24 /dev/urandom | base64 >"$DIR/turn-secret"
TURN_ARGS=(--use-auth-secret "--static-auth-secret=$(cat "$DIR/turn-secret")" --realm=sfkit --relay-ip=203.0.113.10
	--no-tls --min-port=49152 --max-port=65535)
internet
REGISTRY_ARGS=()
start_registry

SIDECAR_ARGS=(--study e2e --registry http://203.0.113.10:8080/ --stun 203.0.113.10:3478,203.0.113.11:3478
	--allow-ports 9100,9101 --log-level debug --relay-secret-file "$DIR/turn-secret")
sidecar() {
	local i=$1
	spawn "p$i" "$DIR/p$i.log" "$BIN" --pid "$i" "${SIDECAR_ARGS[@]}" --relay "turn:203.0.113.10:3478?transport=udp" \
		--relay-user "party$i" --state-dir "$DIR/state$i" --auth-key-file "$DIR/token$i"
	SIDECAR[$i]=$!
}
SIDECAR=()
for i in 0 1; do
	addns "p$i"
	router "$i" "$(ns "p$i")" cone
	sidecar "$i"
done
spawn p1 "$DIR/source.log" "$DIR/faultpeer" -mode serve -bytes $((12 << 20)) -rate $((256 << 10))
wait_registered 2
r0=$(ns r0)
r1=$(ns r1)

# repairs: how many "path repaired" lines party 0 has logged so far.
repairs() { grep -c 'msg="path repaired"' "$DIR/p0.log" || true; }

# run NAME SETUP_AT_3S [UNDO_AFTER_SECONDS UNDO]: the paced pull (3 MiB, or
# $BYTES) and the echo conversation, with SETUP (a shell command) 3 s in
# and UNDO after more.
run() {
	local name=$1 setup=$2 undo_after=${3:-} undo=${4:-} before out
	before=$(repairs)
	log "fault: $name"
	ip netns exec "$(ns p0)" env ALL_PROXY=socks5://127.0.0.1:1080 "$DIR/faultpeer" -mode client -bytes "${BYTES:-$((3 << 20))}" \
		>"$DIR/client.out" 2>"$DIR/client.err" &
	local client=$!
	PIDS+=($client)
	sleep 3
	eval "$setup"
	if [ -n "$undo_after" ]; then
		sleep "$undo_after"
		eval "$undo"
	fi
	if wait "$client"; then
		out=$(cat "$DIR/client.out")
		local repair
		repair=$(grep 'msg="path repaired"' "$DIR/p0.log" | tail -n +$((before + 1)) | grep -o 'after=[^ ]*' | tr '\n' ' ' || true)
		log "  survived: $out; path repaired ${repair:-(no repair needed)}"
		pass
	else
		fail "$name: $(cat "$DIR/client.err")"
	fi
}

# Warm up: the path is up and direct.
run "none (baseline)" true
check_status 0 2 "'direct'"

# The relay first. Then, while relayed, party 0's NAT rebinds: it moves
# the TURN client's socket too, whose allocation the server no longer
# knows; party 0 allocates again, publishes the new relayed address, and
# the transfer completes over it (docs/connections.md).
BLOCK="-p udp -d 203.0.113.21 -j DROP"
run "the direct path blocked for good (relay available)" "ip netns exec $r0 iptables -I FORWARD 1 $BLOCK"
check_status 0 2 "'relayed'"
run "the TURN client's NAT rebinds while relayed" \
	"ip netns exec $r0 iptables -t nat -I POSTROUTING 1 -o wan -p udp -j MASQUERADE --to-ports 42000-42999; ip netns exec $r0 conntrack -D -p udp >/dev/null 2>&1 || true"
if grep 'msg="relay allocation lost; allocating again"' "$DIR/p0.log" | grep -q 'NAT rebound'; then
	log "  party 0 allocated again: $(grep 'msg="relay allocated"' "$DIR/p0.log" | tail -1 | grep -o 'addr=[^ ]*')"
	pass
else fail "party 0 did not notice its TURN allocation lost to the NAT rebinding"; fi
check_status 0 2 "'relayed'"
TURN_PID=$(cat "$DIR/turn.pid")
run "the relay dies while relayed, the direct path back" \
	"ip netns exec $r0 iptables -D FORWARD $BLOCK; kill $TURN_PID"

run "the dialing party's NAT rebinds" \
	"ip netns exec $r0 iptables -t nat -I POSTROUTING 1 -o wan -p udp -j MASQUERADE --to-ports 40000-40999; ip netns exec $r0 conntrack -D -p udp >/dev/null 2>&1 || true"
run "the accepting party's NAT rebinds" \
	"ip netns exec $r1 iptables -t nat -I POSTROUTING 1 -o wan -p udp -j MASQUERADE --to-ports 41000-41999; ip netns exec $r1 conntrack -D -p udp >/dev/null 2>&1 || true"
run "the dialing party's router gets a new WAN address" \
	"ip -n $r0 addr add 203.0.113.40/24 dev wan; ip netns exec $r0 iptables -t nat -I POSTROUTING 1 -o wan -j SNAT --to-source 203.0.113.40; ip netns exec $r0 conntrack -D -p udp >/dev/null 2>&1 || true"
run "all UDP dropped for 10 s" \
	"ip netns exec $r0 iptables -I FORWARD 1 -p udp -j DROP" 10 "ip netns exec $r0 iptables -D FORWARD -p udp -j DROP"
run "all UDP dropped for $LONG_DROP s" \
	"ip netns exec $r0 iptables -I FORWARD 1 -p udp -j DROP" "$LONG_DROP" "ip netns exec $r0 iptables -D FORWARD -p udp -j DROP"
run "the registry down for 20 s" \
	"pkill -f -- '--listen 203.0.113.10:8080' || true" 20 "start_registry"

# The path's MTU shrinks under the packet size QUIC found (a VPN comes up,
# a route changes): every full-size packet is lost, in both directions,
# while keepalives and acknowledgements, small, still pass. The side whose
# writes go unanswered probes with a full-size datagram, gets no echo,
# and drops the connection; the flows resume on a new one, whose packets
# grow only as far as the path now allows.
mtu() { ip -n "$r0" link set wan mtu "$1" && ip -n "$r1" link set wan mtu "$1"; }
stalls() { cat "$DIR/p0.log" "$DIR/p1.log" | grep -c 'msg="path stalled' || true; }
raises() { grep -c 'msg="path carries larger packets' "$DIR/p0.log" || true; }
STALLS=$(stalls)
run "the path's MTU shrinks to 1280" "mtu 1280"
if [ "$(stalls)" -gt "$STALLS" ]; then pass; else fail "no stalled path was noticed when the MTU shrank"; fi
# The bound (README): noticing takes 3 s without progress (8 round trips
# on a long path) and the probes' 2.9 s; then a handshake and the resume.
GAP=$(grep -o 'longest_gap=[0-9.]*' "$DIR/client.out" | cut -d= -f2)
if awk -v g="${GAP:-99}" 'BEGIN { exit !(g <= 12) }'; then log "  the transfer stood still for ${GAP}s at most"; pass
else fail "the transfer stood still for ${GAP:-?}s; the bound is 12 s"; fi
run "a new transfer on the shrunk path" true
# The MTU grows back: quic-go's discovery ran once on the connection made
# while it was small, so a trial connection (30 s after the link, then
# doubling) finds the larger packets and the link moves to a new one.
# A longer transfer (12 MiB, 48 s) is under way when the link moves.
RAISES=$(raises)
wait_raise() {
	local at
	at=$(date +%s)
	for _ in $(seq 120); do [ "$(raises)" -gt "$RAISES" ] && break; sleep 1; done
	log "  packets checked $(($(date +%s) - at)) s after the MTU grew back: $(grep 'msg="path carries larger packets' "$DIR/p0.log" |
		tail -1 | grep -o 'packet_size=[0-9]* found=[0-9]*' || echo none larger)"
}
BYTES=$((12 << 20)) run "the path's MTU back at 1500" "mtu 1500" 0 wait_raise
if [ "$(raises)" -gt "$RAISES" ]; then pass; else fail "the packets did not grow back within 120 s of the MTU"; fi
SIZE=$(inns p0 "$BIN" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["peers"][0].get("packet_size", 0))')
if [ "$SIZE" -ge 1431 ]; then log "  status: packet_size $SIZE"; pass; else fail "status says packet_size $SIZE after the MTU grew back"; fi
# Below QUIC's minimum (1,200 bytes of UDP: an MTU of 1,228) no
# connection can be made at all; the tunnels wait, and the log names the
# MTU as the likely cause. Once the MTU is back, they resume.
run "the path's MTU below QUIC's minimum for 45 s" "mtu 1100" 45 "mtu 1500"
if cat "$DIR/p0.log" | grep 'no path to peer yet' | grep -q 'path MTU below 1,228'; then pass
else fail "no log line named the MTU while it was below QUIC's minimum"; fi
mtu 1500

# An idle connection across NAT mappings that time out after 10 s: the
# keepalives hold them (and a lost one is repaired).
log "fault: an idle connection, NAT mappings timing out after 10 s"
for r in "$r0" "$r1"; do
	ip netns exec "$r" sysctl -qw net.netfilter.nf_conntrack_udp_timeout=10 net.netfilter.nf_conntrack_udp_timeout_stream=10
done
if ip netns exec "$(ns p0)" env ALL_PROXY=socks5://127.0.0.1:1080 "$DIR/faultpeer" -mode idle -idle 25s \
	>"$DIR/idle.out" 2>"$DIR/idle.err"; then
	log "  $(cat "$DIR/idle.out")"
	pass
else
	fail "idle connection: $(cat "$DIR/idle.err")"
fi

# The peer's sidecar stops: a reset, promptly; then it comes back.
log "fault: the peer's sidecar stops"
ip netns exec "$(ns p0)" env ALL_PROXY=socks5://127.0.0.1:1080 "$DIR/faultpeer" -mode expect-reset \
	>"$DIR/reset.out" 2>"$DIR/reset.err" &
client=$!
PIDS+=($client)
sleep 3
kill "${SIDECAR[1]}"
wait "${SIDECAR[1]}" 2>/dev/null || true
if wait "$client"; then
	log "  $(cat "$DIR/reset.out")"
	pass
else
	fail "peer stopped: $(cat "$DIR/reset.err")"
fi
mv "$DIR/p1.log" "$DIR/p1-first.log"
sidecar 1
run "none (the peer is back)" true

check_status 0 2 "'direct'"
inns p0 "$BIN" status | head -6
finish
