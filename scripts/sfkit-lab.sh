#!/usr/bin/env bash
# sfkit as it is, across real NATs (see lab-lib.sh for the topology): three
# parties, each behind its own cone NAT, find each other only through a
# fake of the sfkit website's WebSocket relay (scripts/fakesfkit, over TLS),
# and each sidecar is started with exactly the argument list sfkit's
# boot_sfkit_proxy uses; the STUN servers come from SFKIT_PROXY_STUN, as
# sfkit's environment is inherited.
#
# Then every party runs scripts/mpcpeer, which does what SF-GWAS does:
# configGlobal.toml with every ipaddr 127.0.0.1, the lower party listening
# on port+t, the higher one dialling 127.0.0.1:port+t through
# golang.org/x/net/proxy's FromEnvironment (ALL_PROXY=socks5://localhost:7080),
# 4 connections per pair, bytes both ways, sha256-checked. As in hcholab's
# demo program, each party listens only after a random pause of up to 3 s
# and dials at once, once, with no retry: a dial that reaches a peer before
# the peer's program listens waits there for it. Party 2 ignores
# ALL_PROXY (plain net.Dial) and its sidecar forwards the peers' ports
# (SFKIT_PROXY_MPC_FORWARD=true).
#
# Usage: scripts/sfkit-lab.sh [path/to/sfkit-proxy]
set -euo pipefail
LAB=sfkit-lab
SIZE_MB=1
# shellcheck source=scripts/lab-lib.sh
. "$(dirname "$0")/lab-lib.sh"
command -v openssl >/dev/null || { echo "$LAB: openssl is missing (apt-get install openssl)" >&2; exit 1; }

NPARTIES=3
TURN_ARGS=(--stun-only --no-tls)
internet

# The website relay, over TLS with a certificate the parties trust through
# SSL_CERT_FILE (as a real one would be through the system's roots).
(cd "$(dirname "$0")/.." && go build -o "$DIR/fakesfkit" ./scripts/fakesfkit && go build -o "$DIR/mpcpeer" ./scripts/mpcpeer)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=sfkit.lab \
	-addext subjectAltName=IP:203.0.113.10 -keyout "$DIR/relay.key" -out "$DIR/relay.pem" 2>/dev/null
: >"$DIR/keys"
for i in 0 1 2; do
	key=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
	echo "$key user$i" >>"$DIR/keys"
	printf '%s' "$key" >"$DIR/key$i"
done
spawn inet "$DIR/relay.log" "$DIR/fakesfkit" --listen 203.0.113.10:8443 --cert "$DIR/relay.pem" --key "$DIR/relay.key" \
	--study study-42 --participants user0,user1,user2 --keys "$DIR/keys" --origin wss://203.0.113.10:8443

cat >"$DIR/configGlobal.toml" <<'TOML'
num_main_parties = 2
mpc_num_threads = 4

[servers.party0]
ipaddr = "127.0.0.1"
ports  = {party1 = "8020", party2 = "8040"}

[servers.party1]
ipaddr = "127.0.0.1"
ports  = {party0 = "8020", party2 = "8060"}

[servers.party2]
ipaddr = "127.0.0.1"
ports  = {party0 = "8040", party1 = "8060"}
TOML

# sfkit's command line as docs/sfkit.md gives it (block sfkit-command),
# with the lab's website, study, role and config path in its placeholders.
sfkit_line=$(doc_block docs/sfkit.md sfkit-command)
case "$sfkit_line" in
sfkit-proxy\ *HOST*STUDY_ID*ROLE*PATH*) ;;
*) echo "$LAB: docs/sfkit.md's sfkit-command block is not one sfkit-proxy command with HOST, STUDY_ID, ROLE and PATH: $sfkit_line" >&2; exit 1 ;;
esac
for i in $(seq 0 $((NPARTIES - 1))); do
	addns "p$i"
	router "$i" "$(ns "p$i")" cone
	extra_env=()
	[ "$i" = 2 ] && extra_env=(SFKIT_PROXY_MPC_FORWARD=true)
	read -r -a sfkit_cmd <<<"$(printf '%s\n' "$sfkit_line" | sed -e "s|HOST|203.0.113.10:8443|; s|STUDY_ID|study-42|; s|ROLE|$i|; s|PATH|$DIR|")"
	sfkit_cmd[0]=$BIN
	# Exactly sfkit's command line; the environment carries the rest.
	spawn "p$i" "$DIR/p$i.log" env SSL_CERT_FILE="$DIR/relay.pem" XDG_STATE_HOME="$DIR/state$i" \
		SFKIT_PROXY_STUN=stun:203.0.113.10:3478,stun:203.0.113.11:3478 "${extra_env[@]}" \
		"${sfkit_cmd[@]}" -auth-key "$(cat "$DIR/key$i")"
done

# sfkit waits a second, then starts the MPC program with ALL_PROXY set.
sleep 1
MPC_PIDS=()
for i in $(seq 0 $((NPARTIES - 1))); do
	plain=()
	[ "$i" = 2 ] && plain=(-plain)
	ip netns exec "$(ns "p$i")" env ALL_PROXY=socks5://localhost:7080 "$DIR/mpcpeer" -mpc "$DIR/configGlobal.toml" \
		-pid "$i" -bytes $((4 << 20)) -listen-delay 3s -tries 1 "${plain[@]}" >"$DIR/mpc$i.log" 2>&1 &
	MPC_PIDS+=($!)
	PIDS+=($!)
done
for i in $(seq 0 $((NPARTIES - 1))); do
	if wait "${MPC_PIDS[$i]}"; then
		log "$(cat "$DIR/mpc$i.log")"
		pass
	else
		fail "party $i's MPC program: $(tr '\n' ' ' <"$DIR/mpc$i.log")"
	fi
done

if grep -q 'msg=forwarding' "$DIR/p2.log"; then pass; else fail "party 2 did not forward the peers' ports"; fi
log "connections that waited for a late listener: $(cat "$DIR"/p*.log | grep -c 'local port listening: connected' || true)"
# The MPC ports are open to peers by -mpc alone, and nothing else is.
if grep -q 'allow_ports=8020-8023,8040-8043 ' "$DIR/p0.log"; then pass; else fail "party 0 does not open exactly its -mpc ports: $(grep -o 'allow_ports=[^ ]*' "$DIR/p0.log")"; fi
for i in $(seq 0 $((NPARTIES - 1))); do
	check_status "$i" "$NPARTIES" "'direct'"
done
inns p0 "$BIN" status | head -8
finish
