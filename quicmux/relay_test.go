package quicmux

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/relay"
	"sfkit-proxy/relay/relaytest"
)

// startRelayedParty runs a Mux with a relay allocated on c, and its main
// socket behind a filter (a firewall the test opens and closes).
func startRelayedParty(t *testing.T, pid int, c *relaytest.Coturn, transport string) (*testParty, *testkit.FilterConn) {
	t.Helper()
	return startRelayedPartyWith(t, pid, c, transport, nil, nil)
}

// startRelayedPartyWith is startRelayedParty with the relay's conn
// wrapped by wrap (when not nil), and adjust.
func startRelayedPartyWith(t *testing.T, pid int, c *relaytest.Coturn, transport string, wrap func(net.PacketConn) net.PacketConn,
	adjust func(*Options)) (*testParty, *testkit.FilterConn) {
	t.Helper()
	raw := "turn:" + c.Addr() + "?transport=" + transport
	u, _ := relay.ParseURL(raw)
	a, err := relay.Allocate(context.Background(), relay.Options{URLs: []relay.URL{u}, User: c.User, Password: c.Pass})
	if err != nil {
		t.Fatal(err)
	}
	rc := a.Conn
	if wrap != nil {
		rc = wrap(rc)
	}
	udp, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	fc := testkit.NewFilterConn(udp)
	p := startPartyConf(t, pid, partyConf{allow: allowAll, pc: fc, relay: &Relay{Conn: rc, Addr: a.Addr, Server: a.Server},
		adjust: func(o *Options) {
			o.RelayDelay = 300 * time.Millisecond
			if adjust != nil {
				adjust(o)
			}
		}})
	p.info.Candidates = append(p.info.Candidates, a.Addr)
	p.info.Relays = []netip.AddrPort{a.Addr}
	return p, fc
}

func peerStats(m *Mux, pid int) PeerStats {
	for _, p := range m.Stats().Peers {
		if p.PID == pid {
			return p
		}
	}
	return PeerStats{}
}

func waitPath(t *testing.T, m *Mux, pid int, want PathKind) PeerStats {
	t.Helper()
	for range 200 {
		if ps := peerStats(m, pid); ps.Path == want {
			return ps
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("party %d never reported path %q; stats %+v", pid, want, peerStats(m, pid))
	return PeerStats{}
}

func TestRelayedPathWhenUDPIsBlocked(t *testing.T) {
	c := relaytest.Start(t, relaytest.Options{})
	for _, transport := range []string{"udp", "tcp"} {
		t.Run(transport, func(t *testing.T) {
			echo := halfCloseEcho(t)
			a, firewall := startRelayedParty(t, 0, c, transport)
			b := startParty(t, 1, nil, allowAll)
			firewall.Drop(b.m.LocalAddr(), true)
			introduce(a, b)
			roundTrip(t, a.m, 1, echo, 1<<20)
			roundTrip(t, b.m, 0, echo, 1<<20)
			ps := waitPath(t, a.m, 1, PathRelayed)
			if ps.State != StateRelayed || !strings.HasPrefix(ps.Via, "turn:") {
				t.Errorf("stats = %+v; want relayed via the TURN server", ps)
			}
			if bs := waitPath(t, b.m, 0, PathRelayed); !strings.Contains(bs.Via, "peer's relay") {
				t.Errorf("acceptor's stats = %+v; want relayed through the peer's relay", bs)
			}
			// The pool grows through the relay as well: every member on
			// the relay's endpoint, as its primary.
			check := echoFlows(t, a.m, 1, testkit.Echo(t), 3, 256<<10)
			testkit.Eventually(t, "a relayed pool of 3", func() bool {
				ps := peerStats(a.m, 1)
				return ps.QUICConns == 3 && ps.State == StateRelayed && maxOf(poolShape(a.m, 1)) == 1
			})
			for _, l := range linksOf(a.m, 1) {
				if !l.ep.relay {
					t.Errorf("a pool connection to %v runs beside the relay", l.remote)
				}
			}
			check()
		})
	}
}

func TestLiveConnectionMigratesToDirect(t *testing.T) {
	c := relaytest.Start(t, relaytest.Options{})
	echo := halfCloseEcho(t)
	a, firewall := startRelayedParty(t, 0, c, "udp")
	b := startParty(t, 1, nil, allowAll)
	firewall.Drop(b.m.LocalAddr(), true)
	introduce(a, b)
	conn, err := a.m.Dial(ctxTimeout(t, 10*time.Second), 1, echo)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	waitPath(t, a.m, 1, PathRelayed)
	want := make([]byte, 4<<20)
	rand.Read(want)
	half := len(want) / 2
	if _, err := conn.Write(want[:half]); err != nil {
		t.Fatal(err)
	}
	// The firewall opens: the direct path appears mid-transfer.
	firewall.Drop(b.m.LocalAddr(), false)
	waitPath(t, a.m, 1, PathDirect)
	if _, err := conn.Write(want[half:]); err != nil {
		t.Fatalf("write after the switch: %v", err)
	}
	conn.CloseWrite()
	conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	got, err := io.ReadAll(conn)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the same connection after the switch: got %d of %d bytes, %v", len(got), len(want), err)
	}
	l := primaryOf(a.m, 1)
	if !l.ep.relay || !l.direct.Load() {
		t.Error("the link was replaced, not migrated")
	}
	// The acceptor hears of the switch.
	waitPath(t, b.m, 0, PathDirect)
}

func TestRelayTargets(t *testing.T) {
	targets := []netip.AddrPort{
		netip.MustParseAddrPort("203.0.113.21:1000"),  // a peer's public address
		netip.MustParseAddrPort("203.0.113.10:50000"), // another allocation on our relay server
		netip.MustParseAddrPort("192.168.11.2:1000"),  // a peer's LAN address
		netip.MustParseAddrPort("127.0.0.1:1000"),
		netip.MustParseAddrPort("169.254.1.1:1000"),
	}
	tests := []struct {
		relay string
		want  []string
	}{
		{"203.0.113.10:49999", []string{"203.0.113.21:1000"}},
		{"10.1.1.1:49999", []string{"203.0.113.21:1000", "203.0.113.10:50000", "192.168.11.2:1000"}},
		{"127.0.0.1:49999", []string{"203.0.113.21:1000", "203.0.113.10:50000", "192.168.11.2:1000", "127.0.0.1:1000", "169.254.1.1:1000"}},
	}
	relays := []netip.AddrPort{netip.MustParseAddrPort("203.0.113.10:50000")}
	for _, tt := range tests {
		t.Run(tt.relay, func(t *testing.T) {
			var got []string
			for _, a := range relayTargets(netip.MustParseAddr(strings.Split(tt.relay, ":")[0]), relays, targets) {
				got = append(got, a.String())
			}
			if strings.Join(got, " ") != strings.Join(tt.want, " ") {
				t.Errorf("relayTargets via %s = %v; want %v", tt.relay, got, tt.want)
			}
		})
	}
}
