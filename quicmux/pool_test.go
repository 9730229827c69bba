package quicmux

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/config"
	"sfkit-proxy/flow"
	"sfkit-proxy/identity"
	"sfkit-proxy/internal/testkit"
)

// poolShape is, per connection of m's pool to pid (the primary first),
// how many of m's own flows run on it.
func poolShape(m *Mux, pid int) []int {
	p := m.peer(pid)
	if p == nil {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	on, _ := p.mineLocked(p.pool.live())
	n := make([]int, len(on))
	for i := range on {
		n[i] = len(on[i])
	}
	return n
}

// echoFlows opens n flows from m to pid's echo and writes size bytes on
// each, without ending them; check waits for the echoes and compares.
func echoFlows(t *testing.T, m *Mux, pid int, port uint16, n, size int) (check func()) {
	t.Helper()
	type sent struct {
		c     *flow.Conn
		want  []byte
		wrote chan error
	}
	var fs []sent
	for range n {
		c, err := m.Dial(ctxTimeout(t, 10*time.Second), pid, port)
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, size)
		rand.Read(want)
		wrote := make(chan error, 1)
		go func() {
			_, err := c.Write(want)
			wrote <- err
		}()
		fs = append(fs, sent{c, want, wrote})
	}
	return func() {
		t.Helper()
		var wg sync.WaitGroup
		for _, f := range fs {
			wg.Go(func() {
				defer f.c.Close()
				if err := <-f.wrote; err != nil {
					t.Errorf("write: %v", err)
				}
				f.c.CloseWrite()
				f.c.SetReadDeadline(time.Now().Add(30 * time.Second))
				got, err := io.ReadAll(f.c)
				if err != nil || !bytes.Equal(got, f.want) {
					t.Errorf("echo of %d bytes: got %d, %v", len(f.want), len(got), err)
				}
			})
		}
		wg.Wait()
	}
}

// TestPoolGivesFlowsTheirOwnConnections: flows opened from both ends share
// a pool that grows to one QUIC connection per flow, each side's own flows
// spread over it one per connection; every byte arrives once, and once the
// flows end the pool shrinks back to its primary.
func TestPoolGivesFlowsTheirOwnConnections(t *testing.T) {
	short := partyConf{allow: allowAll, adjust: func(o *Options) { o.ConnsPerPeer = 4 },
		tune: func(tu *tuning) { tu.poolIdle = 500 * time.Millisecond }}
	a := startPartyConf(t, 0, short)
	b := startPartyConf(t, 1, short)
	introduce(a, b)
	echoA, echoB := testkit.Echo(t), testkit.Echo(t)
	// Both ends open their flows at once, before there is a pool.
	checkA := echoFlows(t, a.m, 1, echoB, 2, 1<<20)
	checkB := echoFlows(t, b.m, 0, echoA, 2, 1<<20)
	testkit.Eventually(t, "a pool of 4 with each side's flows on their own connections", func() bool {
		sa, sb := poolShape(a.m, 1), poolShape(b.m, 0)
		return len(sa) == 4 && maxOf(sa) == 1 && sum(sa) == 2 && len(sb) == 4 && maxOf(sb) == 1 && sum(sb) == 2
	})
	checkA()
	checkB()
	if s := a.m.Stats(); s.PoolConnsOpened != 3 {
		t.Errorf("dialer opened %d pool connections; want 3", s.PoolConnsOpened)
	}
	// More flows than the limit share the four.
	checkA = echoFlows(t, a.m, 1, echoB, 6, 64<<10)
	testkit.Eventually(t, "6 flows spread over the 4 connections", func() bool {
		s := poolShape(a.m, 1)
		return len(s) == 4 && maxOf(s) == 2 && minOf(s) == 1
	})
	checkA()
	testkit.Eventually(t, "the idle pool shrinks to its primary", func() bool {
		return peerStats(a.m, 1).QUICConns == 1 && peerStats(b.m, 0).QUICConns == 1
	})
	roundTrip(t, a.m, 1, halfCloseEcho(t), 1000)
}

// TestPoolFlowsSurviveTheirConnection: flows on pool members carry on when
// a member dies, and when the primary's path dies with all its members.
func TestPoolFlowsSurviveTheirConnection(t *testing.T) {
	a := startParty(t, 0, nil, allowAll)
	b := startParty(t, 1, nil, allowAll)
	introduce(a, b)
	echo := testkit.Echo(t)
	check := echoFlows(t, a.m, 1, echo, 4, 2<<20)
	testkit.Eventually(t, "a pool of 4", func() bool { return maxOf(poolShape(a.m, 1)) == 1 && len(poolShape(a.m, 1)) == 4 })
	member := linksOf(a.m, 1)[1].conn
	member.CloseWithError(0x999, "test: member cut")
	testkit.Eventually(t, "the member's flow moved", func() bool { return a.m.Stats().FlowsResumed+a.m.Stats().FlowsMoved > 0 })
	cut(b.m, 0)
	check()
	if n := peerStats(a.m, 1).QUICConns; n < 1 {
		t.Errorf("no connection to the peer after the cuts")
	}
}

// TestPoolMembersNeedTheirPrimary: a member handshake is refused unless
// the party it claims holds that party's pinned key, has a primary
// connection to join, and keeps within the pool's limit (ConnsPerPeer and
// two replaced connections).
func TestPoolMembersNeedTheirPrimary(t *testing.T) {
	x := startParty(t, 5, nil, allowAll)
	id, err := identity.Load(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	x.m.SetPeers([]PeerInfo{{PID: 4, Pin: id.Pin, CheckKey: identity.NewCheckKey().Public(), Instance: identity.NewInstance(),
		Candidates: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}}})
	testkit.Eventually(t, "party 4 known", func() bool { return peerOf(x.m, 4) != nil })
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: conn}
	t.Cleanup(func() { tr.Close() })
	dial := func(name string, cert tls.Certificate) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		cfg := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{ALPN}, MinVersion: tls.VersionTLS13,
			InsecureSkipVerify: true, ServerName: name}
		qc, err := tr.Dial(ctx, net.UDPAddrFromAddrPort(x.m.LocalAddr()), cfg, QUICConfig(3*time.Second))
		if err != nil {
			return err
		}
		// TLS 1.3: the client may finish before the server refuses; a
		// refused connection is closed at once.
		sctx, scancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer scancel()
		if _, err := qc.AcceptStream(sctx); err != nil && sctx.Err() == nil {
			return err
		}
		return nil
	}
	primary, member := handshakeName(4, 5), handshakeName(4, 5)+memberName
	stranger, err := identity.Load(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if dial(member, id.Cert) == nil {
		t.Fatal("a member with no primary to join was accepted")
	}
	if dial(primary, id.Cert) != nil {
		t.Fatal("party 4's primary connection was refused")
	}
	testkit.Eventually(t, "party 4 connected", func() bool { return peerStats(x.m, 4).QUICConns == 1 })
	if dial(member, stranger.Cert) == nil {
		t.Fatal("a member with another key than party 4's was accepted")
	}
	limit := poolLimit(config.DefaultConnsPerPeer)
	for i := range limit - 1 {
		if err := dial(member, id.Cert); err != nil {
			t.Fatalf("member %d refused: %v", i+1, err)
		}
	}
	testkit.Eventually(t, "a full pool", func() bool { return peerStats(x.m, 4).QUICConns == limit })
	if dial(member, id.Cert) == nil {
		t.Fatalf("member %d accepted; the limit is %d connections", limit, limit)
	}
}

func sum(v []int) int {
	n := 0
	for _, x := range v {
		n += x
	}
	return n
}

func maxOf(v []int) int {
	m := -1
	for _, x := range v {
		m = max(m, x)
	}
	return m
}

func minOf(v []int) int {
	m := 1 << 30
	for _, x := range v {
		m = min(m, x)
	}
	return m
}

func TestSpread(t *testing.T) {
	tests := []struct {
		name  string
		on    [][]string
		stray []string
		want  []move[string]
	}{
		{"no connection", nil, []string{"a"}, nil},
		{"balanced", [][]string{{"a"}, {"b"}}, nil, nil},
		{"off by one is balanced", [][]string{{"a", "b"}, {"c"}}, nil, nil},
		{"all on the primary", [][]string{{"a", "b", "c", "d"}, {}, {}, {}}, nil,
			[]move[string]{{"d", 1}, {"c", 2}, {"b", 3}}},
		{"strays go to the fewest first", [][]string{{"a", "b"}, {}}, []string{"x", "y"},
			[]move[string]{{"x", 1}, {"y", 1}}},
		{"strays then balance", [][]string{{"a", "b", "c"}, {}}, []string{"x"},
			[]move[string]{{"x", 1}, {"c", 1}}},
		{"a new member takes from the busiest", [][]string{{"a", "b"}, {"c", "d"}, {}}, nil,
			[]move[string]{{"b", 2}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := spread(tt.on, tt.stray)
			if !slices.Equal(got, tt.want) {
				t.Errorf("spread(%v, %v) = %v; want %v", tt.on, tt.stray, got, tt.want)
			}
			// Whatever the moves, the result differs by at most one.
			if len(tt.on) == 0 {
				return
			}
			n := make([]int, len(tt.on))
			for i := range tt.on {
				n[i] = len(tt.on[i])
			}
			from := map[string]int{}
			for i, fs := range tt.on {
				for _, f := range fs {
					from[f] = i
				}
			}
			for _, mv := range got {
				if i, ok := from[mv.flow]; ok {
					n[i]--
				}
				n[mv.to]++
			}
			if slices.Max(n)-slices.Min(n) > 1 {
				t.Errorf("after the moves the connections carry %v", n)
			}
		})
	}
}
