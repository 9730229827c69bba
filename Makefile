# sfkit-proxy: `make demo` runs the local multi-party demo, `make test` runs
# every test (the NAT lab too, when root).
GO      ?= go
BIN     ?= sfkit-proxy
IMAGE   ?= sfkit-proxy:latest
GOFLAGS ?= -trimpath

.PHONY: all build demo test unit e2e soak fuzz image bench docs clean

all: build

# A static binary: it runs in a FROM-scratch image as well as on a host.
build:
	CGO_ENABLED=0 $(GO) build $(GOFLAGS) -buildvcs=auto -o $(BIN) .

demo: build
	./$(BIN) demo

test: unit e2e

unit:
	$(GO) vet ./...
	$(GO) test -race -count=1 ./...

# Real NATs in network namespaces (skips, saying so, when not root): direct
# paths through cone NATs, relayed ones through symmetric NATs and blocked
# UDP (through TURN, and through a peer with no TURN server), sfkit as it is (its command line, its website's relay), faults under
# live transfers (rebinding NATs, lost UDP, relays dying, peers stopping),
# then parallel connections on a long lossy path (the WAN lab, lean), and
# the README's and docs' commands as they are written (the docs lab).
e2e: build
	scripts/nat-lab.sh ./$(BIN)
	scripts/relay-lab.sh ./$(BIN)
	scripts/peer-relay-lab.sh ./$(BIN)
	scripts/sfkit-lab.sh ./$(BIN)
	scripts/fault-lab.sh ./$(BIN)
	scripts/wan-lab.sh ./$(BIN)
	scripts/docs-lab.sh ./$(BIN)

# The fault lab with its long outage (60 s of lost UDP).
soak: build
	FAULT_LONG=1 scripts/fault-lab.sh ./$(BIN)

# A short run of every fuzz target.
fuzz:
	for t in FuzzParse:./stun FuzzParseRequest:./quicmux/header FuzzParseReply:./quicmux/header \
	         FuzzDecodeEntry:./registry FuzzParsePorts:./config FuzzParseRelayURL:./relay \
	         FuzzParseCandidateLine:./website FuzzReadFrame:./flow FuzzFlow:./flow; do \
		$(GO) test -run '^$$' -fuzz "^$${t%%:*}$$" -fuzztime 20s "$${t#*:}" || exit 1; \
	done

# Benchmarks: Go benchmarks of the hot paths, the tunnel against raw
# quic-go and raw TCP between processes (table on stdout, bench.json, CPU
# profiles of both sidecars in bench-profiles/), then
# the WAN table: plain TCP (CUBIC, BBR) against the tunnel on an emulated
# 50 ms, 200 Mbit/s path with 0, 0.01% and 0.1% loss (wan.json; needs root,
# about 15 minutes).
bench: build
	$(GO) test -run '^$$' -bench . -benchtime 2s ./quicmux ./socks
	$(GO) run ./scripts/bench --bin ./$(BIN) --json bench.json --profile bench-profiles
	scripts/wan-lab.sh --bench ./$(BIN)
	scripts/peer-relay-bench.sh ./$(BIN)

image: build
	d=$$(mktemp -d) && cp $(BIN) Dockerfile $$d/ && mkdir $$d/state && docker build -t $(IMAGE) $$d; rc=$$?; rm -rf $$d; exit $$rc

# docs/flags.md from each command's -h (TestFlagsDoc fails when they differ).
docs:
	$(GO) test -run '^TestFlagsDoc$$' -count=1 . -update

clean:
	rm -f $(BIN)
