package quicmux

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/config"
	"sfkit-proxy/flow"
	"sfkit-proxy/internal/testkit"
)

// poolShape is, per connection of m's pool to pid (the primary first),
// how many of m's own flows run on it.
func poolShape(m *Mux, pid int) []int {
	m.mu.Lock()
	defer m.mu.Unlock()
	p := m.peers[pid]
	if p == nil {
		return nil
	}
	ls := m.linksLocked(p)
	on := m.mineLocked(p, ls)
	n := make([]int, len(ls))
	for i, l := range ls {
		n[i] = len(on[l])
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
	short := func(o *Options) { o.ConnsPerPeer = 4; o.poolIdle = 500 * time.Millisecond }
	a := startPartyWith(t, 0, nil, allowAll, short)
	b := startPartyWith(t, 1, nil, allowAll, short)
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
	a.m.mu.Lock()
	member := a.m.peers[1].pool[0].conn
	a.m.mu.Unlock()
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
// connection to join, and keeps within config.MaxConnsPerPeer.
func TestPoolMembersNeedTheirPrimary(t *testing.T) {
	x := startParty(t, 5, nil, allowAll)
	id, err := LoadIdentity(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	x.m.SetPeers([]PeerInfo{{PID: 4, Pin: id.Pin, CheckKey: NewCheckKey().Public(), Instance: NewInstance(),
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
	stranger, err := LoadIdentity(t.TempDir())
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
	for i := range config.MaxConnsPerPeer - 1 {
		if err := dial(member, id.Cert); err != nil {
			t.Fatalf("member %d refused: %v", i+1, err)
		}
	}
	testkit.Eventually(t, "a full pool", func() bool { return peerStats(x.m, 4).QUICConns == config.MaxConnsPerPeer })
	if dial(member, id.Cert) == nil {
		t.Fatalf("member %d accepted; the limit is %d connections", config.MaxConnsPerPeer, config.MaxConnsPerPeer)
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
