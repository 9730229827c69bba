#!/usr/bin/env bash
# The docs lab: the command blocks of README.md, docs/sfkit.md and
# docs/operations.md that a newcomer types, run as the pages give them. Each
# block is fetched by its name (<!-- run: scripts/docs-lab.sh NAME -->, with
# scripts/docblock), so that what runs is what the page says:
#
#   install, sfkit-install  build and install the binary (into a tmpfs on
#                           /usr/local/bin, in this lab's own mount namespace)
#   registry-quick/registry the operator's registry, with TLS, in the lab's
#                           "internet" as registry.example.org
#   party, reach            two parties behind cone NATs, each as the README
#                           starts it (party 0 with its own --pid), and curl
#                           through the tunnel to party 0's web server
#   working, monitoring     status, ping, /readyz and /metrics on a party
#   netcheck                the NAT diagnosis on a party
#   systemd                 examples/*.service pass systemd-analyze verify
#   docker                  make image and the sidecar's docker run with a
#                           named volume: it starts, creates its key, and
#                           warns that the image has no CA bundle
#   docker-registry         the registry's docker run answers over TLS
#   compose                 examples/docker-compose.yml: a registry, coturn
#                           and two parties that ping each other
#
# Where a page's command cannot run here as it stands, a shell function
# stands in and says why: `sudo` (the lab is root), `docker run` gets
# --network none for the sidecar (no registry is reachable from Docker's
# bridge, and nothing leaves the machine), `docker compose` is Debian's
# docker-compose where the plugin is missing, with exec -T (no TTY in CI).
# The Docker parts skip, saying so, when Docker does not work here.
#
# Usage: scripts/docs-lab.sh [path/to/sfkit-proxy]
set -euo pipefail

if [ "$(id -u)" = 0 ] && [ "${DOCS_LAB_UNSHARED:-}" != 1 ]; then
	# A mount namespace of the lab's own, so that the install blocks write
	# to a /usr/local/bin that vanishes with the lab.
	DOCS_LAB_UNSHARED=1 exec unshare -m --propagation private "$0" "$@"
fi

LAB=docs-lab
# shellcheck source=lab-lib.sh
. "$(dirname "$0")/lab-lib.sh"
for tool in openssl unshare systemd-analyze; do
	command -v "$tool" >/dev/null || { echo "$LAB: $tool is missing (apt-get install openssl util-linux systemd)" >&2; exit 1; }
done
mount -t tmpfs -o mode=755 docs-lab /usr/local/bin
export PATH=/usr/local/bin:$PATH

# run_block NS WORKDIR LOG PAGE NAME [SED] [ENV...]: block NAME of PAGE, as
# bash -e in WORKDIR, in namespace NS ("-": here), its output appended to
# LOG. SED, if not empty, edits the block first (party 0's --pid).
run_block() {
	local n=$1 wd=$2 logf=$3 page=$4 name=$5 sub=${6:-}
	shift 6 || shift $#
	local f="$DIR/block-$name-$n.sh"
	{
		echo 'sudo() { "$@"; }'
		doc_block "$page" "$name" | if [ -n "$sub" ]; then sed -e "$sub"; else cat; fi
	} >"$f"
	echo "\$ # $page: $name" >>"$logf"
	if [ "$n" = - ]; then
		(cd "$wd" && env "$@" bash -e "$f") >>"$logf" 2>&1
	else
		ip netns exec "$(ns "$n")" env -C "$wd" "$@" bash -e "$f" >>"$logf" 2>&1
	fi
}
# retry TRIES CMD...: CMD until it succeeds, a second apart.
retry() {
	local n=$1
	shift
	for _ in $(seq 1 "$n"); do
		"$@" && return 0
		sleep 1
	done
	return 1
}
want() { # want FILE TEXT WHAT: pass if FILE has TEXT, else fail saying WHAT
	if grep -qF -- "$2" "$1"; then pass; else fail "$3: no '$2' in $(basename "$1"): $(tail -n 5 "$1" | tr '\n' ' ')"; fi
}

# --- Install (README, docs/sfkit.md) ---------------------------------------
log "install: the README's build and install, then docs/sfkit.md's"
run_block - "$REPO" "$DIR/install.log" README.md install ""
run_block - "$REPO" "$DIR/install.log" docs/sfkit.md sfkit-install ""
if [ -x /usr/local/bin/sfkit-proxy ] && [ "$(/usr/local/bin/sfkit-proxy version)" = "$("$BIN" version)" ]; then
	log "installed: $(/usr/local/bin/sfkit-proxy version)"
	pass
else
	fail "the install blocks left no sfkit-proxy of this build in /usr/local/bin: $(tail -n 3 "$DIR/install.log" | tr '\n' ' ')"
fi

# --- The self-hosted quickstart (README, docs/operations.md) -----------------
TURN_ARGS=(--stun-only --no-tls)
internet
[ "$(doc_block README.md registry-quick)" = "$(doc_block docs/operations.md registry)" ] ||
	fail "README.md's registry-quick block and docs/operations.md's registry block differ: the lab runs one of them"
OP=$DIR/operator
mkdir -p "$OP"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=registry.example.org \
	-addext subjectAltName=DNS:registry.example.org -keyout "$OP/key.pem" -out "$OP/cert.pem" 2>/dev/null
log "registry: docs/operations.md's block, in the lab's internet as registry.example.org (203.0.113.10)"
run_block inet "$OP" "$DIR/registry.log" docs/operations.md registry ""
for i in 0 1; do
	addns "p$i"
	router "$i" "$(ns "p$i")" cone
	mkdir -p "/etc/netns/$(ns "p$i")" "$DIR/p$i/www"
	CLEANUPS+=("rm -rf /etc/netns/$(ns "p$i")")
	echo "203.0.113.10 registry.example.org" >"/etc/netns/$(ns "p$i")/hosts"
	awk -v p="$i" '$3 == p { print $1 }' "$OP/tokens" >"$DIR/p$i/token"
done
[ -s "$DIR/p0/token" ] && [ -s "$DIR/p1/token" ] || { fail "the registry block wrote no token for parties 0 and 1"; exit 1; }
retry 20 inns p0 curl -sf --cacert "$OP/cert.pem" https://registry.example.org:8443/healthz >/dev/null ||
	{ fail "the registry does not answer at https://registry.example.org:8443/"; exit 1; }
pass
echo "hello from party 0's web server" >"$DIR/p0/www/hello.txt"
spawn p0 "$DIR/http0.log" python3 -m http.server 8000 --bind 127.0.0.1 --directory "$DIR/p0/www"
PARTY_ENV=(SSL_CERT_FILE="$OP/cert.pem" SFKIT_PROXY_STUN=203.0.113.10:3478,203.0.113.11:3478)
log "parties: the README's party block (party 0 with --pid 0), each behind a cone NAT"
run_block p0 "$DIR/p0" "$DIR/p0.log" README.md party 's/--pid 1/--pid 0/' "${PARTY_ENV[@]}" XDG_STATE_HOME="$DIR/p0/state"
run_block p1 "$DIR/p1" "$DIR/p1.log" README.md party "" "${PARTY_ENV[@]}" XDG_STATE_HOME="$DIR/p1/state"
reach() {
	: >"$DIR/reach.log"
	run_block p1 "$DIR/p1" "$DIR/reach.log" README.md reach "" && grep -q "hello.txt" "$DIR/reach.log"
}
if retry 60 reach; then
	log "party 1's curl through the tunnel listed party 0's web server"
	pass
else
	fail "party 1's curl did not reach party 0's 127.0.0.1:8000: $(tail -n 3 "$DIR/reach.log" | tr '\n' ' ')"
fi
want "$DIR/p1.log" 'msg="peer connected"' "party 1's log has no 'peer connected' line, which the README promises"

log "working, monitoring: status, ping, /readyz and /metrics on party 1"
run_block p1 "$DIR/p1" "$DIR/working.log" README.md working "" || true
want "$DIR/working.log" "pong from party 0 via direct" "README's working block"
grep -E '^0 +direct ' "$DIR/working.log" >/dev/null && pass || fail "status does not show party 0 direct: $(cat "$DIR/working.log")"
run_block p1 "$DIR/p1" "$DIR/monitoring.log" docs/operations.md monitoring "" || true
want "$DIR/monitoring.log" 'sfkit_proxy_peer_state{peer="0",state="direct"} 1' "docs/operations.md's monitoring block"
want "$DIR/monitoring.log" "ready" "docs/operations.md's monitoring block (/readyz)"

log "netcheck: docs/sfkit.md's block on party 1"
if run_block p1 "$DIR/p1" "$DIR/netcheck.log" docs/sfkit.md netcheck "" SFKIT_PROXY_STUN=203.0.113.10:3478,203.0.113.11:3478; then
	want "$DIR/netcheck.log" "endpoint-independent" "netcheck behind a cone NAT"
else
	fail "netcheck failed: $(tail -n 5 "$DIR/netcheck.log" | tr '\n' ' ')"
fi

# --- systemd (docs/operations.md, examples/) ---------------------------------
log "systemd: examples/*.service with systemd-analyze verify (the binary installed above)"
if systemd-analyze verify "$REPO"/examples/*.service >"$DIR/systemd.log" 2>&1; then pass; else fail "systemd-analyze verify: $(cat "$DIR/systemd.log")"; fi

# --- Docker (docs/sfkit.md, docs/operations.md, examples/docker-compose.yml) --
if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
	log "SKIP docker, docker-registry, compose: Docker does not work here"
	log "$PASSED passed, $FAILED failed"
	[ "$FAILED" = 0 ]
	exit
fi
for c in sfkit-proxy sfkit-registry; do
	if docker inspect "$c" >/dev/null 2>&1; then echo "$LAB: a container named $c exists already; the docs' commands would collide with it" >&2; exit 1; fi
done
for v in sfkit-state sfkit-registry; do
	if docker volume inspect "$v" >/dev/null 2>&1; then echo "$LAB: a volume named $v exists already; the docs' commands would reuse it" >&2; exit 1; fi
done
docker image inspect sfkit-proxy:latest >/dev/null 2>&1 && had_image=1 || had_image=0
CLEANUPS+=("docker rm -f sfkit-proxy sfkit-registry >/dev/null 2>&1; docker volume rm -f sfkit-state sfkit-registry >/dev/null 2>&1")
[ "$had_image" = 0 ] && CLEANUPS+=("docker rmi -f sfkit-proxy:latest >/dev/null 2>&1")
# The page's docker run, with --network none: from Docker's bridge the
# sidecar would try to reach registry.example.org on the real internet.
cat >"$DIR/docker-shim.sh" <<'EOF'
make() { command make -C "$REPO" "$@"; }
docker() {
	case "$1" in
	run) shift; command docker run --network none "$@" ;;
	*) command docker "$@" ;;
	esac
}
EOF
mkdir -p "$DIR/dk"
cp "$DIR/p1/token" "$DIR/dk/token"
chmod 644 "$DIR/dk/token"
log "docker: docs/sfkit.md's make image and docker run, with a named volume"
{
	cat "$DIR/docker-shim.sh"
	doc_block docs/sfkit.md docker
} >"$DIR/block-docker.sh"
if (cd "$DIR/dk" && REPO=$REPO bash -e "$DIR/block-docker.sh") >"$DIR/docker.log" 2>&1; then
	key=""
	for _ in $(seq 1 20); do
		key=$(docker cp sfkit-proxy:/state/identity.key - 2>/dev/null | tar -tvf - 2>/dev/null || true)
		[ -n "$key" ] && break
		sleep 0.5
	done
	docker logs sfkit-proxy >"$DIR/docker-sidecar.log" 2>&1 || true
	if [ -n "$key" ] && [ "$(docker inspect -f '{{.State.Running}}' sfkit-proxy)" = true ]; then
		log "the sidecar runs in its container and made its key in the named volume: $key"
		pass
	else
		fail "the documented docker run: no running sidecar with /state/identity.key: $(tail -n 5 "$DIR/docker-sidecar.log" | tr '\n' ' ')"
	fi
	want "$DIR/docker-sidecar.log" "no CA certificates on this system" "the scratch image's CA-bundle warning"
else
	fail "docs/sfkit.md's docker block failed: $(tail -n 5 "$DIR/docker.log" | tr '\n' ' ')"
fi

log "docker-registry: docs/operations.md's docker run of the registry"
if ss -Hltn 'sport = :8443' | grep -q .; then
	log "SKIP docker-registry: port 8443 is taken on this machine"
else
	chmod 644 "$OP/tokens" "$OP/key.pem"
	if run_block - "$OP" "$DIR/docker-registry.log" docs/operations.md docker-registry "" &&
		retry 20 curl -sf --cacert "$OP/cert.pem" --resolve registry.example.org:8443:127.0.0.1 \
			-H "Authorization: Bearer $(cat "$DIR/p0/token")" https://registry.example.org:8443/v1/studies/gwas-42/parties \
			>"$DIR/docker-registry.out"; then
		log "the registry in Docker answers over TLS with the study's (empty) list"
		pass
	else
		docker logs sfkit-registry >>"$DIR/docker-registry.log" 2>&1 || true
		fail "the registry's docker run: $(tail -n 5 "$DIR/docker-registry.log" | tr '\n' ' ')"
	fi
fi
docker rm -f sfkit-proxy sfkit-registry >/dev/null 2>&1 || true

# The compose file's coturn/coturn image cannot be pulled here: the lab
# builds one of that name from this machine's turnserver and its libraries
# (same entrypoint contract: arguments go to turnserver), and removes it.
log "compose: examples/docker-compose.yml, as docs/operations.md runs it"
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
	fail "neither docker compose nor docker-compose is installed (apt-get install docker-compose)"
else
	if ! docker image inspect coturn/coturn:4.6 >/dev/null 2>&1; then
		mkdir -p "$DIR/coturn/root/usr/bin"
		cp "$(command -v turnserver)" "$DIR/coturn/root/usr/bin/"
		for lib in $(ldd "$(command -v turnserver)" | grep -o '/[^ ]*'); do
			mkdir -p "$DIR/coturn/root$(dirname "$lib")"
			cp -L "$lib" "$DIR/coturn/root$lib"
		done
		printf 'FROM scratch\nCOPY root/ /\nUSER 65534:65534\nENTRYPOINT ["/usr/bin/turnserver"]\n' >"$DIR/coturn/Dockerfile"
		docker build -q -t coturn/coturn:4.6 "$DIR/coturn" >"$DIR/coturn-build.log" 2>&1
		CLEANUPS+=("docker rmi -f coturn/coturn:4.6 >/dev/null 2>&1")
	fi
	export COMPOSE_PROJECT_NAME="sfkitdocs$ID"
	CLEANUPS=("(cd '$REPO' && if docker compose version >/dev/null 2>&1; then docker compose -f examples/docker-compose.yml down -v; else docker-compose -f examples/docker-compose.yml down -v; fi) >/dev/null 2>&1" "${CLEANUPS[@]}")
	cat >"$DIR/compose-shim.sh" <<'EOF'
docker() {
	if [ "$1" = compose ] && ! command docker compose version >/dev/null 2>&1; then
		shift
		local args=()
		for a in "$@"; do
			args+=("$a")
			[ "$a" = exec ] && args+=(-T)
		done
		docker-compose "${args[@]}"
	else
		command docker "$@"
	fi
}
EOF
	{
		cat "$DIR/compose-shim.sh"
		doc_block docs/operations.md compose
	} >"$DIR/block-compose.sh"
	compose() { (cd "$REPO" && bash -e "$DIR/block-compose.sh") >"$DIR/compose.log" 2>&1; }
	# ping needs the parties connected: the block is run again (up -d changes nothing) until it answers.
	if retry 40 compose && grep -q "pong from party 1" "$DIR/compose.log"; then
		log "compose: party 0 pinged party 1: $(grep -m1 'pong from party 1' "$DIR/compose.log")"
		pass
	else
		fail "compose: the parties did not reach each other: $(tail -n 5 "$DIR/compose.log" | tr '\n' ' ')"
	fi
fi

log "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ] && log "all checks passed"
[ "$FAILED" = 0 ]
