# shellcheck shell=bash
# The NAT lab's common parts, sourced by nat-lab.sh and relay-lab.sh: network
# namespaces joined by veth pairs (after wireguard-go's tests/netns.sh),
# routers doing NAT with iptables, coturn and the registry in an "internet"
# of documentation addresses, and the checks every scenario runs. Everything
# made is removed on exit (trap), also on failure.
#
#   "internet" namespace: bridge 203.0.113.0/24; coturn (STUN, TURN) at
#                         203.0.113.10, a STUN-only coturn at .11, the
#                         registry at 203.0.113.10:8080
#   router i:             wan 203.0.113.(20+i), lan 192.168.(10+i).1
#   party i:              192.168.(10+i).2, sfkit-proxy, a file server on
#                         127.0.0.1:8000 and a line echo on 127.0.0.1:9000

LAB=${LAB:-lab}
BIN=$(realpath "${1:-./sfkit-proxy}")
SIZE_MB=${SIZE_MB:-50}

if [ "$(id -u)" != 0 ]; then
	echo "SKIP $LAB: needs root for network namespaces (run as root, as CI does)"
	exit 0
fi
for tool in ip iptables turnserver curl ncat python3 sha256sum go; do
	command -v "$tool" >/dev/null || { echo "$LAB: $tool is missing (apt-get install iproute2 iptables coturn curl ncat python3)" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "$LAB: no binary at $BIN (make build)" >&2; exit 1; }

ID=$$
DIR=$(mktemp -d "/tmp/sfkit-$LAB.XXXXXX")
chmod 755 "$DIR"
PIDS=()
NETNS=()
CLEANUPS=()
PASSED=0
FAILED=0

log() { printf '%s %s: %s\n' "$(date +%T)" "$LAB" "$*"; }
pass() { PASSED=$((PASSED + 1)); }
fail() { echo "FAIL: $*"; FAILED=$((FAILED + 1)); }

# alive PID: the process runs and is this lab's child (neither gone, nor
# a zombie, nor another process that got the number since).
alive() {
	local st
	st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	st=${st##*) } # past the command's name: state, ppid, …
	[ "${st%% *}" != Z ] && [ "$(echo "$st" | cut -d' ' -f2)" = "$$" ]
}

cleanup() {
	local rc=$?
	set +e
	for c in "${CLEANUPS[@]}"; do eval "$c"; done
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
	# Each must stop within 20 s of SIGTERM: one that does not is a bug
	# (the lab fails, with its goroutines in its log), not a hang.
	local until=$((SECONDS + 20))
	for p in "${PIDS[@]}"; do
		while alive "$p" && [ "$SECONDS" -lt "$until" ]; do sleep 0.2; done
		if alive "$p"; then
			echo "FAIL: process $p ($(tr '\0' ' ' </proc/"$p"/cmdline | cut -c1-100)) did not stop within 20 s of SIGTERM"
			kill -QUIT "$p" 2>/dev/null
			sleep 1
			kill -9 "$p" 2>/dev/null
			[ "$rc" -eq 0 ] && rc=1
		fi
		wait "$p" 2>/dev/null
	done
	# Whatever still runs in our namespaces was started by this lab too.
	for n in "${NETNS[@]}"; do ip netns pids "$n" 2>/dev/null | xargs -r kill 2>/dev/null; done
	sleep 0.2
	for n in "${NETNS[@]}"; do ip netns pids "$n" 2>/dev/null | xargs -r kill -9 2>/dev/null; done
	for n in "${NETNS[@]}"; do ip netns delete "$n" 2>/dev/null; done
	if [ $rc -ne 0 ]; then
		for f in "$DIR"/*.log; do
			[ -f "$f" ] || continue
			echo "----- $(basename "$f") (last 40 lines)"
			tail -n 40 "$f"
		done
		log "FAILED (rc=$rc)"
	fi
	if [ "${KEEP:-0}" = 1 ]; then
		log "kept its logs in $DIR (KEEP=1)"
	else
		rm -rf "$DIR"
	fi
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# doc_block PAGE NAME: the code block of PAGE (docs/operations.md) that a
# <!-- run: … NAME --> marker names, so that a lab runs what the page says.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
doc_block() { (cd "$REPO" && go run ./scripts/docblock "$1" "$2"); }

ns() { echo "sfk${ID}-$1"; }
addns() { ip netns add "$(ns "$1")"; NETNS+=("$(ns "$1")"); ip -n "$(ns "$1")" link set lo up; }
inns() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }
# spawn NS LOG CMD...: CMD in namespace NS, in the background, its output in
# LOG. `ip netns exec` execs CMD, so the PID recorded is CMD's own.
spawn() {
	local n=$1 logf=$2
	shift 2
	ip netns exec "$(ns "$n")" "$@" >"$logf" 2>&1 &
	PIDS+=($!)
}
# veth NS_A NS_B NAME_A NAME_B TAG: a veth pair between two namespaces.
veth() {
	local a="v${ID}a$5" b="v${ID}b$5"
	ip link add "$a" type veth peer name "$b"
	ip link set "$a" netns "$1" name "$3"
	ip link set "$b" netns "$2" name "$4"
}

# internet: the bridge, coturn and the registry. Extra turnserver and
# registry arguments come in TURN_ARGS and REGISTRY_ARGS (arrays). With
# TURN_CONF set, coturn reads that configuration file (its command line,
# TURN_ARGS, overrides it) and logs to stdout, as the file says.
internet() {
	addns inet
	inns inet ip link add br0 type bridge
	inns inet ip addr add 203.0.113.10/24 dev br0
	inns inet ip addr add 203.0.113.11/24 dev br0
	inns inet ip link set br0 up
	if [ -n "${TURN_CONF:-}" ]; then
		spawn inet "$DIR/coturn.log" turnserver -c "$TURN_CONF" --listening-ip=203.0.113.10 --listening-port=3478 \
			--pidfile="$DIR/turn.pid" "${TURN_ARGS[@]}"
	else
		spawn inet /dev/null turnserver -n --no-cli --listening-ip=203.0.113.10 --listening-port=3478 \
			--no-dtls --log-file="$DIR/coturn.log" --simple-log --pidfile="$DIR/turn.pid" "${TURN_ARGS[@]}"
	fi
	# A second STUN server, so that parties can tell their NAT's behaviour.
	stun_server inet 203.0.113.11
	tokens e2e 4
}

# stun_server NS IP: a STUN-only coturn in namespace NS on IP:3478.
stun_server() {
	spawn "$1" /dev/null turnserver -n --no-cli --listening-ip="$2" --listening-port=3478 --stun-only --no-tls \
		--no-dtls --log-file="$DIR/coturn-stun-$2.log" --simple-log --pidfile="$DIR/turn-stun-$2.pid"
}

# tokens STUDY N: registry tokens for parties 0 to N-1 of STUDY, in
# $DIR/tokens (the registry's file) and $DIR/tokenI (each party's).
tokens() {
	: >"$DIR/tokens"
	for i in $(seq 0 $(($2 - 1))); do
		tok="$LAB-token-$i-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
		echo "$tok $1 $i" >>"$DIR/tokens"
		printf '%s\n' "$tok" >"$DIR/token$i"
		chmod 644 "$DIR/token$i"
	done
}

start_registry() {
	spawn inet "$DIR/registry.log" "$BIN" registry --listen 203.0.113.10:8080 --tokens "$DIR/tokens" --data "$DIR/registry" \
		"${REGISTRY_ARGS[@]}"
}

# router I PARTY_NS KIND: router i between the internet and party i's
# namespace. KIND is cone (MASQUERADE), symmetric (MASQUERADE --random-fully:
# a new port per destination) or udp-blocked (cone, and every forwarded UDP
# packet dropped). All have the home-router firewall: without it an
# unsolicited punch packet makes a conntrack entry on the router and punching
# between two Linux NATs fails (DESIGN.md).
router() {
	local i=$1 party=$2 kind=${3:-cone}
	addns "r$i"
	local R; R=$(ns "r$i")
	veth "$R" "$(ns inet)" wan "p$i" "w$i"
	inns inet ip link set "p$i" master br0 up
	veth "$R" "$party" lan eth0 "l$i"
	ip -n "$R" addr add "203.0.113.$((20 + i))/24" dev wan
	ip -n "$R" addr add "192.168.$((10 + i)).1/24" dev lan
	ip -n "$R" link set wan up
	ip -n "$R" link set lan up
	ip netns exec "$R" sysctl -qw net.ipv4.ip_forward=1
	if [ "$kind" = symmetric ]; then
		ip netns exec "$R" iptables -t nat -A POSTROUTING -o wan -j MASQUERADE --random-fully
	else
		ip netns exec "$R" iptables -t nat -A POSTROUTING -o wan -j MASQUERADE
	fi
	ip netns exec "$R" iptables -A INPUT -i wan -m conntrack --ctstate NEW -j DROP
	ip netns exec "$R" iptables -A FORWARD -i wan -m conntrack --ctstate NEW -j DROP
	if [ "$kind" = udp-blocked ]; then
		ip netns exec "$R" iptables -I FORWARD 1 -p udp -j DROP
	fi
	ip -n "$party" addr add "192.168.$((10 + i)).2/24" dev eth0
	ip -n "$party" link set eth0 up
	ip -n "$party" route add default via "192.168.$((10 + i)).1"
}

# public I PARTY_NS: party i on the internet itself, at 203.0.113.(20+i),
# with no NAT and no firewall (a cloud VM with a public address).
public() {
	local i=$1 party=$2
	veth "$(ns inet)" "$party" "p$i" eth0 "u$i"
	inns inet ip link set "p$i" master br0 up
	ip -n "$party" addr add "203.0.113.$((20 + i))/24" dev eth0
	ip -n "$party" link set eth0 up
}

# services I: party i's file server and line echo on its loopback. FILE_GEN,
# if set, is a command that writes the file to stdout instead of random bytes.
services() {
	local i=$1
	mkdir -p "$DIR/www$i"
	if [ -n "${FILE_GEN:-}" ]; then
		$FILE_GEN >"$DIR/www$i/file"
	else
		head -c "$((SIZE_MB << 20))" /dev/urandom >"$DIR/www$i/file"
	fi
	sha256sum <"$DIR/www$i/file" | cut -d' ' -f1 >"$DIR/sum$i"
	spawn "p$i" "$DIR/http$i.log" python3 -m http.server 8000 --bind 127.0.0.1 --directory "$DIR/www$i"
	spawn "p$i" "$DIR/echo$i.log" ncat -l 127.0.0.1 9000 --keep-open --sh-exec 'head -n 1'
}

# wait_registered N: until the registry lists N parties.
wait_registered() {
	local n=0
	log "waiting for $1 parties to register"
	for _ in $(seq 1 60); do
		n=$(inns p0 curl -s -H "Authorization: Bearer $(cat "$DIR/token0")" \
			http://203.0.113.10:8080/v1/studies/e2e/parties | grep -o '"pid":' | wc -l || true)
		[ "$n" = "$1" ] && return 0
		sleep 0.5
	done
	echo "only $n of $1 parties registered" >&2
	exit 1
}

# fetch A B [CURL_ARGS...]: party a fetches party b's file through its proxy
# with curl; prints a matrix row and records pass or fail.
fetch() {
	local a=$1 b=$2
	shift 2
	local out="$DIR/out-$a-$b" t0 t1 secs bytes
	t0=$(date +%s.%N)
	if inns "p$a" env ALL_PROXY=socks5h://127.0.0.1:1080 curl -sS --fail --max-time 300 \
		--retry 2 --retry-all-errors --retry-delay 2 "$@" -o "$out" "http://10.0.0.$b:8000/file" 2>"$DIR/curl-$a-$b.err"; then
		t1=$(date +%s.%N)
		bytes=$(stat -c %s "$out")
		secs=$(awk "BEGIN{print $t1 - $t0}")
		if [ "$(sha256sum <"$out" | cut -d' ' -f1)" = "$(cat "$DIR/sum$b")" ]; then
			printf '%-5s %-5s %12s %8.2f %9.1f  ok\n' "$a" "$b" "$bytes" "$secs" "$(awk "BEGIN{print $bytes/1e6/$secs}")"
			pass
		else
			fail "$a -> $b: sha256 differs"
		fi
	else
		fail "$a -> $b: curl: $(tr '\n' ' ' <"$DIR/curl-$a-$b.err")"
	fi
	rm -f "$out"
}

# echo_check A B: a line through party a's proxy to party b's echo.
echo_check() {
	local a=$1 b=$2 msg reply
	msg="echo-$a-$b-$RANDOM"
	reply=$(echo "$msg" | inns "p$a" timeout 20 ncat --no-shutdown --proxy 127.0.0.1:1080 --proxy-type socks5 \
		"10.0.0.$b" 9000 2>"$DIR/ncat-$a-$b.err" || true)
	if [ "$reply" = "$msg" ]; then pass; else fail "ncat echo $a -> $b: got '$reply' ($(tr '\n' ' ' <"$DIR/ncat-$a-$b.err"))"; fi
}

# matrix N: every ordered pair of N parties: a curl transfer and an echo.
matrix() {
	printf '%-5s %-5s %12s %8s %9s  %s\n' from to bytes seconds MB/s result
	for a in $(seq 0 $(($1 - 1))); do
		for b in $(seq 0 $(($1 - 1))); do
			[ "$a" = "$b" ] && continue
			fetch "$a" "$b"
			echo_check "$a" "$b"
		done
	done
}

# check_status A N EXPECT: party a's `sfkit-proxy status --json` reports
# every other of N parties in a state EXPECT names: EXPECT is a Python
# expression over b (the peer's pid) giving the wanted state, e.g. "'direct'".
check_status() {
	local a=$1 n=$2 expect=$3
	if ! inns "p$a" "$BIN" status --json >"$DIR/status$a.json" 2>"$DIR/status$a.err"; then
		fail "party $a: sfkit-proxy status: $(cat "$DIR/status$a.err")"
		return
	fi
	if python3 - "$DIR/status$a.json" "$a" "$n" "$expect" <<'PY'; then pass; else fail "party $a status"; fi
import json, sys
s = json.load(open(sys.argv[1]))
me, n, expect = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
peers = {p["pid"]: p for p in s["peers"]}
bad = []
for b in range(n):
    if b == me:
        continue
    want = eval(expect, {"b": b, "me": me})
    p = peers.get(b)
    if not p or p["state"] != want or p["bytes_sent"] == 0 or p["bytes_received"] == 0:
        bad.append(f"peer {b}: want {want} with bytes both ways, got {p and (p['state'], p.get('via'), p['bytes_sent'], p['bytes_received'])}")
if bad or not s["registry"]["reachable"]:
    print(f"party {me} status: " + "; ".join(bad) + f" registry={s['registry']}")
    sys.exit(1)
PY
}

# netcheck_is I NAT UDP [ARGS...]: `sfkit-proxy netcheck --json` in party
# i's namespace (with the lab's two STUN servers, and ARGS) must report
# that mapping behaviour (endpoint-independent, endpoint-dependent, none
# or unknown) and UDP (True or False), and an allocation from every relay
# ARGS give; its one line of advice is printed.
netcheck_is() {
	local i=$1 nat=$2 udp=$3
	shift 3
	if ! inns "p$i" "$BIN" netcheck --json --stun 203.0.113.10:3478,203.0.113.11:3478 "$@" >"$DIR/netcheck$i.json" 2>&1; then
		fail "party $i: netcheck failed: $(cat "$DIR/netcheck$i.json")"
		return
	fi
	if python3 - "$DIR/netcheck$i.json" "$i" "$nat" "$udp" <<'PY'; then pass; else fail "party $i: netcheck: $(tr -d "\n" <"$DIR/netcheck$i.json")"; fi
import json, sys
r = json.load(open(sys.argv[1]))
i, nat, udp = sys.argv[2], sys.argv[3], sys.argv[4] == "True"
print(f"party {i} netcheck: NAT {r['nat']}, UDP {r['udp']}, relays {[(t['relay'], t.get('allocated') or t.get('error')) for t in r.get('relays', [])]}: {r['advice']}")
sys.exit(0 if r["nat"] == nat and r["udp"] == udp and all(t.get("allocated") for t in r.get("relays", [])) else 1)
PY
}

# paced_source I CHUNKS: a source on party i's 127.0.0.1:9100 that paces
# itself, CHUNKS chunks of 100 kB a second apart, to one connection at a
# time; its sha256 is in $DIR/slow.sum.
paced_source() {
	local i=$1 n=$2
	cat >"$DIR/slow.sh" <<SLOW
#!/bin/sh
for i in \$(seq 1 $n); do
	yes "slow-chunk-\$i" | head -c 100000
	sleep 1
done
SLOW
	chmod +x "$DIR/slow.sh"
	sh -c "for i in \$(seq 1 $n); do yes slow-chunk-\$i | head -c 100000; done" | sha256sum | cut -d' ' -f1 >"$DIR/slow.sum"
	spawn "p$i" "$DIR/slow-server.log" ncat -l 127.0.0.1 9100 --sh-exec "$DIR/slow.sh"
	sleep 0.5
}

# no_plaintext MIN FILE...: the captures in FILE... hold at least MIN
# bytes (the transfer crossed them) and none of $MARKER, the text of
# party 1's file.
no_plaintext() {
	local min=$1 captured
	shift
	captured=$(cat "$@" | wc -c)
	if [ "$captured" -lt "$min" ]; then
		fail "the captures hold only $captured bytes; the transfer did not cross the relay"
	elif cat "$@" | grep -c -a "$MARKER" >/dev/null; then
		fail "a relay-side capture shows the file's text"
	else
		log "relay-side capture: $captured bytes, none of the file's text"
		pass
	fi
	grep -q -a "$MARKER" "$DIR/www1/file" || fail "the marker check is vacuous: the file lacks the marker"
}

# finish: the closing line CI reads.
finish() {
	if [ "$FAILED" -ne 0 ]; then
		echo "$PASSED passed, $FAILED failed"
		exit 1
	fi
	log "all checks passed"
	echo "$PASSED passed, 0 failed"
}
