package quicmux

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"testing"
	"time"

	"sfkit-proxy/identity"
	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/quicmux/header"
	"sfkit-proxy/stun"
)

type testParty struct {
	m    *Mux
	key  *identity.CheckKey
	info PeerInfo
	stop func()
}

// startParty runs a Mux on loopback. identity may be nil for a new one.
func startParty(t testing.TB, pid int, id *identity.Identity, allow func(uint16) bool) *testParty {
	t.Helper()
	return startPartyWith(t, pid, id, allow, nil)
}

func startPartyWith(t testing.TB, pid int, id *identity.Identity, allow func(uint16) bool, adjust func(*Options)) *testParty {
	t.Helper()
	return startPartyConf(t, pid, partyConf{id: id, allow: allow, adjust: adjust})
}

// partyConf is how a test party runs.
type partyConf struct {
	id     *identity.Identity // nil: a new one
	allow  func(uint16) bool
	adjust func(*Options)
	pc     net.PacketConn // nil: a new socket on loopback
	relay  *Relay
	tune   func(*tuning) // shorter timings
}

func startPartyConf(t testing.TB, pid int, c partyConf) *testParty {
	t.Helper()
	id, allow, adjust := c.id, c.allow, c.adjust
	if id == nil {
		var err error
		if id, err = identity.Load(t.TempDir()); err != nil {
			t.Fatal(err)
		}
	}
	key := identity.NewCheckKey()
	opts := Options{Study: "test", PID: pid, Identity: id, CheckKey: key, AllowPort: func(_ int, p uint16) bool { return allow(p) }, CheckInterval: 50 * time.Millisecond}
	if adjust != nil {
		adjust(&opts)
	}
	pc := c.pc
	if pc == nil {
		var err error
		if pc, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			t.Fatal(err)
		}
	}
	tune := defaultTuning()
	if c.tune != nil {
		c.tune(&tune)
	}
	m, err := newMux(pc, c.relay, opts, tune)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	stopped := false
	p := &testParty{m: m, key: key, info: PeerInfo{PID: pid, Pin: id.Pin, CheckKey: key.Public(), Instance: identity.NewInstance(), Candidates: m.HostCandidates()}}
	p.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run = %v; want context.Canceled", err)
		}
	}
	t.Cleanup(p.stop)
	return p
}

func introduce(parties ...*testParty) {
	var infos []PeerInfo
	for _, p := range parties {
		infos = append(infos, p.info)
	}
	for _, p := range parties {
		p.m.SetPeers(infos)
	}
}

// localServer serves each connection on 127.0.0.1 with handle, until the
// test ends, and returns the port.
func localServer(t testing.TB, handle func(net.Conn)) uint16 {
	t.Helper()
	return testkit.Local(t, func(c net.Conn) {
		defer c.Close()
		handle(c)
	})
}

// halfCloseEcho reads each connection to EOF, then writes back what it read
// and closes: it only answers if the half-close arrived.
func halfCloseEcho(t *testing.T) uint16 {
	return localServer(t, func(c net.Conn) {
		if b, err := io.ReadAll(c); err == nil {
			c.Write(b)
		}
	})
}

func allowAll(uint16) bool { return true }

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func roundTrip(t *testing.T, m *Mux, pid int, port uint16, size int) {
	t.Helper()
	c, err := m.Dial(ctxTimeout(t, 10*time.Second), pid, port)
	if err != nil {
		t.Fatalf("Dial(party %d, port %d) = %v", pid, port, err)
	}
	defer c.Close()
	want := make([]byte, size)
	rand.Read(want)
	go func() {
		c.Write(want)
		c.CloseWrite()
	}()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("echo of %d bytes: got %d bytes, %v", size, len(got), err)
	}
}

func TestTunnelBothWaysWithHalfClose(t *testing.T) {
	echo := halfCloseEcho(t)
	time.Sleep(10 * time.Millisecond) // let the echo's accept loop park
	base := runtime.NumGoroutine()
	a := startParty(t, 0, nil, allowAll)
	b := startParty(t, 1, nil, allowAll)
	introduce(a, b)
	roundTrip(t, a.m, 1, echo, 3<<20) // dialer side opens
	roundTrip(t, b.m, 0, echo, 3<<20) // acceptor side opens on the same connection
	// Many concurrent streams on the one connection.
	errs := make(chan error, 50)
	for range 50 {
		go func() {
			c, err := a.m.Dial(ctxTimeout(t, 10*time.Second), 1, echo)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			c.Write([]byte("ping"))
			c.CloseWrite()
			got, err := io.ReadAll(c)
			if err == nil && string(got) != "ping" {
				err = errors.New("got " + string(got))
			}
			errs <- err
		}()
	}
	for range 50 {
		if err := <-errs; err != nil {
			t.Errorf("concurrent stream: %v", err)
		}
	}
	a.stop()
	b.stop()
	waitGoroutines(t, base)
}

func TestStreamStatuses(t *testing.T) {
	echo := halfCloseEcho(t)
	a := startParty(t, 0, nil, allowAll)
	b := startParty(t, 1, nil, func(p uint16) bool { return p != 1 })
	introduce(a, b)
	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	closedPort := uint16(closed.Addr().(*net.TCPAddr).Port)
	closed.Close()
	tests := []struct {
		name string
		port uint16
		want error
	}{
		{"nothing listening", closedPort, header.ErrRefused},
		{"not allowed", 1, header.ErrNotAllowed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := a.m.Dial(ctxTimeout(t, 10*time.Second), 1, tt.port)
			if !errors.Is(err, tt.want) {
				t.Errorf("Dial(port %d) = %v, %v; want %v", tt.port, c, err, tt.want)
			}
		})
	}
	roundTrip(t, a.m, 1, echo, 1000) // the connection is still good
}

func TestUnknownPeer(t *testing.T) {
	a := startParty(t, 0, nil, allowAll)
	_, err := a.m.Dial(ctxTimeout(t, 200*time.Millisecond), 7, 80)
	if !errors.Is(err, ErrUnknownPeer) {
		t.Errorf("Dial(party 7) = %v; want ErrUnknownPeer", err)
	}
}

func TestWrongPinIsRejected(t *testing.T) {
	a := startParty(t, 0, nil, allowAll)
	b := startParty(t, 1, nil, allowAll)
	impostor, _ := identity.Load(t.TempDir())
	bad := b.info
	bad.Pin = impostor.Pin // a believes party 1 has another key
	a.m.SetPeers([]PeerInfo{a.info, bad})
	b.m.SetPeers([]PeerInfo{a.info, b.info})
	_, err := a.m.Dial(ctxTimeout(t, 2*time.Second), 1, 80)
	if !errors.Is(err, ErrNoPath) {
		t.Fatalf("Dial with a wrong pin = %v; want ErrNoPath", err)
	}
	if want := "presented key"; !bytes.Contains([]byte(err.Error()), []byte(want)) {
		t.Errorf("error %q does not say the key was wrong", err)
	}
}

func TestPeerRestartIsReachedAgain(t *testing.T) {
	echo := halfCloseEcho(t)
	id, _ := identity.Load(t.TempDir())
	a := startParty(t, 0, nil, allowAll)
	b := startParty(t, 1, id, allowAll)
	introduce(a, b)
	roundTrip(t, a.m, 1, echo, 100)
	b.stop()
	b2 := startParty(t, 1, id, allowAll) // same key, new port and instance
	introduce(a, b2)
	roundTrip(t, a.m, 1, echo, 100)
	roundTrip(t, b2.m, 0, echo, 100)
}

// TestForgedChecksAreIgnored plays party 1 (which may check party 0) and
// party 2, a member of the study that tries to pass its address off as
// party 1's: every key it can compute or read fails, party 0 does not
// answer, and learns no address for party 1 from it.
func TestForgedChecksAreIgnored(t *testing.T) {
	a := startParty(t, 0, nil, allowAll)
	listen := func() *net.UDPConn {
		pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		return pc
	}
	one, two := listen(), listen()
	k1, k2 := identity.NewCheckKey(), identity.NewCheckKey()
	a.m.SetPeers([]PeerInfo{a.info,
		{PID: 1, Pin: "pin-of-1", CheckKey: k1.Public(), Instance: "i1"},
		{PID: 2, Pin: "pin-of-2", CheckKey: k2.Public(), Instance: "i2"}})
	pair := func(k *identity.CheckKey, self int, peerPub string) string {
		key, err := k.PairKey("test", self, 0, peerPub)
		if err != nil {
			t.Fatal(err)
		}
		return key
	}
	key01 := pair(k1, 1, a.info.CheckKey)
	key02 := pair(k2, 2, a.info.CheckKey)
	to := net.UDPAddrFromAddrPort(a.m.LocalAddr())
	tests := []struct {
		name string
		pkt  []byte
	}{
		{"party 2 as party 1, with its own pair key", stun.CheckRequest(stun.NewTxID(), "test:0:1", key02)},
		{"party 2 as party 1, with party 1's published key", stun.CheckRequest(stun.NewTxID(), "test:0:1", k1.Public())},
		{"party 2 as party 1, with party 0's published key", stun.CheckRequest(stun.NewTxID(), "test:0:1", a.info.CheckKey)},
		{"wrong study", stun.CheckRequest(stun.NewTxID(), "other:0:1", key01)},
		{"no integrity", stun.Request(stun.NewTxID())},
		{"garbage", []byte{0, 1, 2, 3}},
	}
	waitKeys := time.Now().Add(5 * time.Second)
	buf := make([]byte, 1500)
	// A valid check from party 1 is answered (once the view has arrived),
	// so the silence below is meaningful.
	for {
		one.WriteTo(stun.CheckRequest(stun.NewTxID(), "test:0:1", key01), to)
		one.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		n, _, err := one.ReadFrom(buf)
		if err == nil {
			if m, err := stun.Parse(buf[:n]); err != nil || m.Verify(key01) != nil {
				t.Fatalf("answer = %v, %v; want a response signed with the pair key", m, err)
			}
			break
		}
		if time.Now().After(waitKeys) {
			t.Fatalf("valid check not answered: %v", err)
		}
	}
	for _, tt := range tests {
		two.WriteTo(tt.pkt, to)
	}
	two.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if n, _, err := two.ReadFrom(buf); err == nil {
		t.Errorf("a forged check got an answer (%d bytes); want silence", n)
	}
	targets := targetsOf(a.m, 1)
	if forged := addrPortOf(two.LocalAddr()); slices.Contains(targets, forged) {
		t.Errorf("party 0 learned party 2's address %v as party 1's", forged)
	}
	if !slices.Contains(targets, addrPortOf(one.LocalAddr())) {
		t.Errorf("party 0 did not learn party 1's own address from its valid check")
	}
}

// peerOf is m's state of party pid.
func peerOf(m *Mux, pid int) *peer { return m.peer(pid) }

// primaryOf is m's connection in use to pid, nil when none.
func primaryOf(m *Mux, pid int) *link {
	p := m.peer(pid)
	if p == nil {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pool.primary
}

// linksOf are m's live connections to pid, the primary first.
func linksOf(m *Mux, pid int) []*link {
	p := m.peer(pid)
	if p == nil {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pool.live()
}

// targetsOf are the addresses m checks for pid.
func targetsOf(m *Mux, pid int) []netip.AddrPort {
	p := m.peer(pid)
	if p == nil {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cands.targets(time.Now())
}

// waitGoroutines fails if the goroutine count does not return to base.
func waitGoroutines(t *testing.T, base int) {
	t.Helper()
	var n int
	for range 100 {
		if n = runtime.NumGoroutine(); n <= base {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	buf := make([]byte, 1<<20)
	t.Errorf("%d goroutines left, %d before:\n%s", n, base, buf[:runtime.Stack(buf, true)])
}
