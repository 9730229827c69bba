package quicmux

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/config"
	"sfkit-proxy/flow"
	"sfkit-proxy/identity"
	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/quicmux/header"
)

// hostilePeer is a study member with its own valid key that speaks the
// stream protocol by hand: it dials its target as party pid (lower than
// the target's, so the target accepts), as often as it likes, and opens
// whatever streams and writes whatever frames it likes on them.
type hostilePeer struct {
	t      *testing.T
	pid    int
	id     *identity.Identity
	tr     *quic.Transport
	target *testParty
	info   PeerInfo
	lastID uint64 // of the last flow connect opened
}

func newHostilePeer(t *testing.T, pid int, target *testParty) *hostilePeer {
	t.Helper()
	id, err := identity.Load(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: conn}
	t.Cleanup(func() { tr.Close(); conn.Close() })
	return &hostilePeer{t: t, pid: pid, id: id, tr: tr, target: target,
		info: PeerInfo{PID: pid, Pin: id.Pin, CheckKey: identity.NewCheckKey().Public(), Instance: identity.NewInstance(),
			Candidates: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}}}
}

// dial opens a new primary connection to the target (which replaces the
// last one there), as fast as the target's handshake rate limit lets it.
func (h *hostilePeer) dial() *quic.Conn {
	h.t.Helper()
	cfg := &tls.Config{Certificates: []tls.Certificate{h.id.Cert}, NextProtos: []string{ALPN}, MinVersion: tls.VersionTLS13,
		InsecureSkipVerify: true, ServerName: handshakeName(h.pid, h.target.info.PID)}
	var err error
	for range 40 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		qc, derr := h.tr.Dial(ctx, net.UDPAddrFromAddrPort(h.target.m.LocalAddr()), cfg, QUICConfig(3*time.Second))
		cancel()
		if derr == nil {
			return qc
		}
		err = derr
		time.Sleep(100 * time.Millisecond) // refused: over the rate of handshakes
	}
	h.t.Fatal(err)
	return nil
}

// connect asks for a new flow to port on qc and returns its stream and the
// target's answer.
func (h *hostilePeer) connect(qc *quic.Conn, port uint16) (*quic.Stream, header.Status) {
	h.t.Helper()
	h.lastID = mrand.Uint64()
	return h.connectID(qc, port, h.lastID)
}

// connectID is connect with flow id id.
func (h *hostilePeer) connectID(qc *quic.Conn, port uint16, id uint64) (*quic.Stream, header.Status) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	str, reply, err := openStream(ctx, qc, header.Request{Kind: header.KindConnect, Port: port, Flow: id})
	if err != nil {
		h.t.Fatalf("hostile connect: %v", err)
	}
	return str, reply.Status
}

// drop abandons a stream at once, both ways: the flow it carried waits,
// detached, for a resume that never comes.
func drop(str *quic.Stream) {
	str.CancelRead(codeStreamAbort)
	str.CancelWrite(codeStreamAbort)
}

// honestTransfer echoes size bytes from a to b's port through the tunnel
// while the test goes on; wait reports how it went.
func honestTransfer(a *Mux, pid int, port uint16, size int) (wait func() error) {
	done := make(chan error, 1)
	go func() {
		done <- func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			c, err := a.Dial(ctx, pid, port)
			if err != nil {
				return err
			}
			defer c.Close()
			want := make([]byte, size)
			rand.Read(want)
			go func() {
				for b := want; len(b) > 0; b = b[min(len(b), 64<<10):] {
					c.Write(b[:min(len(b), 64<<10)])
					time.Sleep(time.Millisecond) // paced: it runs through the attack
				}
				c.CloseWrite()
			}()
			// Compared as it comes, so that the transfer's own memory does
			// not grow while the test measures the heap.
			c.SetReadDeadline(time.Now().Add(60 * time.Second))
			buf := make([]byte, 64<<10)
			got := 0
			for {
				n, err := c.Read(buf)
				if !bytes.Equal(buf[:n], want[got:min(got+n, len(want))]) {
					return fmt.Errorf("echo differs at byte %d", got)
				}
				got += n
				if err == io.EOF && got == len(want) {
					return nil
				}
				if err != nil {
					return fmt.Errorf("echo of %d bytes: got %d bytes, %v", size, got, err)
				}
			}
		}()
	}()
	return func() error { return <-done }
}

// TestHostileMemberIsBudgeted: while a study member with a valid key
// replaces its connection over and over holding a flow on each, breaks the
// flow protocol, sends a megabyte in 1-byte frames, and floods flows whose
// streams it drops at once (each left waiting for a resume, with a local
// connection open), an honest peer's transfer to the same sidecar goes on
// and completes intact. The member keeps no more than
// its pool's limit of connections, a replaced connection takes no new
// flow, and past its budget of flows it is refused at once.
func TestHostileMemberIsBudgeted(t *testing.T) {
	const maxFlows = 60
	echo := halfCloseEcho(t)
	source := localServer(t, func(c net.Conn) { c.Write(make([]byte, 8<<20)) })
	sink := localServer(t, func(c net.Conn) { time.Sleep(time.Minute) })
	x, y, h := hostileScene(t, echo, func(o *Options) { o.MaxFlows = maxFlows })
	honest := honestTransfer(y.m, 5, echo, 8<<20)

	// Connection churn: each new connection replaces the last, which holds
	// a flow open.
	var conns []*quic.Conn
	var held []*quic.Stream
	limit := poolLimit(config.DefaultConnsPerPeer)
	for i := range limit + 8 {
		qc := h.dial()
		conns = append(conns, qc)
		str, st := h.connect(qc, echo)
		if st != header.StatusOK {
			t.Fatalf("flow on connection %d: %v", i, st)
		}
		held = append(held, str)
		if i > 0 && conns[i-1].Context().Err() == nil {
			if _, st := h.connect(conns[i-1], echo); st != header.StatusDraining {
				t.Errorf("a new flow on a replaced connection: %v; want %v", st, header.StatusDraining)
			}
		}
	}
	live := func() int {
		n := 0
		for _, qc := range conns {
			if qc.Context().Err() == nil {
				n++
			}
		}
		return n
	}
	testkit.Eventually(t, fmt.Sprintf("at most %d of the member's connections live", limit),
		func() bool { return live() <= limit })

	// A frame that breaks the protocol: an ack far past what the target
	// sent, while its writer is stuck in a stream write (the member reads
	// nothing). That flow is reset, counted as such; nothing else is.
	qc := conns[len(conns)-1]
	streams := peerStats(x.m, 4).OpenConns
	str, st := h.connect(qc, source)
	if st != header.StatusOK {
		t.Fatalf("flow to the source: %v", st)
	}
	held = append(held, str)
	testkit.Eventually(t, "the flow to the source carried", func() bool { return peerStats(x.m, 4).OpenConns == streams+1 })
	time.Sleep(200 * time.Millisecond) // the source fills the stream
	str.Write(binary.BigEndian.AppendUint64([]byte{0x02}, 1<<40))
	testkit.Eventually(t, "the broken flow reset with reason protocol", func() bool {
		return x.m.Stats().FlowsReset[ResetProtocol.String()] == 1
	})
	// Its stream is let go of, though the member reads nothing and so
	// never takes the reset.
	testkit.Eventually(t, "the broken flow's stream let go of", func() bool { return peerStats(x.m, 4).OpenConns == streams })

	// A flow id the member has, or had, is not taken again.
	if _, st := h.connectID(qc, echo, h.lastID); st != header.StatusBadRequest {
		t.Errorf("a flow with the id of a live one: %v; want %v", st, header.StatusBadRequest)
	}

	// Tiny frames: just over MaxRecv (1 MiB) in 1-byte data frames, to a
	// program that reads nothing. What the target holds for them is the
	// bytes, not a chunk each (that was 48 bytes a frame, 48 MiB).
	str, st = h.connect(qc, sink)
	if st != header.StatusOK {
		t.Fatalf("flow to the sink: %v", st)
	}
	held = append(held, str)
	before, recvd := heapInUse(), peerStats(x.m, 4).BytesRecv
	tiny := bytes.Repeat([]byte{0x01, 0, 0, 0, 1, 'x'}, 1<<20+1)
	wire := len(tiny)
	// More than the stream's window: the write ends only as the target
	// takes the frames in, a million of them (slow under the race
	// detector, on a machine running other tests).
	wrote := make(chan error, 1)
	go func() {
		str.SetWriteDeadline(time.Now().Add(2 * time.Minute))
		_, err := str.Write(tiny)
		wrote <- err
	}()
	for deadline := time.Now().Add(2 * time.Minute); peerStats(x.m, 4).BytesRecv-recvd < uint64(wire-256<<10); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the target took in %d of %d bytes of tiny frames in 2 minutes", peerStats(x.m, 4).BytesRecv-recvd, wire)
		}
	}
	if err := <-wrote; err != nil {
		t.Fatalf("tiny frames: %v", err)
	}
	tiny = nil
	if grew := heapInUse() - before; grew > 4*int64(wire) {
		t.Errorf("%d bytes of tiny frames (%d on the wire) grew the heap by %d bytes; want at most %d",
			1<<20+1, wire, grew, 4*wire)
	}
	opened := len(held) - 1 // the broken flow ended

	// Detached flows: open and drop at once, until refused.
	for range 2 * maxFlows {
		str, st := h.connect(qc, echo)
		if st == header.StatusOverBudget {
			break
		}
		if st != header.StatusOK {
			t.Fatalf("flood: %v", st)
		}
		drop(str)
		opened++
	}
	if opened != maxFlows {
		t.Errorf("the member opened %d flows; want its budget, %d", opened, maxFlows)
	}
	if _, st := h.connect(qc, echo); st != header.StatusOverBudget {
		t.Errorf("past the budget: %v; want %v", st, header.StatusOverBudget)
	}
	if err := honest(); err != nil {
		t.Errorf("honest transfer during the attack: %v", err)
	}
	roundTrip(t, y.m, 5, echo, 1000)

	// What the member holds it gives back: once its flows end, it may
	// open new ones.
	for _, str := range held {
		drop(str)
	}
	for _, c := range conns {
		c.CloseWithError(0, "")
	}
	x.m.resetFlows(4, ResetPeerShutdown, nil)
	testkit.Eventually(t, "the member's flows given back", func() bool {
		pf := x.m.flows.of(4)
		pf.mu.Lock()
		defer pf.mu.Unlock()
		return pf.opened == 0
	})
	qc = h.dial()
	if _, st := h.connect(qc, echo); st != header.StatusOK {
		t.Errorf("after its flows ended: %v; want %v", st, header.StatusOK)
	}
}

// hostileScene is a target x (party 5, with adjust), an honest peer y
// (party 6) connected to it and echoing through it, and a hostile member
// h (party 4) that x knows.
func hostileScene(t *testing.T, echo uint16, adjust func(*Options)) (x, y *testParty, h *hostilePeer) {
	t.Helper()
	x = startPartyWith(t, 5, nil, allowAll, adjust)
	y = startParty(t, 6, nil, allowAll)
	h = newHostilePeer(t, 4, x)
	x.m.SetPeers([]PeerInfo{x.info, y.info, h.info})
	y.m.SetPeers([]PeerInfo{x.info, y.info})
	testkit.Eventually(t, "party 4 known", func() bool { return peerOf(x.m, 4) != nil })
	roundTrip(t, y.m, 5, echo, 1000)
	return x, y, h
}

// heapInUse is the heap in use after a collection.
func heapInUse() int64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse)
}

// TestTombsAreBoundedPerPeer: how a peer's flows ended is remembered for
// its late resumes until they expire, at most maxTombs per peer, whatever
// another peer does; flows we opened leave no tomb (only their opener
// resumes them).
func TestTombsAreBoundedPerPeer(t *testing.T) {
	var ft flowTable
	t0 := time.Now()
	life := time.Minute
	bury := func(pid int, id uint64, mine bool, at time.Time) {
		key := flowKey{pid: pid, id: id, mine: mine}
		if !mine {
			if ok, fresh := ft.of(pid).take(key, maxTombs); !ok || !fresh {
				t.Fatalf("take(%v) = %v, %v; want a fresh flow", key, ok, fresh)
			}
		}
		ft.of(pid).ended(key, nil, tomb{status: header.StatusFlowDone, until: at.Add(life)}, at)
	}
	tombOf := func(key flowKey) bool {
		_, _, ended := ft.of(key.pid).lookup(key)
		return ended
	}
	has := func(pid int, id uint64) bool { return tombOf(flowKey{pid: pid, id: id}) }
	bury(1, 1, false, t0)
	bury(2, 1, false, t0)
	bury(1, 2, true, t0)
	if !has(1, 1) || !has(2, 1) {
		t.Fatal("a peer's ended flow is not remembered")
	}
	if tombOf(flowKey{pid: 1, id: 2, mine: true}) {
		t.Error("a flow we opened left a tomb")
	}
	// A flood from party 1, after party 1's first tomb expired.
	for i := range maxTombs + 10 {
		bury(1, uint64(100+i), false, t0.Add(life+time.Second))
	}
	if n := len(ft.of(1).tombs.byKey); n != maxTombs {
		t.Errorf("party 1 has %d tombs; want at most %d", n, maxTombs)
	}
	if has(1, 1) || has(1, 100) || !has(1, uint64(100+maxTombs+9)) {
		t.Error("the expired and the oldest tombs were kept, or the newest lost")
	}
	if !has(2, 1) {
		t.Error("party 1's flood cost party 2 its tomb")
	}
}

// TestHostileMemberIsBoundedInBytes: a member opens many flows to a
// program that reads nothing and sends each as much as it can. What the
// target holds for it stays within the member's budget: its flows' shared
// memory (FlowMemory) and free bytes, and the QUIC windows of its
// connection; an honest peer's transfer to the same sidecar goes on and
// completes intact meanwhile.
func TestHostileMemberIsBoundedInBytes(t *testing.T) {
	const (
		flows  = 40
		budget = 4 << 20
	)
	echo := halfCloseEcho(t)
	sink, accepted := stingySink(t)
	x, y, h := hostileScene(t, echo, func(o *Options) { o.FlowMemory = budget })

	before, files := heapInUse(), openFiles(t)
	honest := honestTransfer(y.m, 5, echo, 8<<20)
	qc := h.dial()
	frame := append(binary.BigEndian.AppendUint32([]byte{0x01}, 64<<10), make([]byte, 64<<10)...)
	var strs []*quic.Stream
	for range flows {
		str, st := h.connect(qc, sink)
		if st != header.StatusOK {
			t.Fatalf("flow to the sink: %v", st)
		}
		strs = append(strs, str)
	}
	var wg sync.WaitGroup
	for _, str := range strs {
		wg.Go(func() {
			str.SetWriteDeadline(time.Now().Add(5 * time.Second))
			for range 32 { // 2 MiB each, twice what one flow may hold unread
				if _, err := str.Write(frame); err != nil {
					return
				}
			}
		})
	}
	wg.Wait() // every writer stopped: the target takes no more
	pf := x.m.flows.of(4)
	if used := pf.budget.Used(); used > budget {
		t.Errorf("the member's flows hold %d bytes of their budget; want at most %d", used, budget)
	}
	// Its flows' memory (the budget and each flow's free bytes both
	// ways), the QUIC windows of its connection, and the honest transfer's
	// own buffers: well under what 40 flows of 1 MiB each would hold.
	limit := int64(budget + flows*2*flow.FreeBytes + 2*connWindow + 8<<20)
	if grew := heapInUse() - before; grew > limit {
		t.Errorf("the member's flows grew the heap by %d bytes; want at most %d", grew, limit)
	}
	if err := honest(); err != nil {
		t.Errorf("the honest transfer during the attack: %v", err)
	}

	// The member shuts down, so its flows are reset: their local
	// connections are let go of at once (reset), though the program reads
	// nothing and the target's writes to them wait.
	qc.CloseWithError(codeShutdown, "shutdown")
	testkit.Eventually(t, "the member's flows ended", func() bool {
		pf.mu.Lock()
		defer pf.mu.Unlock()
		return pf.opened == 0
	})
	// The sink's ends stay open (it never closes them); the target's are
	// closed.
	if n := len(accepted()); n != flows {
		t.Fatalf("the sink accepted %d connections; want %d", n, flows)
	}
	testkit.Eventually(t, "the target's local connections closed", func() bool { return openFiles(t) <= files+flows+8 })
}

// openFiles counts this process's open file descriptors.
func openFiles(t *testing.T) int {
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd:", err)
	}
	return len(fds)
}

// stingySink is a local port whose program takes connections and reads
// nothing, with a receive buffer so small that what is sent to it waits
// in the sidecar, not in the kernel. accepted lists its connections.
func stingySink(t *testing.T) (port uint16, accepted func() []net.Conn) {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		}); err != nil {
			return err
		}
		return serr
	}}
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	testkit.Serve(t, ln, func(c net.Conn) {
		mu.Lock()
		defer mu.Unlock()
		conns = append(conns, c)
	})
	return uint16(ln.Addr().(*net.TCPAddr).Port), func() []net.Conn {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(conns)
	}
}
