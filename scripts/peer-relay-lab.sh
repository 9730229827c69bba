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
# symmetric, cone and public parties apart. Party 3 also exposes party 0's
# web server to the lab internet through a public gateway added at runtime
# (docs/gateways.md's commands), until it removes it, and proves its address
# reachable with TCP and UDP probes; UDP goes through the tunnel from SOCKS5
# UDP ASSOCIATE and through a public UDP gateway, 10,000 datagrams each.
# With firewalls that let party 0 reach only party 3 and party 1 only
# party 4, party 0 reaches party 1 through both (a route of two relays).
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
	extra=()
	[ "$i" = 3 ] && extra=(--gateway-any-host) # party 3 may expose public gateways
	spawn "p$i" "$DIR/p$i.log" "$BIN" --pid "$i" --study e2e --registry http://203.0.113.10:8080/ \
		--stun 203.0.113.10:3478,203.0.113.11:3478 --allow-ports 8000,9000,9100 --log-level debug \
		--state-dir "$DIR/state$i" --auth-key-file "$DIR/token$i" "${extra[@]}"
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

# netcheck beside a running sidecar names each peer: party 0 (symmetric)
# expects direct paths to the public parties, relays to the NATed ones,
# and says what each has now.
inns p0 "$BIN" netcheck --json --stun 203.0.113.10:3478,203.0.113.11:3478 >"$DIR/netcheck-peers.json" 2>&1 || true
if python3 - "$DIR/netcheck-peers.json" <<'PY'; then pass; else fail "netcheck beside party 0's sidecar: $(cat "$DIR/netcheck-peers.json")"; fi
import json, sys
r = json.load(open(sys.argv[1]))
peers = {p["pid"]: p for p in r.get("peers", [])}
for pid, p in sorted(peers.items()):
    print(f"netcheck at party 0: party {pid} (NAT {p['nat']}): expect {p['expect']}; now {p['now']}")
ok = len(peers) == 4 and all(peers[i]["nat"] == "none" and peers[i]["expect"] == "direct" and peers[i]["now"].startswith("direct") for i in (3, 4))
ok = ok and peers[1]["nat"] == "endpoint-dependent" and peers[2]["nat"] == "endpoint-independent"
ok = ok and all(peers[i]["expect"] != "direct" and peers[i]["now"].startswith("relayed via peer") for i in (1, 2))
sys.exit(0 if ok else 1)
PY

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
if python3 - "$DIR/status3.json" "$DIR/status4.json" "$SIZE_MB" <<'PY'; then pass; else fail "the relays' status does not show three sessions, the bytes of six transfers, and most packets raw"; fi
import json, sys
n = fwd = raw = 0
for f in sys.argv[1:3]:
    r = json.load(open(f))["peer_relay"]
    print(f"{f.split('/')[-1]}: relaying {r['sessions']} sessions, {r['bytes_forwarded']} bytes forwarded, {r['dropped']} packets dropped, "
          f"{r['raw_out']} packets sent raw")
    n, fwd, raw = n + r["sessions"], fwd + r["bytes_forwarded"], raw + r["raw_out"]
    assert r["enabled"]
# Through the symmetric NATs the hops go raw: most of the six transfers'
# packets (1,200 bytes or less each) left the relays as raw packets.
sys.exit(0 if n >= 3 and fwd >= 6 * (1 << 20) * int(sys.argv[3]) and raw >= fwd // 2400 else 1)
PY

# A public gateway at runtime (docs/gateways.md, its blocks as written):
# party 3, on a public address, exposes party 0's web server (behind a
# symmetric NAT) to the lab internet; a plain curl there fetches party 0's
# file through it; the counts match; a gateway to a port party 0 does not
# allow is refused with the reason; once removed, the same curl is refused.
mkdir -p "$DIR/bin" "$DIR/gw"
ln -s "$BIN" "$DIR/bin/sfkit-proxy"
gw_block() { # gw_block NS PAGE NAME: block NAME of PAGE, in namespace NS, in $DIR/gw
	doc_block "$2" "$3" >"$DIR/gw-$3.sh"
	inns "$1" env -C "$DIR/gw" PATH="$DIR/bin:$PATH" bash -e "$DIR/gw-$3.sh"
}
if gw_block p3 docs/gateways.md gateway-add >"$DIR/gw-add.out" 2>&1; then pass; else fail "gateway add: $(cat "$DIR/gw-add.out")"; fi
gw_fetch() { rm -f "$DIR/gw/file"; timeout 30 ip netns exec "$(ns inet)" env -C "$DIR/gw" bash -e "$DIR/gw-gateway-fetch.sh"; }
doc_block docs/gateways.md gateway-fetch >"$DIR/gw-gateway-fetch.sh"
if gw_fetch 2>"$DIR/gw-fetch.err" && [ "$(sha256sum <"$DIR/gw/file" | cut -d' ' -f1)" = "$(cat "$DIR/sum0")" ]; then
	log "a plain curl on the lab internet fetched party 0's file through party 3's public gateway: $(stat -c %s "$DIR/gw/file") bytes, sha256 ok"
	pass
else
	fail "curl through party 3's public gateway: $(cat "$DIR/gw-fetch.err") $(stat -c %s "$DIR/gw/file" 2>/dev/null) bytes"
fi
gw_block p3 docs/gateways.md gateway-list >"$DIR/gw-list.out" 2>&1 || true
cat "$DIR/gw-list.out"
if inns p3 "$BIN" gateway list --json | python3 -c '
import json, sys
g = [g for g in json.load(sys.stdin) if g["listen"] == "203.0.113.23:8443"][0]
assert g["public"] and g["conns"] == 1 and g["bytes_from_peer"] >= (int(sys.argv[1]) << 20) and g["label"] == "dashboard", g
' "$SIZE_MB"; then pass; else fail "gateway list does not count the fetch through it"; fi
if inns p3 "$BIN" gateway add tcp 203.0.113.23:8444 0 22 >"$DIR/gw-22.out" 2>&1; then
	fail "a gateway to party 0's port 22, which it does not allow, was added"
elif grep -q "party 0 does not allow port 22" "$DIR/gw-22.out"; then pass
else fail "a gateway to a port party 0 does not allow: $(cat "$DIR/gw-22.out")"; fi
if gw_block p3 docs/gateways.md gateway-rm >"$DIR/gw-rm.out" 2>&1 && ! gw_fetch 2>/dev/null; then
	log "removed, the gateway refuses the same curl: $(cat "$DIR/gw-rm.out")"
	pass
else
	fail "after gateway rm: $(cat "$DIR/gw-rm.out"); the curl still got through, or rm failed"
fi

# A probe on party 3's public address (docs/gateways.md's blocks): the lab
# internet, its requester, reads the token back with the CLI and with ncat;
# a UDP probe answers too.
if gw_block p3 docs/gateways.md probe-open >"$DIR/probe-open.out" 2>&1; then pass; else fail "probe open: $(cat "$DIR/probe-open.out")"; fi
if gw_block inet docs/gateways.md probe-check >"$DIR/probe-check.out" 2>&1 && grep -q "reachable: it answered with the token" "$DIR/probe-check.out"; then
	log "the lab internet checked party 3's probe: $(cat "$DIR/probe-check.out")"
	pass
else
	fail "probe check from the lab internet: $(cat "$DIR/probe-check.out")"
fi
if [ "$(inns inet timeout 10 ncat --recv-only 203.0.113.23 8445 2>&1)" = 6f1e0c2a9b7d41e8 ]; then pass; else fail "ncat did not read the probe's token"; fi
inns p3 "$BIN" probe open udp 203.0.113.23:8446 --requester 203.0.113.0/24 --token udp-probe-token >/dev/null
if inns inet "$BIN" probe check udp 203.0.113.23:8446 udp-probe-token >"$DIR/probe-udp.out" 2>&1; then pass; else fail "udp probe check: $(cat "$DIR/probe-udp.out")"; fi

# UDP (docs/gateways.md#udp): a UDP echo on party 0's 127.0.0.1:9000
# (behind a symmetric NAT). Party 2 (a cone NAT: relayed to party 0 through
# party 3 or 4) reaches it through SOCKS5 UDP ASSOCIATE with a client
# speaking RFC 1928 from Python's socket module: two associations, 5,000
# datagrams each, every echo to the association that sent it. Then party 3
# exposes the same echo to the lab internet through a public UDP gateway:
# two clients there, 5,000 datagrams each, the same checks, and the
# gateway's byte counts agree with what the clients sent and received.
spawn p0 "$DIR/udpecho0.log" python3 "$REPO/scripts/udplab.py" echo 127.0.0.1 9000
cp "$REPO/scripts/udplab.py" "$DIR/gw/"
gw_block p2 docs/gateways.md udp-socks >"$DIR/udp-socks.out" 2>"$DIR/udp-socks.err" || true
if python3 - "$DIR/udp-socks.out" <<'PY'; then pass; else fail "SOCKS5 UDP ASSOCIATE from party 2 to party 0: $(cat "$DIR/udp-socks.out" "$DIR/udp-socks.err")"; fi
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(f"SOCKS5 UDP ASSOCIATE, party 2 -> party 0 (relayed): {r['received']} of {r['sent']} datagrams echoed, {r['wrong']} to the wrong association")
sys.exit(0 if r["sent"] == 10000 and r["wrong"] == 0 and r["received"] >= 9000 else 1)
PY
if gw_block p3 docs/gateways.md udp-gateway-add >"$DIR/udp-gw-add.out" 2>&1; then pass; else fail "udp gateway add: $(cat "$DIR/udp-gw-add.out")"; fi
inns inet timeout 120 python3 "$REPO/scripts/udplab.py" plain 203.0.113.23 8447 5000 >"$DIR/udp-gw.out" 2>"$DIR/udp-gw.err" || true
inns p3 "$BIN" gateway list --json >"$DIR/udp-gw-list.json" 2>&1 || true
if python3 - "$DIR/udp-gw.out" "$DIR/udp-gw-list.json" <<'PY'; then pass; else fail "the public UDP gateway: $(cat "$DIR/udp-gw.out" "$DIR/udp-gw.err")"; fi
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
g = next(g for g in json.load(open(sys.argv[2])) if g["proto"] == "udp")
print(f"public UDP gateway, the lab internet -> party 3 -> party 0: {r['received']} of {r['sent']} datagrams echoed, {r['wrong']} wrong; "
      f"the gateway counts {g['conns']} associations, {g['bytes_to_peer']} bytes to party 0 and {g['bytes_from_peer']} back "
      f"(the clients sent {r['bytes_sent']} and received {r['bytes_received']})")
ok = r["sent"] == 10000 and r["wrong"] == 0 and r["received"] >= 9000 and g["conns"] == 2
ok = ok and r["bytes_received"] <= g["bytes_from_peer"] <= g["bytes_to_peer"] <= r["bytes_sent"]
sys.exit(0 if ok else 1)
PY
if inns p3 "$BIN" gateway rm udp 203.0.113.23:8447 >/dev/null 2>&1 &&
	! inns inet timeout 30 python3 "$REPO/scripts/udplab.py" plain 203.0.113.23 8447 10 >/dev/null 2>&1; then pass
else fail "after gateway rm udp, the lab internet's datagrams still came back"; fi

# Two relays: firewalls let party 0 reach only party 3, and party 1 only
# party 4 (and the STUN servers). No single member then reaches both, so
# party 0 reaches party 1 through a route of two relays, 3 then 4 (public
# both: they reach each other); a file goes across, sha256-checked, and
# the status names the route. The firewalls go again after.
twohop() { # twohop ROUTER PEER_ADDR add|del
	local r; r=$(ns "$1")
	if [ "$3" = add ]; then
		ip netns exec "$r" iptables -N TWOHOP
		for a in "$2" 203.0.113.10 203.0.113.11; do
			ip netns exec "$r" iptables -A TWOHOP -d "$a" -j RETURN
			ip netns exec "$r" iptables -A TWOHOP -s "$a" -j RETURN
		done
		ip netns exec "$r" iptables -A TWOHOP -j DROP
		ip netns exec "$r" iptables -I FORWARD 1 -p udp -j TWOHOP
	else
		ip netns exec "$r" iptables -D FORWARD -p udp -j TWOHOP
		ip netns exec "$r" iptables -F TWOHOP
		ip netns exec "$r" iptables -X TWOHOP
	fi
}
twohop r0 203.0.113.23 add
twohop r1 203.0.113.24 add
route=""
for _ in $(seq 1 90); do
	route=$(via 0 1)
	[ "$route" = "peer 3 → peer 4" ] && break
	sleep 1
done
if [ "$route" = "peer 3 → peer 4" ]; then
	log "with party 0 reaching only party 3 and party 1 only party 4, party 0 reaches party 1 via $route"
	pass
	printf '%-5s %-5s %12s %8s %9s  %s\n' from to bytes seconds MB/s result
	fetch 0 1
	fetch 1 0
	if [ "$(via 0 1)" = "peer 3 → peer 4" ]; then pass; else fail "after the transfers, party 0 reaches party 1 via '$(via 0 1)'"; fi
else
	fail "party 0 does not reach party 1 through two relays: via '$route'"
fi
twohop r0 203.0.113.23 del
twohop r1 203.0.113.24 del

# The relays' metrics name the pairs they carry.
for r in 3 4; do inns "p$r" curl -s http://127.0.0.1:1081/metrics >"$DIR/metrics$r.txt" || true; done
if cat "$DIR/metrics3.txt" "$DIR/metrics4.txt" | grep -q '^sfkit_proxy_peer_relay_session_bytes_total{from="[0-2]",to="[0-2]"} [1-9]'; then pass
else fail "no relay's /metrics shows the bytes of a session: $(cat "$DIR/metrics3.txt" "$DIR/metrics4.txt" | grep peer_relay | tr '\n' ' ')"; fi
if cat "$DIR/metrics3.txt" "$DIR/metrics4.txt" | grep -q '^sfkit_proxy_peer_relay_raw_packets_total{direction="out"} [1-9]'; then pass
else fail "no relay's /metrics counts raw packets sent: $(cat "$DIR/metrics3.txt" "$DIR/metrics4.txt" | grep raw_packets | tr '\n' ' ')"; fi

# The relay sees only ciphertext: capture on parties 3 and 4 while party 0
# fetches party 1's text file (both behind symmetric NATs: through one).
# Whole packets: a relay sends raw packets in GSO batches, which the
# capture sees before they are cut into datagrams.
for r in 3 4; do
	spawn "p$r" "$DIR/tcpdump$r.log" tcpdump -i eth0 -s 0 -U -w "$DIR/relay$r.pcap" udp
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
first=$(via 0 1 | cut -d' ' -f1-2) # the first relay, of a route of two too
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
