package sidecar

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"sfkit-proxy/config"
	"sfkit-proxy/status"
	"sfkit-proxy/stun"
)

// stunServer runs a STUN server on loopback for the test and returns its
// host:port.
func stunServer(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go stun.Serve(ctx, pc, slog.New(slog.DiscardHandler))
	return pc.LocalAddr().String()
}

// silent is a UDP port where nothing answers.
func silent(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc.LocalAddr().String()
}

func TestNetcheck(t *testing.T) {
	a, b := stunServer(t), stunServer(t)
	tests := []struct {
		name       string
		stun       []string
		udp        bool
		nat        string
		advice     string
		expectDeps string // the path expected to a peer behind an endpoint-dependent NAT
	}{
		{"two servers, the host's own address", []string{a, b}, true, NATNone, "nothing to do", "direct"},
		{"one server answers, with the host's own address", []string{silent(t), a}, true, NATNone, "nothing to do", "direct"},
		{"none answers: UDP blocked", []string{silent(t)}, false, stun.NATUnknown, "do: UDP does not get out", "unknown"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			cfg := &config.Netcheck{STUN: tt.stun, UDPListen: netip.MustParseAddrPort("127.0.0.1:0")}
			r, err := netcheck(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			if r.UDP != tt.udp || r.NAT != tt.nat || !strings.HasPrefix(r.Advice, tt.advice) ||
				r.Expect["endpoint-dependent NAT"] != tt.expectDeps {
				t.Errorf("report %+v; want udp %v, NAT %s, advice %q…, to endpoint-dependent peers %q", r, tt.udp, tt.nat, tt.advice, tt.expectDeps)
			}
			var out bytes.Buffer
			cfg.JSON = true
			if err := Netcheck(ctx, cfg, &out); err != nil || !strings.Contains(out.String(), `"advice": "`+r.Advice[:10]) {
				t.Errorf("--json: %v\n%s", err, out.String())
			}
		})
	}
}

// TestNetcheckAdvice: what netcheck says for the kinds of network the
// labs build (their NATs are real there; here, the verdicts).
func TestNetcheckAdvice(t *testing.T) {
	for _, tt := range []struct {
		r              NetReport
		turnOK, turn   bool
		want, wantDeps string
	}{
		{NetReport{UDP: true, NAT: stun.NATEndpointIndependent}, false, false, "nothing to do", "a peer relay (another party that reaches both), or TURN"},
		{NetReport{UDP: true, NAT: stun.NATEndpointDependent}, false, false, "nothing to do if another party", "a peer relay (another party that reaches both), or TURN"},
		{NetReport{UDP: true, NAT: stun.NATEndpointDependent}, true, true, "nothing to do", "TURN, or a peer relay"},
		{NetReport{UDP: false, NAT: stun.NATUnknown}, true, true, "UDP does not get out, but a TURN relay answers", "unknown"},
		{NetReport{UDP: false, NAT: stun.NATUnknown}, false, true, "do: UDP does not get out and no TURN relay answers", "unknown"},
		{NetReport{UDP: true, NAT: NATNone}, false, true, "do: no TURN relay answers", "direct"},
		{NetReport{UDP: true, NAT: stun.NATUnknown}, false, false, "do: only one STUN server answered", "unknown"},
	} {
		e, advice := expect(tt.r, tt.turnOK, tt.turn)
		if !strings.HasPrefix(advice, tt.want) || e["endpoint-dependent NAT"] != tt.wantDeps {
			t.Errorf("%+v turn %v/%v: advice %q, to endpoint-dependent %q; want %q…, %q", tt.r, tt.turnOK, tt.turn, advice, e["endpoint-dependent NAT"], tt.want, tt.wantDeps)
		}
	}
}

// TestNetcheckPeers: with a sidecar's API answering, netcheck says what
// to expect to each of its peers, by what each published of its NAT, and
// the path each has now.
func TestNetcheckPeers(t *testing.T) {
	st := status.Status{Peers: []status.Peer{
		{PID: 0, State: "relayed", Path: "peer-relayed", Via: "peer 3", NAT: stun.NATEndpointDependent},
		{PID: 3, State: "direct", Path: "direct", RemoteAddr: "203.0.113.23:4000", NAT: NATNone},
		{PID: 4, State: "connecting"},
	}}
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/status" {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode(st)
	}))
	defer api.Close()
	a, b := stunServer(t), stunServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cfg := &config.Netcheck{STUN: []string{a, b}, UDPListen: netip.MustParseAddrPort("127.0.0.1:0"), Admin: strings.TrimPrefix(api.URL, "http://")}
	r, err := netcheck(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := []PeerExpect{
		{PID: 0, NAT: stun.NATEndpointDependent, Expect: "direct", Now: "relayed via peer 3"},
		{PID: 3, NAT: NATNone, Expect: "direct", Now: "direct 203.0.113.23:4000"},
		{PID: 4, NAT: stun.NATUnknown, Expect: "unknown: it published no NAT kind (the sfkit website carries none)", Now: "connecting"},
	}
	if !slices.Equal(r.Peers, want) {
		t.Errorf("peers = %+v; want %+v", r.Peers, want)
	}
	var out bytes.Buffer
	printReport(&out, r)
	if !strings.Contains(out.String(), "party 0 (NAT endpoint-dependent): expect direct; now relayed via peer 3") {
		t.Errorf("report:\n%s", out.String())
	}
}
