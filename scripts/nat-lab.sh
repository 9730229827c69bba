#!/usr/bin/env bash
# End-to-end test across real NATs (see lab-lib.sh for the topology): every
# party behind its own cone NAT (MASQUERADE with a home-router firewall), all
# pairs must connect directly.
#
#   party 2 has no key file: it takes its registry credential from a fake GCE
#           metadata server on its loopback (GCE_METADATA_HOST), and the
#           registry verifies the ID token (OIDC)
#   party 3 (when Docker works): the sidecar runs in a container of the
#           FROM-scratch image, as non-root, with --cap-drop ALL
#
# Every party fetches every other party's file with real curl through
# ALL_PROXY=socks5h://127.0.0.1:1080 (sha256-checked) and talks to every
# other party's echo with ncat; each party's status API must report every
# peer direct, and the NAT endpoint-independent.
#
# Usage: scripts/nat-lab.sh [path/to/sfkit-proxy]   (env: SIZE_MB=50, DOCKER=auto|0)
set -euo pipefail
LAB=nat-lab
DOCKER=${DOCKER:-auto}
# shellcheck source=scripts/lab-lib.sh
. "$(dirname "$0")/lab-lib.sh"

NPARTIES=3
CONTAINER=""
IMAGE="sfkit-proxy-e2e:$ID"
TURN_ARGS=(--stun-only --no-tls)
internet

# Party 2's cloud: a fake GCE metadata server in its namespace, whose JWKS
# the registry trusts.
addns p2
(cd "$(dirname "$0")/.." && go build -o "$DIR/fakemeta" ./scripts/fakemeta)
spawn p2 "$DIR/fakemeta.log" "$DIR/fakemeta" --listen 127.0.0.1:8089 --email party2@e2e.iam.gserviceaccount.com \
	--jwks-out "$DIR/jwks.json"
for _ in $(seq 1 50); do [ -s "$DIR/jwks.json" ] && break; sleep 0.1; done
echo "party2@e2e.iam.gserviceaccount.com e2e 2" >"$DIR/members"
sed -i '/ e2e 2$/d' "$DIR/tokens" # party 2 has no static token
REGISTRY_ARGS=(--oidc-issuer https://accounts.google.com --oidc-audience http://203.0.113.10:8080/
	--oidc-jwks "$DIR/jwks.json" --members "$DIR/members")
start_registry

SIDECAR_ARGS=(--study e2e --registry http://203.0.113.10:8080/ --stun 203.0.113.10:3478,203.0.113.11:3478
	--allow-ports 8000,9000 --log-level debug)
for i in $(seq 0 $((NPARTIES - 1))); do
	[ "$i" = 2 ] || addns "p$i"
	router "$i" "$(ns "p$i")" cone
	services "$i"
	if [ "$i" = 2 ]; then
		# No key file: the credential comes from the (fake) cloud metadata server.
		spawn "p$i" "$DIR/p$i.log" env GCE_METADATA_HOST=127.0.0.1:8089 SFKIT_PROXY_AZURE_IMDS=http://127.0.0.1:1 \
			"$BIN" --pid "$i" "${SIDECAR_ARGS[@]}" --state-dir "$DIR/state$i"
	else
		spawn "p$i" "$DIR/p$i.log" "$BIN" --pid "$i" "${SIDECAR_ARGS[@]}" --state-dir "$DIR/state$i" \
			--auth-key-file "$DIR/token$i"
	fi
done

# Party 3 in a Docker container, if Docker works here.
if [ "$DOCKER" != 0 ] && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
	log "building the FROM-scratch image and starting party 3 in it (non-root, --cap-drop ALL)"
	mkdir -p "$DIR/image/state"
	# The image holds the binary alone, so it must be static (make build is).
	if go version -m "$BIN" 2>/dev/null | grep -q 'CGO_ENABLED=0'; then
		cp "$BIN" "$DIR/image/sfkit-proxy"
	else
		(cd "$(dirname "$0")/.." && CGO_ENABLED=0 go build -trimpath -o "$DIR/image/sfkit-proxy" .)
	fi
	cp "$(dirname "$0")/../Dockerfile" "$DIR/image/Dockerfile"
	docker build -q -t "$IMAGE" "$DIR/image" >"$DIR/docker-build.log" 2>&1
	CONTAINER="sfkit-e2e-$ID"
	VOLUME="sfkit-e2e-state-$ID"
	CLEANUPS+=("docker logs $CONTAINER >$DIR/p3.log 2>&1; docker rm -f $CONTAINER >/dev/null 2>&1; docker rmi -f $IMAGE >/dev/null 2>&1; docker volume rm -f $VOLUME >/dev/null 2>&1")
	# A named volume, as the README's docker run has it: the image's /state
	# (owned by the sidecar's user) seeds it.
	docker run -d --name "$CONTAINER" --network none --cap-drop ALL --security-opt no-new-privileges \
		-v "$VOLUME:/state" -v "$DIR/token3:/run/token:ro" "$IMAGE" \
		--pid 3 "${SIDECAR_ARGS[@]}" --state-dir /state --auth-key-file /run/token >/dev/null
	user=$(docker inspect -f '{{.Config.User}}' "$CONTAINER")
	[ "$user" = "65534:65534" ] || { echo "container user is '$user', want 65534:65534" >&2; exit 1; }
	cpid=$(docker inspect -f '{{.State.Pid}}' "$CONTAINER")
	ip netns attach "$(ns p3)" "$cpid"
	NETNS+=("$(ns p3)")
	router 3 "$(ns p3)" cone
	services 3
	NPARTIES=4
else
	log "SKIP docker party: docker is not available here (the three namespace parties still run)"
fi

wait_registered "$NPARTIES"
matrix "$NPARTIES"

# A port outside party 1's --allow-ports is refused before any data flows.
if inns p0 env ALL_PROXY=socks5h://127.0.0.1:1080 curl -sS --max-time 20 -o /dev/null http://10.0.0.1:22/ 2>"$DIR/denied.err"; then
	fail "port 22 at party 1 was reachable, want refused"
else
	log "port 22 at party 1 refused: $(cat "$DIR/denied.err")"
	pass
fi

# Every pair is connected directly, each peer seen at its router's wan
# address: the packets crossed both NATs.
[ -n "$CONTAINER" ] && docker logs "$CONTAINER" >"$DIR/p3.log" 2>&1
for a in $(seq 0 $((NPARTIES - 1))); do
	for b in $(seq 0 $((NPARTIES - 1))); do
		[ "$a" = "$b" ] && continue
		if grep -q "msg=\"peer connected\".* peer=$b path=direct addr=203.0.113.$((20 + b)):" "$DIR/p$a.log"; then
			pass
		else
			fail "party $a has no direct connection to party $b through its NAT"
		fi
	done
done

if grep -q 'msg="registry credential" party=2 source="gce metadata"' "$DIR/p2.log"; then
	log "party 2 registered with an ID token from the (fake) GCE metadata server"
	pass
else
	fail "party 2 did not take its credential from the metadata server"
fi

# Each party's own status API says every peer is direct with bytes both
# ways; two STUN addresses saw the same mapping: MASQUERADE is
# endpoint-independent.
for a in $(seq 0 $((NPARTIES - 1))); do
	check_status "$a" "$NPARTIES" "'direct'"
	if python3 -c 'import json,sys; sys.exit(json.load(open(sys.argv[1]))["nat"] != "endpoint-independent")' "$DIR/status$a.json" 2>/dev/null; then
		pass
	else
		fail "party $a: NAT not reported endpoint-independent"
	fi
done
inns p0 "$BIN" status | tee "$DIR/status-table.txt"
finish
