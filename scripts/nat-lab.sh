#!/usr/bin/env bash
# End-to-end test across real NATs, in network namespaces (after
# wireguard-go's tests/netns.sh).
#
#   "internet" namespace: bridge 203.0.113.0/24 with coturn (STUN) and the
#                         reference registry at 203.0.113.10
#   router i:            wan 203.0.113.(20+i), MASQUERADE, home-router firewall
#                         (new connections from the wan side are dropped)
#   party i:             192.168.(10+i).2 behind router i, running sfkit-proxy,
#                         a file server on 127.0.0.1:8000 and a line echo on :9000
#   party 2 has no key file: it takes its registry credential from a fake GCE
#                         metadata server on its loopback (GCE_METADATA_HOST),
#                         and the registry verifies the ID token (OIDC)
#   party 3 (optional):  the same, but the sidecar runs in a Docker container
#                         from the FROM-scratch image, as non-root, --cap-drop ALL
#
# Every party fetches every other party's file with real curl through
# ALL_PROXY=socks5h://127.0.0.1:1080 (sha256-checked), and talks to every
# other party's echo with ncat through the same proxy.
#
# Needs root, iproute2, iptables, coturn, curl, ncat, python3. Everything it
# creates is removed on exit, also on failure.
#
# Usage: scripts/nat-lab.sh [path/to/sfkit-proxy]   (env: SIZE_MB=50, DOCKER=auto|0)
set -euo pipefail

BIN=${1:-./sfkit-proxy}
SIZE_MB=${SIZE_MB:-50}
DOCKER=${DOCKER:-auto}
NPARTIES=3

if [ "$(id -u)" != 0 ]; then
	echo "SKIP nat-lab: needs root for network namespaces (run as root, as CI does)"
	exit 0
fi
for tool in ip iptables turnserver curl ncat python3 sha256sum go; do
	command -v "$tool" >/dev/null || { echo "nat-lab: $tool is missing (apt-get install iproute2 iptables coturn curl ncat python3)" >&2; exit 1; }
done
BIN=$(realpath "$BIN")
[ -x "$BIN" ] || { echo "nat-lab: no binary at $BIN (make build)" >&2; exit 1; }

ID=$$
DIR=$(mktemp -d /tmp/sfkit-nat-lab.XXXXXX)
chmod 755 "$DIR"
PIDS=()
NETNS=()
CONTAINER=""
IMAGE="sfkit-proxy-e2e:$ID"

log() { printf '%s nat-lab: %s\n' "$(date +%T)" "$*"; }

cleanup() {
	local rc=$?
	set +e
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
	if [ -n "$CONTAINER" ]; then
		if [ $rc -ne 0 ]; then docker logs "$CONTAINER" >"$DIR/p3.log" 2>&1; fi
		docker rm -f "$CONTAINER" >/dev/null 2>&1
		docker rmi -f "$IMAGE" >/dev/null 2>&1
	fi
	for n in "${NETNS[@]}"; do ip netns delete "$n" 2>/dev/null; done
	if [ $rc -ne 0 ]; then
		for f in "$DIR"/*.log; do
			[ -f "$f" ] || continue
			echo "----- $(basename "$f") (last 40 lines)"
			tail -n 40 "$f"
		done
		log "FAILED (rc=$rc)"
	fi
	rm -rf "$DIR"
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ns() { echo "sfk${ID}-$1"; }
addns() { ip netns add "$(ns "$1")"; NETNS+=("$(ns "$1")"); ip -n "$(ns "$1")" link set lo up; }
inns() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }
# veth A B: a veth pair with end "$3" in namespace $1 and end "$4" in $2.
veth() {
	local a="v${ID}a$5" b="v${ID}b$5"
	ip link add "$a" type veth peer name "$b"
	ip link set "$a" netns "$1" name "$3"
	ip link set "$b" netns "$2" name "$4"
}

INET=$(ns inet)
addns inet
inns inet ip link add br0 type bridge
inns inet ip addr add 203.0.113.10/24 dev br0
inns inet ip addr add 203.0.113.11/24 dev br0
inns inet ip link set br0 up

# router i with party i behind it; $2 is the party's namespace path or name.
router() {
	local i=$1 party=$2
	addns "r$i"
	local R; R=$(ns "r$i")
	veth "$R" "$INET" wan "p$i" "w$i"
	inns inet ip link set "p$i" master br0 up
	veth "$R" "$party" lan eth0 "l$i"
	ip -n "$R" addr add "203.0.113.$((20 + i))/24" dev wan
	ip -n "$R" addr add "192.168.$((10 + i)).1/24" dev lan
	ip -n "$R" link set wan up
	ip -n "$R" link set lan up
	ip netns exec "$R" sysctl -qw net.ipv4.ip_forward=1
	ip netns exec "$R" iptables -t nat -A POSTROUTING -o wan -j MASQUERADE
	# The home-router firewall (DESIGN.md: without it, Linux NATs do not punch).
	ip netns exec "$R" iptables -A INPUT -i wan -m conntrack --ctstate NEW -j DROP
	ip netns exec "$R" iptables -A FORWARD -i wan -m conntrack --ctstate NEW -j DROP
	ip -n "$party" addr add "192.168.$((10 + i)).2/24" dev eth0
	ip -n "$party" link set eth0 up
	ip -n "$party" route add default via "192.168.$((10 + i)).1"
}

# Services in the "internet".
inns inet turnserver -n --no-cli --stun-only --listening-ip=203.0.113.10 --listening-ip=203.0.113.11 --listening-port=3478 \
	--no-tls --no-dtls --log-file="$DIR/coturn.log" --simple-log --pidfile="$DIR/turn.pid" >/dev/null 2>&1 &
PIDS+=($!)
: >"$DIR/tokens"
for i in 0 1 2 3; do
	tok="e2e-token-$i-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
	echo "$tok e2e $i" >>"$DIR/tokens"
	printf '%s\n' "$tok" >"$DIR/token$i"
	chmod 644 "$DIR/token$i"
done
# Party 2's cloud: a fake GCE metadata server in its namespace, whose JWKS the
# registry trusts. It is started with party 2's namespace, below; the registry
# needs the JWKS first, so the namespace is made here.
addns p2
(cd "$(dirname "$0")/.." && go build -o "$DIR/fakemeta" ./scripts/fakemeta)
inns p2 "$DIR/fakemeta" --listen 127.0.0.1:8089 --email party2@e2e.iam.gserviceaccount.com \
	--jwks-out "$DIR/jwks.json" >"$DIR/fakemeta.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 50); do [ -s "$DIR/jwks.json" ] && break; sleep 0.1; done
echo "party2@e2e.iam.gserviceaccount.com e2e 2" >"$DIR/members"
sed -i '/ e2e 2$/d' "$DIR/tokens" # party 2 has no static token
inns inet "$BIN" registry --listen 203.0.113.10:8080 --tokens "$DIR/tokens" --data "$DIR/registry" \
	--oidc-issuer https://accounts.google.com --oidc-audience http://203.0.113.10:8080/ \
	--oidc-jwks "$DIR/jwks.json" --members "$DIR/members" >"$DIR/registry.log" 2>&1 &
PIDS+=($!)

SIDECAR_ARGS=(--study e2e --registry http://203.0.113.10:8080/ --stun 203.0.113.10:3478,203.0.113.11:3478
	--allow-ports 8000,9000 --log-level debug)

# A party's local services: a file server and an echo server on its loopback.
services() {
	local i=$1
	mkdir -p "$DIR/www$i"
	head -c "$((SIZE_MB << 20))" /dev/urandom >"$DIR/www$i/file"
	sha256sum <"$DIR/www$i/file" | cut -d' ' -f1 >"$DIR/sum$i"
	inns "p$i" python3 -m http.server 8000 --bind 127.0.0.1 --directory "$DIR/www$i" >"$DIR/http$i.log" 2>&1 &
	PIDS+=($!)
	inns "p$i" ncat -l 127.0.0.1 9000 --keep-open --sh-exec 'head -n 1' >"$DIR/echo$i.log" 2>&1 &
	PIDS+=($!)
}

for i in $(seq 0 $((NPARTIES - 1))); do
	[ "$i" = 2 ] || addns "p$i"
	router "$i" "$(ns "p$i")"
	services "$i"
	if [ "$i" = 2 ]; then
		# No key file: the credential comes from the (fake) cloud metadata server.
		inns "p$i" env GCE_METADATA_HOST=127.0.0.1:8089 SFKIT_PROXY_AZURE_IMDS=http://127.0.0.1:1 \
			"$BIN" --pid "$i" "${SIDECAR_ARGS[@]}" --state-dir "$DIR/state$i" >"$DIR/p$i.log" 2>&1 &
	else
		inns "p$i" "$BIN" --pid "$i" "${SIDECAR_ARGS[@]}" --state-dir "$DIR/state$i" \
			--auth-key-file "$DIR/token$i" >"$DIR/p$i.log" 2>&1 &
	fi
	PIDS+=($!)
done

# Party 3 in a Docker container, if Docker works here.
if [ "$DOCKER" != 0 ] && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
	log "building the FROM-scratch image and starting party 3 in it (non-root, --cap-drop ALL)"
	mkdir -p "$DIR/image" "$DIR/state3"
	chown 65534:65534 "$DIR/state3"
	# The image holds the binary alone, so it must be static (make build is).
	if go version -m "$BIN" 2>/dev/null | grep -q 'CGO_ENABLED=0'; then
		cp "$BIN" "$DIR/image/sfkit-proxy"
	else
		(cd "$(dirname "$0")/.." && CGO_ENABLED=0 go build -trimpath -o "$DIR/image/sfkit-proxy" .)
	fi
	cp "$(dirname "$0")/../Dockerfile" "$DIR/image/Dockerfile"
	docker build -q -t "$IMAGE" "$DIR/image" >"$DIR/docker-build.log" 2>&1
	CONTAINER="sfkit-e2e-$ID"
	docker run -d --name "$CONTAINER" --network none --cap-drop ALL --security-opt no-new-privileges \
		-v "$DIR/state3:/state" -v "$DIR/token3:/run/token:ro" "$IMAGE" \
		--pid 3 "${SIDECAR_ARGS[@]}" --state-dir /state --auth-key-file /run/token >/dev/null
	user=$(docker inspect -f '{{.Config.User}}' "$CONTAINER")
	[ "$user" = "65534:65534" ] || { echo "container user is '$user', want 65534:65534" >&2; exit 1; }
	cpid=$(docker inspect -f '{{.State.Pid}}' "$CONTAINER")
	ip netns attach "$(ns p3)" "$cpid"
	NETNS+=("$(ns p3)")
	router 3 "$(ns p3)"
	services 3
	NPARTIES=4
else
	log "SKIP docker party: docker is not available here (the three namespace parties still run)"
fi

# Wait for every party to be published and every pair to be connected.
log "waiting for $NPARTIES parties to register"
for _ in $(seq 1 60); do
	n=$(inns "p0" curl -s -H "Authorization: Bearer $(cat "$DIR/token0")" \
		http://203.0.113.10:8080/v1/studies/e2e/parties | grep -o '"pid":' | wc -l || true)
	[ "$n" = "$NPARTIES" ] && break
	sleep 0.5
done
[ "$n" = "$NPARTIES" ] || { echo "only $n of $NPARTIES parties registered" >&2; exit 1; }

fails=0
printf '%-5s %-5s %12s %8s %9s  %s\n' from to bytes seconds MB/s result | tee "$DIR/matrix"
for a in $(seq 0 $((NPARTIES - 1))); do
	for b in $(seq 0 $((NPARTIES - 1))); do
		[ "$a" = "$b" ] && continue
		out="$DIR/out-$a-$b"
		t0=$(date +%s.%N)
		if inns "p$a" env ALL_PROXY=socks5h://127.0.0.1:1080 curl -sS --fail --max-time 120 \
			--retry 5 --retry-all-errors --retry-delay 2 -o "$out" "http://10.0.0.$b:8000/file" 2>"$DIR/curl-$a-$b.err"; then
			t1=$(date +%s.%N)
			got=$(sha256sum <"$out" | cut -d' ' -f1)
			bytes=$(stat -c %s "$out")
			secs=$(awk "BEGIN{print $t1 - $t0}")
			if [ "$got" = "$(cat "$DIR/sum$b")" ]; then res=ok; else res="SHA256 MISMATCH"; fails=$((fails + 1)); fi
			printf '%-5s %-5s %12s %8.2f %9.1f  %s\n' "$a" "$b" "$bytes" "$secs" "$(awk "BEGIN{print $bytes/1e6/$secs}")" "$res"
		else
			printf '%-5s %-5s %12s %8s %9s  %s\n' "$a" "$b" - - - "CURL FAILED: $(tr '\n' ' ' <"$DIR/curl-$a-$b.err")"
			fails=$((fails + 1))
		fi
		rm -f "$out"
		msg="echo-$a-$b-$RANDOM"
		reply=$(echo "$msg" | inns "p$a" timeout 20 ncat --no-shutdown --proxy 127.0.0.1:1080 --proxy-type socks5 "10.0.0.$b" 9000 2>"$DIR/ncat-$a-$b.err" || true)
		if [ "$reply" != "$msg" ]; then
			echo "ncat echo $a -> $b: got '$reply', want '$msg' ($(tr '\n' ' ' <"$DIR/ncat-$a-$b.err"))"
			fails=$((fails + 1))
		fi
	done
done | tee -a "$DIR/matrix"
fails=$(grep -c -E 'FAILED|MISMATCH|ncat echo' "$DIR/matrix" || true)

# A port outside party 1's --allow-ports is refused before any data flows.
if inns p0 env ALL_PROXY=socks5h://127.0.0.1:1080 curl -sS --max-time 20 -o /dev/null http://10.0.0.1:22/ 2>"$DIR/denied.err"; then
	echo "port 22 at party 1 was reachable, want refused"
	fails=$((fails + 1))
else
	log "port 22 at party 1 refused as it should be: $(cat "$DIR/denied.err")"
fi

# Every pair is connected directly, each peer seen at its router's wan
# address: the packets crossed both NATs.
for a in $(seq 0 $((NPARTIES - 1))); do
	logf="$DIR/p$a.log"
	[ "$a" = 3 ] && [ -n "$CONTAINER" ] && docker logs "$CONTAINER" >"$logf" 2>&1
	for b in $(seq 0 $((NPARTIES - 1))); do
		[ "$a" = "$b" ] && continue
		if ! grep -q "msg=\"peer connected\".* peer=$b path=direct addr=203.0.113.$((20 + b)):" "$logf"; then
			echo "party $a has no direct connection to party $b through its NAT"
			fails=$((fails + 1))
		fi
	done
done

if grep -q 'msg="registry credential" party=2 source="gce metadata"' "$DIR/p2.log"; then
	log "party 2 registered with an ID token from the (fake) GCE metadata server"
else
	echo "party 2 did not take its credential from the metadata server"
	fails=$((fails + 1))
fi

# Each party's own status API says every peer is direct and has carried bytes.
for a in $(seq 0 $((NPARTIES - 1))); do
	if ! inns "p$a" "$BIN" status --json >"$DIR/status$a.json" 2>"$DIR/status$a.err"; then
		echo "party $a: sfkit-proxy status failed: $(cat "$DIR/status$a.err")"
		fails=$((fails + 1))
		continue
	fi
	if ! python3 - "$DIR/status$a.json" "$a" "$NPARTIES" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
me, n = int(sys.argv[2]), int(sys.argv[3])
peers = {p["pid"]: p for p in s["peers"]}
bad = [f"peer {b}: {peers.get(b)}" for b in range(n) if b != me and not (
    b in peers and peers[b]["state"] == "direct" and peers[b]["bytes_sent"] > 0 and peers[b]["bytes_received"] > 0)]
# Two STUN addresses saw the same mapping: MASQUERADE is endpoint-independent.
if bad or not s["registry"]["reachable"] or not s["stun"]["done"] or s["nat"] != "endpoint-independent":
    print(f"party {me} status: " + "; ".join(bad) + f" registry={s['registry']} stun={s['stun']} nat={s['nat']}")
    sys.exit(1)
PY
	then
		fails=$((fails + 1))
	fi
done
inns p0 "$BIN" status | tee "$DIR/status-table.txt"

if [ "$fails" -ne 0 ]; then
	echo "nat-lab: $fails checks failed"
	exit 1
fi
pairs=$((NPARTIES * (NPARTIES - 1)))
log "$pairs ordered pairs: ${SIZE_MB} MiB curl transfers verified, ncat echoes answered, all direct through the NATs"
# transfers, echoes and direct paths per pair; a status per party; the
# refused port; the cloud credential
echo "$((3 * pairs + NPARTIES + 2)) passed, 0 failed"
