package gateway

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/splice"
)

// tcpConn is a local TCP connection standing in for a tunnelled one.
type tcpConn struct{ *net.TCPConn }

func (c tcpConn) Reset() error {
	c.SetLinger(0)
	return c.Close()
}

// manager returns a Manager whose "peers" are local ports: party pid's port
// P is 127.0.0.1:P here.
func manager(t *testing.T, adjust func(*Options)) *Manager {
	t.Helper()
	opts := Options{Self: 0, ConnectTimeout: 5 * time.Second,
		DialPeer: func(ctx context.Context, pid int, port uint16) (splice.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), port).String())
			if err != nil {
				return nil, err
			}
			return tcpConn{c.(*net.TCPConn)}, nil
		}}
	if adjust != nil {
		adjust(&opts)
	}
	m := New(opts)
	t.Cleanup(m.Close)
	return m
}

// freeAddr is a loopback address nothing listens on.
func freeAddr(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

func add(t *testing.T, m *Manager, spec Spec) netip.AddrPort {
	t.Helper()
	if !spec.Listen.IsValid() {
		spec.Listen = freeAddr(t)
	}
	spec.Proto = "tcp"
	if spec.PID == 0 {
		spec.PID = 1
	}
	if _, err := m.Add(spec); err != nil {
		t.Fatalf("Add(%+v) = %v", spec, err)
	}
	return spec.Listen
}

func dial(t *testing.T, ap netip.AddrPort) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", ap.String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// TestGatewayCarriesAndCounts: a connection to a gateway reaches the
// peer's port; every byte comes back, and the gateway's counts match the
// transfer.
func TestGatewayCarriesAndCounts(t *testing.T) {
	m := manager(t, nil)
	echo := testkit.Echo(t)
	ap := add(t, m, Spec{Port: echo, Label: "echo"})
	c := dial(t, ap)
	msg := make([]byte, 1<<20)
	rand.Read(msg)
	go c.Write(msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo through the gateway: %v; want the 1 MiB sent", err)
	}
	// While open, the connection is listed with its client and its counts.
	testkit.Eventually(t, "the connection's counts", func() bool {
		g, _ := m.Get("tcp", ap)
		return len(g.Connections) == 1 && g.Connections[0].BytesFromPeer == 1<<20
	})
	if g, _ := m.Get("tcp", ap); g.Connections[0].Client != c.LocalAddr().String() || g.Connections[0].BytesToPeer != 1<<20 {
		t.Errorf("connections = %+v; want client %v with 1 MiB each way", g.Connections, c.LocalAddr())
	}
	c.CloseWrite()
	if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
		t.Errorf("after the echo: %d more bytes, %v; want a clean end", len(rest), err)
	}
	c.Close()
	testkit.Eventually(t, "the connection closed in the gateway's counts", func() bool {
		g, err := m.Get("tcp", ap)
		return err == nil && g.Open == 0 && g.Conns == 1
	})
	g, _ := m.Get("tcp", ap)
	if g.BytesToPeer != 1<<20 || g.BytesFromPeer != 1<<20 || g.Label != "echo" || g.Source != "api" || g.Public || len(g.Connections) != 0 {
		t.Errorf("gateway = %+v; want 1 MiB each way, label echo, source api, not public", g)
	}
	if list := m.List(); len(list) != 1 || list[0].Listen != ap.String() {
		t.Errorf("List = %+v; want the one gateway", list)
	}
}

// TestGatewayRemove: removing a gateway refuses new connections at once;
// with drain an open one carries on, without it the open one is reset.
func TestGatewayRemove(t *testing.T) {
	m := manager(t, nil)
	echo := testkit.Echo(t)
	for _, drain := range []bool{true, false} {
		ap := add(t, m, Spec{Port: echo})
		c := dial(t, ap)
		line := []byte("before\n")
		if _, err := c.Write(line); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, len(line))
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
		if err := m.Remove("tcp", ap, drain); err != nil {
			t.Fatal(err)
		}
		if nc, err := net.DialTimeout("tcp", ap.String(), time.Second); err == nil {
			nc.Close()
			t.Errorf("drain=%v: a new connection was accepted after Remove", drain)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		_, werr := c.Write([]byte("after\n"))
		_, rerr := io.ReadFull(c, buf[:6])
		switch {
		case drain && (werr != nil || rerr != nil):
			t.Errorf("drain: the open connection broke: %v, %v", werr, rerr)
		case !drain && rerr == nil:
			t.Error("no drain: the open connection still carries bytes")
		case !drain && !strings.Contains(rerr.Error(), "reset") && !errors.Is(rerr, io.EOF):
			t.Errorf("no drain: read = %v; want a reset", rerr)
		}
		if err := m.Remove("tcp", ap, drain); !errors.Is(err, ErrNotFound) {
			t.Errorf("second Remove = %v; want ErrNotFound", err)
		}
	}
}

// TestGatewaySpecIsChecked: what Add refuses, each with its reason.
func TestGatewaySpecIsChecked(t *testing.T) {
	m := manager(t, func(o *Options) {
		o.PeerAllows = func(pid int, port uint16) bool { return port != 22 }
	})
	free := freeAddr(t)
	for _, c := range []struct {
		spec Spec
		want error
		text string
	}{
		{Spec{Proto: "udp", Listen: free, PID: 1, Port: 80}, ErrBadSpec, "carries no UDP"},
		{Spec{Proto: "sctp", Listen: free, PID: 1, Port: 80}, ErrBadSpec, "want tcp or udp"},
		{Spec{Proto: "tcp", Listen: free, PID: 0, Port: 80}, ErrBadSpec, "another party"},
		{Spec{Proto: "tcp", Listen: free, PID: 1, Port: 22}, ErrBadSpec, "does not allow port 22"},
		{Spec{Proto: "tcp", Listen: netip.MustParseAddrPort("203.0.113.5:8080"), PID: 1, Port: 80}, ErrNoConsent, "not a loopback address"},
		{Spec{Proto: "tcp", Listen: free, PID: 1, Port: 80, Label: "a\nb"}, ErrBadSpec, "label"},
		{Spec{Proto: "tcp", Listen: free, PID: 1, Port: 80, MaxConns: -1}, ErrBadSpec, "negative"},
	} {
		if _, err := m.Add(c.spec); !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.text) {
			t.Errorf("Add(%+v) = %v; want %v saying %q", c.spec, err, c.want, c.text)
		}
	}
	ap := add(t, m, Spec{Port: 80})
	if _, err := m.Add(Spec{Proto: "tcp", Listen: ap, PID: 1, Port: 80}); !errors.Is(err, ErrExists) {
		t.Errorf("a second gateway on %v = %v; want ErrExists", ap, err)
	}
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	if _, err := m.Add(Spec{Proto: "tcp", Listen: busy.Addr().(*net.TCPAddr).AddrPort(), PID: 1, Port: 80}); !errors.Is(err, ErrInUse) {
		t.Errorf("a gateway where a program listens = %v; want ErrInUse", err)
	}
	for _, s := range []string{"9000", "127.0.0.1:9000", "[::1]:9000"} {
		if _, err := ParseAddr(s); err != nil {
			t.Errorf("ParseAddr(%q) = %v", s, err)
		}
	}
	for _, s := range []string{"0", "x", "127.0.0.1", "70000", "127.0.0.1:0"} {
		if _, err := ParseAddr(s); !errors.Is(err, ErrBadSpec) {
			t.Errorf("ParseAddr(%q) = %v; want ErrBadSpec", s, err)
		}
	}
}

// TestGatewayLimits: a flood from one source gets no more than the
// gateway's burst of new connections, and another source is still served;
// no more than its maximum are open at once; a
// source outside allow_from gets nothing; each refusal is counted by
// reason.
func TestGatewayLimits(t *testing.T) {
	m := manager(t, nil)
	hold := testkit.Local(t, func(c net.Conn) { io.Copy(io.Discard, c); c.Close() }) // keeps connections open
	ap := add(t, m, Spec{Port: hold, ConnRate: 1, MaxConns: 3})
	var open []net.Conn
	for range 20 { // a refused one may be reset before its dial returns
		if c, err := net.DialTimeout("tcp", ap.String(), 5*time.Second); err == nil {
			open = append(open, c)
		}
	}
	testkit.Eventually(t, "the flood refused", func() bool {
		g, _ := m.Get("tcp", ap)
		return g.Refused["rate"]+g.Conns == 20
	})
	g, _ := m.Get("tcp", ap)
	if g.Conns != 2 || g.Refused["rate"] != 18 {
		t.Errorf("20 connections at once at 1/s (burst 2): %d carried, refused %v; want 2 carried, 18 over the rate", g.Conns, g.Refused)
	}
	// Another source is still served while the first is over its rate.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 5 * time.Second}
	other, err := d.Dial("tcp", ap.String())
	if err != nil {
		t.Fatal(err)
	}
	open = append(open, other)
	testkit.Eventually(t, "another source served during the flood", func() bool {
		g, _ := m.Get("tcp", ap)
		return g.Conns == 3 && g.Open == 3
	})
	for _, c := range open {
		c.Close()
	}

	ap = add(t, m, Spec{Port: hold, MaxConns: 3})
	for range 5 {
		if c, err := net.DialTimeout("tcp", ap.String(), 5*time.Second); err == nil {
			open = append(open, c)
		}
	}
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	testkit.Eventually(t, "the connections past max_conns refused", func() bool {
		g, _ := m.Get("tcp", ap)
		return g.Refused["max_conns"] == 2 && g.Open == 3
	})

	ap = add(t, m, Spec{Port: hold, AllowFrom: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}})
	if c, err := net.DialTimeout("tcp", ap.String(), 5*time.Second); err == nil {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("a source outside allow_from: read = %v; want the connection closed", err)
		}
		c.Close()
	}
	testkit.Eventually(t, "the source counted as refused", func() bool {
		g, _ := m.Get("tcp", ap)
		return g.Refused["source"] == 1 && g.Conns == 0
	})
}

// TestGatewayIdleTimeout: a connection that carries nothing for the idle
// timeout is reset; one that keeps talking is not.
func TestGatewayIdleTimeout(t *testing.T) {
	m := manager(t, nil)
	echo := testkit.Echo(t)
	ap := add(t, m, Spec{Port: echo, IdleTimeout: 400 * time.Millisecond})
	busy, idle := dial(t, ap), dial(t, ap)
	buf := make([]byte, 2)
	for range 8 { // 1.6 s of traffic, every 200 ms
		if _, err := busy.Write([]byte("x\n")); err != nil {
			t.Fatalf("the busy connection was cut: %v", err)
		}
		busy.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(busy, buf); err != nil {
			t.Fatalf("the busy connection was cut: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	idle.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := idle.Read(buf); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("the idle connection: read = %v; want it reset after the idle timeout", err)
	}
}

// TestGatewayCutEndsBothSides: removing a gateway without drain ends its
// connections even where the peer's side never sends (a copy waits on it,
// not on the client): the client is reset, and so is the peer's side.
func TestGatewayCutEndsBothSides(t *testing.T) {
	m := manager(t, nil)
	ended := make(chan error, 1)
	silent := testkit.Local(t, func(c net.Conn) { // reads, never writes
		_, err := io.Copy(io.Discard, c)
		ended <- err
		c.Close()
	})
	ap := add(t, m, Spec{Port: silent})
	c := dial(t, ap)
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "the connection carried", func() bool {
		g, _ := m.Get("tcp", ap)
		return g.BytesToPeer == 5
	})
	if err := m.Remove("tcp", ap, false); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("the client after the cut: read = %v; want it reset", err)
	}
	select {
	case err := <-ended:
		if err == nil {
			t.Error("the peer's side saw a clean end of stream after the cut; want a reset")
		}
	case <-time.After(5 * time.Second):
		t.Error("the peer's side is still open after the cut")
	}
}

// TestGatewayTunnelFailureResets: a connection whose tunnel cannot be
// dialled is reset, never closed as if the peer had sent nothing, and is
// counted as refused (tunnel).
func TestGatewayTunnelFailureResets(t *testing.T) {
	m := manager(t, nil)
	ap := add(t, m, Spec{Port: freeAddr(t).Port()})              // nothing listens at the "peer's" port
	c, err := net.DialTimeout("tcp", ap.String(), 5*time.Second) // the reset may come before the dial returns
	if err == nil {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		_, err = io.ReadAll(c)
		c.Close()
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("a connection whose tunnel failed: %v; want a reset", err)
	}
	testkit.Eventually(t, "the failure counted", func() bool {
		g, _ := m.Get("tcp", ap)
		return g.Refused["tunnel"] == 1
	})
}

// TestGatewayDrainedAreCutOnClose: a gateway removed with drain keeps its
// open connection, and Close still ends it (both sides) and returns; an
// idle timeout under a second is refused (a ticker of zero would panic).
func TestGatewayDrainedAreCutOnClose(t *testing.T) {
	m := manager(t, nil)
	silent := testkit.Local(t, func(c net.Conn) { io.Copy(io.Discard, c); c.Close() })
	ap := add(t, m, Spec{Port: silent})
	c := dial(t, ap)
	c.Write([]byte("x"))
	testkit.Eventually(t, "the connection carried", func() bool {
		g, _ := m.Get("tcp", ap)
		return g.BytesToPeer == 1
	})
	if err := m.Remove("tcp", ap, true); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { m.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return while a drained gateway's connection was open")
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("the drained connection after Close: read = %v; want it cut", err)
	}
	m2 := manager(t, nil)
	if _, err := m2.Add(Spec{Proto: "tcp", Listen: freeAddr(t), PID: 1, Port: 80, IdleTimeout: 3}); !errors.Is(err, ErrBadSpec) {
		t.Errorf("an idle timeout of 3 ns = %v; want ErrBadSpec", err)
	}
}
