package dgram

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/dgram/frame"
	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/status"
)

// pair is two Carriers, parties 0 and 1, whose Send hands frames to the
// other's Receive, as the tunnel does.
type pair struct{ a, b *Carrier }

func newPair(t *testing.T, allow func(pid int, port uint16) bool, tweak func(*Options)) pair {
	t.Helper()
	var p pair
	oa := Options{Self: 0, Allow: allow, Send: func(pid int, b []byte) error {
		if pid != 1 {
			return ErrNoPath(errors.New("no such peer"))
		}
		p.b.Receive(0, bytes.Clone(b))
		return nil
	}}
	ob := Options{Self: 1, Allow: allow, Send: func(pid int, b []byte) error {
		if pid != 0 {
			return ErrNoPath(errors.New("no such peer"))
		}
		p.a.Receive(1, bytes.Clone(b))
		return nil
	}}
	if tweak != nil {
		tweak(&oa)
		tweak(&ob)
	}
	p.a, p.b = New(oa), New(ob)
	t.Cleanup(p.a.Close)
	t.Cleanup(p.b.Close)
	return p
}

// collector gathers what an association receives.
type collector struct {
	mu  sync.Mutex
	got [][]byte
	ch  chan struct{}
}

func newCollector() *collector { return &collector{ch: make(chan struct{}, 1<<16)} }

func (c *collector) recv(pid int, port uint16, data []byte) {
	c.mu.Lock()
	c.got = append(c.got, bytes.Clone(data))
	c.mu.Unlock()
	c.ch <- struct{}{}
}

// wait waits for n datagrams, or d.
func (c *collector) wait(n int, d time.Duration) [][]byte {
	deadline := time.After(d)
	for i := 0; i < n; i++ {
		select {
		case <-c.ch:
		case <-deadline:
			i = n
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.got
}

func allowAll(int, uint16) bool { return true }

func TestEchoThroughThePeer(t *testing.T) {
	p := newPair(t, allowAll, nil)
	port := testkit.UDPEcho(t)
	col := newCollector()
	a, err := p.a.Open(col.recv)
	if err != nil {
		t.Fatal(err)
	}
	const n = 1000
	for i := range n {
		if err := a.Send(1, port, fmt.Appendf(nil, "datagram %d", i)); err != nil {
			t.Fatalf("Send %d: %v", i, err)
		}
		if i%50 == 49 { // the loopback socket's buffer is not unbounded
			time.Sleep(time.Millisecond)
		}
	}
	got := col.wait(n, 10*time.Second)
	if len(got) < n*9/10 {
		t.Fatalf("%d of %d echoes came back", len(got), n)
	}
	for _, g := range got {
		if !bytes.HasPrefix(g, []byte("datagram ")) {
			t.Fatalf("echo %q is not one of ours", g)
		}
	}
	var sa, sb status.Status
	p.a.UpdateStatus(&sa)
	p.b.UpdateStatus(&sb)
	if sa.UDP.Sent != n || sb.UDP.Served != n || sa.UDP.Received != uint64(len(got)) || sa.UDP.Associations != 1 || sb.UDP.PeerSockets != 1 {
		t.Errorf("status: sender %+v, far end %+v; want %d sent and served, %d received, one association and one socket", sa.UDP, sb.UDP, n, len(got))
	}
}

// TestNoCrossDelivery: two associations to the same port each get their
// own answers only, and a frame for an association from a party it never
// sent to, or for a port it never sent to, reaches no one.
func TestNoCrossDelivery(t *testing.T) {
	p := newPair(t, allowAll, nil)
	port := testkit.UDPEcho(t)
	c1, c2 := newCollector(), newCollector()
	a1, _ := p.a.Open(c1.recv)
	a2, _ := p.a.Open(c2.recv)
	for i := range 200 {
		a1.Send(1, port, fmt.Appendf(nil, "one %d", i))
		a2.Send(1, port, fmt.Appendf(nil, "two %d", i))
	}
	for _, tc := range []struct {
		c    *collector
		want string
	}{{c1, "one "}, {c2, "two "}} {
		got := tc.c.wait(200, 5*time.Second)
		if len(got) == 0 {
			t.Fatalf("association %q got nothing back", tc.want)
		}
		for _, g := range got {
			if !bytes.HasPrefix(g, []byte(tc.want)) {
				t.Errorf("association %q got %q", tc.want, g)
			}
		}
	}
	before := len(c1.wait(0, 0))
	// A hostile party 2 that learned a1's id, and party 1 at a port a1
	// never sent to.
	p.a.Receive(2, frame.Append(nil, frame.Frame{Kind: frame.KindBack, Assoc: a1.id, Port: port, Data: []byte("forged")}))
	p.a.Receive(1, frame.Append(nil, frame.Frame{Kind: frame.KindBack, Assoc: a1.id, Port: port + 1, Data: []byte("forged")}))
	p.a.Receive(1, frame.Append(nil, frame.Frame{Kind: frame.KindBack, Assoc: a1.id ^ 1, Port: port, Data: []byte("forged")}))
	p.a.Receive(1, []byte{frame.KindBack, 1, 2})
	if got := c1.wait(0, 0); len(got) != before {
		t.Errorf("forged frames delivered: %q", got[before:])
	}
	var s status.Status
	p.a.UpdateStatus(&s)
	if s.UDP.Dropped["unknown_association"] != 3 || s.UDP.Dropped["bad_frame"] != 1 {
		t.Errorf("dropped %v; want 3 unknown_association and 1 bad_frame", s.UDP.Dropped)
	}
}

// TestPortPolicy: a datagram to a port the far end does not allow reaches
// nothing there, and the sender learns it was refused.
func TestPortPolicy(t *testing.T) {
	port := testkit.UDPEcho(t)
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	closed := uint16(pc.LocalAddr().(*net.UDPAddr).Port)
	p := newPair(t, func(pid int, q uint16) bool { return q == port }, nil)
	col := newCollector()
	a, _ := p.a.Open(col.recv)
	if err := a.Send(1, closed, []byte("not for you")); err != nil {
		t.Fatal(err)
	}
	pc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, _, err := pc.ReadFromUDP(make([]byte, 64)); err == nil {
		t.Errorf("a datagram of %d bytes reached a port that is not allowed", n)
	}
	var sa, sb status.Status
	for range 100 {
		p.a.UpdateStatus(&sa)
		if sa.UDP.Dropped["not_allowed"] > 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	p.b.UpdateStatus(&sb)
	if sa.UDP.Dropped["not_allowed"] != 1 || sb.UDP.Dropped["not_allowed"] != 1 || sb.UDP.PeerSockets != 0 {
		t.Errorf("sender %+v, far end %+v; want the refusal counted on both, and no socket", sa.UDP, sb.UDP)
	}
	// The allowed port still works.
	a.Send(1, port, []byte("fine"))
	if got := col.wait(1, 5*time.Second); len(got) != 1 || string(got[0]) != "fine" {
		t.Errorf("echo from the allowed port: %q", got)
	}
}

// TestBudgetAndIdle: a peer holds at most MaxPerPeer sockets; an idle one
// closes and frees its place.
func TestBudgetAndIdle(t *testing.T) {
	port := testkit.UDPEcho(t)
	p := newPair(t, allowAll, func(o *Options) { o.MaxPerPeer, o.Idle = 2, 300*time.Millisecond })
	var as []*Assoc
	cols := []*collector{newCollector(), newCollector(), newCollector()}
	for _, c := range cols {
		a, _ := p.a.Open(c.recv)
		as = append(as, a)
		a.Send(1, port, []byte("hi"))
	}
	for i, c := range cols[:2] {
		if got := c.wait(1, 5*time.Second); len(got) != 1 {
			t.Fatalf("association %d within the budget got %q", i, got)
		}
	}
	var sb status.Status
	p.b.UpdateStatus(&sb)
	if sb.UDP.PeerSockets != 2 || sb.UDP.Dropped["over_budget"] != 1 {
		t.Errorf("far end %+v; want 2 sockets and one association over budget", sb.UDP)
	}
	if got := cols[2].wait(1, 200*time.Millisecond); len(got) != 0 {
		t.Errorf("the association over budget got %q", got)
	}
	deadline := time.Now().Add(5 * time.Second)
	for p.b.UpdateStatus(&sb); sb.UDP.PeerSockets != 0 && time.Now().Before(deadline); p.b.UpdateStatus(&sb) {
		time.Sleep(50 * time.Millisecond)
	}
	if sb.UDP.PeerSockets != 0 {
		t.Fatalf("%d sockets still open after the idle timeout", sb.UDP.PeerSockets)
	}
	as[2].Send(1, port, []byte("again"))
	if got := cols[2].wait(1, 5*time.Second); len(got) != 1 {
		t.Errorf("after the idle ones closed, the third association got %q", got)
	}
}

func TestTooLargeIsDroppedNotCut(t *testing.T) {
	c := New(Options{Self: 0, Send: func(int, []byte) error {
		return &quic.DatagramTooLargeError{MaxDatagramPayloadSize: 1200}
	}})
	defer c.Close()
	a, _ := c.Open(func(int, uint16, []byte) {})
	err := a.Send(1, 9, make([]byte, 1500))
	var big *quic.DatagramTooLargeError
	if !errors.As(err, &big) {
		t.Fatalf("Send of 1,500 bytes = %v; want a DatagramTooLargeError", err)
	}
	var s status.Status
	c.UpdateStatus(&s)
	if s.UDP.Dropped["too_large"] != 1 || s.UDP.Sent != 0 {
		t.Errorf("status %+v; want one too_large and none sent", s.UDP)
	}
}

// TestToSelf: an association's datagrams to this party's own id reach its
// local port, without the tunnel.
func TestToSelf(t *testing.T) {
	port := testkit.UDPEcho(t)
	c := New(Options{Self: 3, Send: func(int, []byte) error { return errors.New("not the tunnel") }, LocalHost: netip.MustParseAddr("127.0.0.1")})
	defer c.Close()
	col := newCollector()
	a, _ := c.Open(col.recv)
	if err := a.Send(3, port, []byte("me")); err != nil {
		t.Fatal(err)
	}
	if got := col.wait(1, 5*time.Second); len(got) != 1 || string(got[0]) != "me" {
		t.Errorf("echo to self: %q", got)
	}
}

// TestCloseEndsFarSockets: an association that closes tells its
// destinations, whose sockets close at once, not when idle.
func TestCloseEndsFarSockets(t *testing.T) {
	p := newPair(t, allowAll, nil)
	port := testkit.UDPEcho(t)
	col := newCollector()
	a, _ := p.a.Open(col.recv)
	a.Send(1, port, []byte("hi"))
	if got := col.wait(1, 5*time.Second); len(got) != 1 {
		t.Fatalf("echo: %q", got)
	}
	a.Close()
	var s status.Status
	testkit.Eventually(t, "the far socket closed", func() bool {
		p.b.UpdateStatus(&s)
		return s.UDP.PeerSockets == 0
	})
	if err := a.Send(1, port, []byte("after")); !errors.Is(err, ErrClosed) {
		t.Errorf("Send after Close = %v; want ErrClosed", err)
	}
}

// TestRateToAPeer: past its rate to a peer, datagrams are dropped and
// counted, not queued.
func TestRateToAPeer(t *testing.T) {
	p := newPair(t, allowAll, func(o *Options) { o.Rate = 64 << 10 })
	port := testkit.UDPEcho(t)
	a, _ := p.a.Open(func(int, uint16, []byte) {})
	over := 0
	for range 200 {
		if err := a.Send(1, port, make([]byte, 1000)); errors.Is(err, errOverRate) {
			over++
		}
	}
	var s status.Status
	p.a.UpdateStatus(&s)
	if over < 100 || s.UDP.Dropped["over_rate"] != uint64(over) {
		t.Errorf("%d of 200 datagrams of 1 kB over a 64 KiB/s rate, dropped %v; want most, all counted", over, s.UDP.Dropped)
	}
}
