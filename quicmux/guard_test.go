package quicmux

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/flow"
	"sfkit-proxy/identity"
	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/quietlog"
)

// remoteOf is where pid's connection at m comes from; zero when none.
func remoteOf(m *Mux, pid int) netip.AddrPort {
	for _, p := range m.Stats().Peers {
		if p.PID == pid {
			return p.RemoteAddr
		}
	}
	return netip.AddrPort{}
}

// TestBorrowedPinCannotMisfileAConnection: party 0 published party 1's pin
// (a registry that let it). Party 2 files party 1's connection under
// party 1, whose handshake names it, never under party 0; and party 0
// cannot connect as itself with a pin that is not its key.
func TestBorrowedPinCannotMisfileAConnection(t *testing.T) {
	echo := halfCloseEcho(t)
	p0 := startParty(t, 0, nil, allowAll)
	p1 := startParty(t, 1, nil, allowAll)
	p2 := startParty(t, 2, nil, allowAll)
	borrowed := p0.info
	borrowed.Pin = p1.info.Pin
	p2.m.SetPeers([]PeerInfo{borrowed, p1.info, p2.info})
	introduce(p0, p1) // they know each other truly, and party 2 truly
	p0.m.SetPeers([]PeerInfo{p0.info, p1.info, p2.info})
	p1.m.SetPeers([]PeerInfo{p0.info, p1.info, p2.info})
	roundTrip(t, p1.m, 2, echo, 1000)
	if got, want := remoteOf(p2.m, 1), p1.m.LocalAddr(); got != want {
		t.Errorf("party 2 files party 1's connection from %v; want %v", got, want)
	}
	if got := remoteOf(p2.m, 0); got.IsValid() {
		t.Errorf("party 2 has a connection for party 0 from %v; want none (its pin is borrowed)", got)
	}
	roundTrip(t, p2.m, 1, echo, 1000)
	if _, err := p0.m.Dial(ctxTimeout(t, 2*time.Second), 2, echo); err == nil {
		t.Error("party 0 reached party 2 with a borrowed pin on file; want a refusal")
	}
}

// TestHandshakeClaimsAreChecked: a dialer whose handshake names another
// party, or a party that does not dial us, is refused.
func TestHandshakeClaimsAreChecked(t *testing.T) {
	a := startParty(t, 0, nil, allowAll)
	b := startParty(t, 1, nil, allowAll)
	c := startParty(t, 2, nil, allowAll)
	introduce(a, b, c)
	roundTrip(t, a.m, 2, halfCloseEcho(t), 10) // c knows everyone
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: conn}
	t.Cleanup(func() { tr.Close() })
	for _, tt := range []struct {
		name string
		as   *Mux // whose key the dialer holds
		sni  string
	}{
		{"party 1 claims to be party 0", b.m, handshakeName(0, 2)},
		{"party 0 claims a handshake to party 1", a.m, handshakeName(0, 1)},
		{"no claim", a.m, ""},
		{"a garbled claim", a.m, "p0.to.p2.sfkit-proxy.evil"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.as.baseTLS()
			cfg.InsecureSkipVerify = true
			cfg.ServerName = tt.sni
			before := c.m.Stats().AcceptsRejected
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			qc, err := tr.Dial(ctx, net.UDPAddrFromAddrPort(c.m.LocalAddr()), cfg, QUICConfig(3*time.Second))
			if err == nil {
				// TLS 1.3: the client may finish before the server refuses.
				_, err = qc.AcceptStream(ctx)
			}
			if err == nil {
				t.Fatal("handshake accepted; want a refusal")
			}
			if c.m.Stats().AcceptsRejected == before {
				t.Error("acceptor did not count a rejected handshake")
			}
		})
	}
}

// TestHandshakeFloodIsCheap: a stranger floods one party with handshakes
// from one address. Few of them reach the TLS handshake, the log gets a
// few lines, not one per attempt, and a live tunnel keeps working.
func TestHandshakeFloodIsCheap(t *testing.T) {
	var logs testkit.LogBuffer
	echo := halfCloseEcho(t)
	a := startParty(t, 0, nil, allowAll)
	b := startPartyWith(t, 1, nil, allowAll, func(o *Options) {
		o.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	})
	introduce(a, b)
	roundTrip(t, a.m, 1, echo, 1000)

	// The attacker sits on another loopback address, with a key of its own.
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)})
	if err != nil {
		t.Skipf("no second loopback address: %v", err)
	}
	tr := &quic.Transport{Conn: conn}
	t.Cleanup(func() { tr.Close() })
	stranger, _ := identity.Load(t.TempDir())
	cfg := &tls.Config{Certificates: []tls.Certificate{stranger.Cert}, NextProtos: []string{ALPN},
		InsecureSkipVerify: true, ServerName: handshakeName(0, 1)}
	const flood = 3 * time.Second
	var attempts atomic.Int64
	var wg sync.WaitGroup
	deadline := time.Now().Add(flood)
	for range 8 {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				if qc, err := tr.Dial(ctx, net.UDPAddrFromAddrPort(b.m.LocalAddr()), cfg, QUICConfig(time.Second)); err == nil {
					qc.CloseWithError(0, "")
				}
				cancel()
				attempts.Add(1)
			}
		})
	}
	// Tunnels keep working during the flood.
	for time.Now().Before(deadline) {
		roundTrip(t, a.m, 1, echo, 1000)
		time.Sleep(100 * time.Millisecond)
	}
	wg.Wait()
	reached := b.m.Stats().AcceptsRejected
	limit := uint64(handshakeBurst + handshakesPerSource*(flood/time.Second+2))
	t.Logf("%d handshake attempts; %d reached TLS (at most %d allowed)", attempts.Load(), reached, limit)
	if attempts.Load() < 2*int64(limit) {
		t.Fatalf("only %d attempts: the flood did not flood", attempts.Load())
	}
	if reached > limit {
		t.Errorf("%d handshakes reached TLS; want at most %d", reached, limit)
	}
	if n := strings.Count(logs.String(), "\n"); n > 4 {
		t.Errorf("%d warning lines for one flooding source; want a few:\n%s", n, logs.String())
	}
	roundTrip(t, a.m, 1, echo, 1000)
}

// TestStreamLimitFailsFast: past the peer's limit of open connections a
// Dial is refused at once, not left waiting; when one closes, the next
// gets through.
func TestStreamLimitFailsFast(t *testing.T) {
	hold := localServer(t, func(c net.Conn) { c.Read(make([]byte, 1)) })
	limit := func(o *Options) { o.MaxStreams = 4 }
	a := startPartyWith(t, 0, nil, allowAll, limit)
	b := startPartyWith(t, 1, nil, allowAll, limit)
	introduce(a, b)
	var open []*flow.Conn
	for range 4 {
		c, err := a.m.Dial(ctxTimeout(t, 10*time.Second), 1, hold)
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, c)
	}
	_, err := a.m.Dial(ctxTimeout(t, 30*time.Second), 1, hold)
	if !errors.Is(err, ErrTooManyConns) || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("Dial past the limit = %v; want ErrTooManyConns (saying refused)", err)
	}
	open[0].Close()
	testkit.Eventually(t, "a free stream after one closed", func() bool {
		c, err := a.m.Dial(ctxTimeout(t, 10*time.Second), 1, hold)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	for _, c := range open[1:] {
		c.Close()
	}
}

// TestDangerousCandidatesAreIgnored: the sidecar screens what peers
// publish, whatever the registry let through.
func TestDangerousCandidatesAreIgnored(t *testing.T) {
	a := startPartyWith(t, 0, nil, allowAll, func(o *Options) { o.Virtual = netip.MustParsePrefix("10.0.0.0/24") })
	var cands []netip.AddrPort
	for _, s := range []string{"224.0.0.1:4000", "255.255.255.255:4000", "169.254.169.254:80", "10.0.0.5:4000",
		"0.0.0.0:4000", "198.51.100.7:0"} {
		cands = append(cands, netip.MustParseAddrPort(s))
	}
	good := netip.MustParseAddrPort("127.0.0.1:4000") // a is on loopback: loopback peers are real
	k := identity.NewCheckKey()
	a.m.SetPeers([]PeerInfo{a.info, {PID: 1, Pin: "pin-of-1", CheckKey: k.Public(), Instance: "i1", Candidates: append(cands, good)}})
	testkit.Eventually(t, "party 1 registered", func() bool { return peerOf(a.m, 1) != nil })
	if got := targetsOf(a.m, 1); !slices.Equal(got, []netip.AddrPort{good}) {
		t.Errorf("targets = %v; want only %v", got, good)
	}
	// More than the limit are cut to it.
	var many []netip.AddrPort
	for i := range 40 {
		many = append(many, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(5000+i)))
	}
	a.m.SetPeers([]PeerInfo{a.info, {PID: 1, Pin: "pin-of-1", CheckKey: k.Public(), Instance: "i1", Candidates: many}})
	testkit.Eventually(t, "the new view", func() bool { return len(targetsOf(a.m, 1)) != 1 })
	if n := len(targetsOf(a.m, 1)); n != 16 {
		t.Errorf("%d targets from 40 candidates; want 16", n)
	}
}

// TestLiveConnectionOutlivesItsRegistryEntry: an entry that expires (its
// party lost the registry) does not cut a live connection; once that
// connection ends, the party is forgotten.
func TestLiveConnectionOutlivesItsRegistryEntry(t *testing.T) {
	echo := halfCloseEcho(t)
	a := startParty(t, 0, nil, allowAll)
	b := startParty(t, 1, nil, allowAll)
	introduce(a, b)
	roundTrip(t, a.m, 1, echo, 1000)
	a.m.SetPeers([]PeerInfo{a.info})
	time.Sleep(200 * time.Millisecond)
	roundTrip(t, a.m, 1, echo, 1000)
	b.stop()
	testkit.Eventually(t, "party 1 forgotten", func() bool { return peerOf(a.m, 1) == nil })
}

// TestGuardIsBounded: handshakes from more sources than the guard tracks,
// each still busy, do not grow its map past maxGuardSources; the sources
// past it share one limit, so a flood from many addresses is still refused,
// and so are its warnings, which stay few.
func TestGuardIsBounded(t *testing.T) {
	var logs testkit.LogBuffer
	g := newHandshakeGuard(quietlog.New(slog.New(slog.NewTextHandler(&logs, nil)), time.Minute))
	g.perSource = 0.01 // no limiter refills (and becomes evictable) while the test fills them, however slow the machine
	from := func(i int) *quic.ClientInfo {
		a := netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})
		return &quic.ClientInfo{RemoteAddr: net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 443))}
	}
	for i := range maxGuardSources {
		for range handshakeBurst { // spend each source's burst: none is evictable
			g.admit(context.Background(), from(i))
		}
	}
	refused := 0
	for i := maxGuardSources; i < maxGuardSources+1000; i++ {
		if _, err := g.admit(context.Background(), from(i)); errors.Is(err, errHandshakeRate) {
			refused++
		}
	}
	g.mu.Lock()
	n := len(g.sources)
	g.mu.Unlock()
	if n > maxGuardSources {
		t.Errorf("the guard tracks %d sources; want at most %d", n, maxGuardSources)
	}
	if refused < 1000-2*handshakeBurst {
		t.Errorf("%d of 1,000 handshakes from new sources past the bound refused; want all but a burst", refused)
	}
	if keys := g.log.Len(); keys > quietlog.MaxKeys+1 {
		t.Errorf("the quiet log tracks %d keys; want at most %d", keys, quietlog.MaxKeys+1)
	}
	if lines := strings.Count(logs.String(), "refusing handshakes"); lines > quietlog.MaxKeys+1 {
		t.Errorf("%d warnings; want one per tracked key at most", lines)
	}
}
