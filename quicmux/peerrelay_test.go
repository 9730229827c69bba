package quicmux

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"io"
	"math"
	"net"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/quicmux/header"
	"sfkit-proxy/relay/relaytest"
	"sfkit-proxy/status"
)

// relayScene is parties 0 and 1 with no direct path between them (party
// 0's firewall drops party 1), and relays: parties 2 onward, which reach
// both. No TURN server.
type relayScene struct {
	a, b     *testParty
	firewall *testkit.FilterConn
	relays   []*testParty
}

func newRelayScene(t *testing.T, relays int, adjust func(*Options)) *relayScene {
	t.Helper()
	short := func(o *Options) {
		o.RelayDelay = 300 * time.Millisecond
		if adjust != nil {
			adjust(o)
		}
	}
	s := &relayScene{}
	var fc *testkit.FilterConn
	s.a = startPartyConf(t, 0, partyConf{allow: allowAll, adjust: short, pc: func() *testkit.FilterConn {
		fc = testkit.NewFilterConn(listenLoopback(t))
		return fc
	}()})
	s.firewall = fc
	s.b = startPartyWith(t, 1, nil, allowAll, short)
	s.firewall.Drop(s.b.m.LocalAddr(), true)
	all := []*testParty{s.a, s.b}
	for i := range relays {
		r := startPartyWith(t, 2+i, nil, allowAll, short)
		s.relays = append(s.relays, r)
		all = append(all, r)
	}
	introduce(all...)
	return s
}

func listenLoopback(t *testing.T) net.PacketConn {
	t.Helper()
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	return pc
}

// TestPeerRelay: with no direct path and no TURN server, parties 0 and 1
// reach each other through party 2, both ways, every byte right; the
// relay counts what it carried; parallel flows share one connection
// through it; and when the direct path opens mid-transfer, the same
// connection completes on it.
func TestPeerRelay(t *testing.T) {
	s := newRelayScene(t, 1, nil)
	echo := halfCloseEcho(t)
	roundTrip(t, s.a.m, 1, echo, 1<<20)
	roundTrip(t, s.b.m, 0, echo, 1<<20)
	if ps := waitPath(t, s.a.m, 1, PathPeerRelayed); ps.State != StateRelayed || ps.Via != "peer 2" {
		t.Errorf("dialer's stats = %+v; want relayed via peer 2", ps)
	}
	if ps := waitPath(t, s.b.m, 0, PathPeerRelayed); ps.Via != "peer 2" {
		t.Errorf("acceptor's stats = %+v; want relayed via peer 2", ps)
	}
	// A ping names the relay: the inner connection has no address of its own.
	if _, kind, where, err := s.a.m.Ping(ctxTimeout(t, 5*time.Second), 1); err != nil || kind != PathPeerRelayed || where != "peer 2" {
		t.Errorf("Ping through the relay = %v, %q, %v; want %v, \"peer 2\"", kind, where, err, PathPeerRelayed)
	}
	rs := s.relays[0].m.Stats().PeerRelay
	if rs.Sessions != 1 || rs.BytesForwarded < 4<<20 || len(rs.Relaying) != 1 ||
		rs.Relaying[0].A != 0 || rs.Relaying[0].B != 1 || rs.Relaying[0].BytesAB < 2<<20 || rs.Relaying[0].BytesBA < 2<<20 {
		t.Errorf("relay's stats = %+v; want 1 session between 0 and 1, at least 2 MiB each way", rs)
	}
	// Both hops carry the packets raw: most of the 4 MiB's packets went
	// from the relay's socket, not as datagrams.
	if len(rs.Relaying) == 1 && (!rs.Relaying[0].Raw || rs.RawIn < 2000 || rs.RawOut < 2000) {
		t.Errorf("relay's stats = %+v; want both hops raw, most packets raw", rs)
	}
	// Parallel flows share the one connection through the relay (the
	// relay's own connections carry it: no pool inside).
	check := echoFlows(t, s.a.m, 1, testkit.Echo(t), 3, 256<<10)
	check()
	if ps := peerStats(s.a.m, 1); ps.QUICConns != 1 || ps.Path != PathPeerRelayed {
		t.Errorf("after 3 parallel flows: %+v; want one peer-relayed connection", ps)
	}

	// The direct path opens mid-transfer.
	echoAcross(t, s.a.m, 1, echo, 30*time.Second, "the move to direct", func() {
		s.firewall.Drop(s.b.m.LocalAddr(), false)
		waitPath(t, s.a.m, 1, PathDirect)
	})
}

// echoAcross writes 4 MiB to pid's echo on one connection from m, with
// event between the halves, and checks that every byte comes back within
// wait.
func echoAcross(t *testing.T, m *Mux, pid int, echo uint16, wait time.Duration, what string, event func()) {
	t.Helper()
	conn, err := m.Dial(ctxTimeout(t, 10*time.Second), pid, echo)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	want := make([]byte, 4<<20)
	rand.Read(want)
	half := len(want) / 2
	go func() {
		conn.Write(want[:half])
		event()
		conn.Write(want[half:])
		conn.CloseWrite()
	}()
	conn.SetReadDeadline(time.Now().Add(wait))
	got, err := io.ReadAll(conn)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the same connection across %s: got %d of %d bytes, %v", what, len(got), len(want), err)
	}
}

// TestRawHopFallsBack: a middlebox at party 0 drops raw packets
// mid-transfer (it passes only QUIC), both ways or only party 0's own
// (one way): the hop goes back to datagrams before the path would count
// as lost, and the transfer completes, every byte right; the hop goes raw again when the middlebox lets raw
// packets through.
func TestRawHopFallsBack(t *testing.T) {
	for _, tt := range []struct {
		name string
		drop func(f *testkit.FilterConn, first byte, on bool)
	}{
		{"both ways", (*testkit.FilterConn).DropLeading},
		{"one way", (*testkit.FilterConn).DropLeadingOut},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := newRelayScene(t, 1, nil)
			echo := halfCloseEcho(t)
			roundTrip(t, s.a.m, 1, echo, 1<<20)
			relay := s.relays[0].m
			// (The session of a connection that was lost stays until it is idle.)
			raw := func() bool {
				return slices.ContainsFunc(relay.Stats().PeerRelay.Relaying, func(r status.RelaySession) bool { return r.Raw })
			}
			testkit.Eventually(t, "both hops raw", raw)
			block := func(on bool) {
				tt.drop(s.firewall, rawHeard, on)
				tt.drop(s.firewall, rawUnheard, on)
			}
			repairs := peerStats(s.a.m, 1).Repairs
			echoAcross(t, s.a.m, 1, echo, 30*time.Second, "raw packets dropped", func() { block(true) })
			testkit.Eventually(t, "party 0's hop back on datagrams", func() bool { return !raw() })
			if ps := peerStats(s.a.m, 1); ps.Repairs != repairs {
				t.Errorf("party 0's path to party 1 was lost and repaired (%+v): the hop went back to datagrams too late", ps)
			}
			// Now only probes go raw from party 0: one a second at most.
			before := s.a.m.Stats().PeerRelay.RawOut
			start := time.Now()
			roundTrip(t, s.a.m, 1, echo, 1<<20)
			if got, most := s.a.m.Stats().PeerRelay.RawOut-before, uint64(time.Since(start)/rawProbe)+2; got > most {
				t.Errorf("party 0 sent %d raw packets through the middlebox in %v; want probes only, %d at most", got, time.Since(start), most)
			}
			block(false)
			testkit.Eventually(t, "both hops raw again", func() bool {
				roundTrip(t, s.a.m, 1, echo, 64<<10)
				return raw()
			})
			if ps := peerStats(s.a.m, 1); ps.Path != PathPeerRelayed {
				t.Errorf("party 0's path to party 1 = %v; want still peer-relayed", ps.Path)
			}
		})
	}
}

// TestPeerRelayBeatsTURN: parties 0 and 1 have no direct path; party 0
// has TURN, 40 ms away, and party 2 reaches both in well under a
// millisecond. The pair starts on TURN, then moves to the peer relay,
// which measures a shorter round trip, in the middle of a transfer that
// completes with every byte right. With the relay as far away as TURN is
// near, the pair stays on TURN and asks the relay for nothing.
func TestPeerRelayBeatsTURN(t *testing.T) {
	c := relaytest.Start(t, relaytest.Options{})
	short := func(o *Options) { o.RelayDelay = 300 * time.Millisecond }
	t.Run("nearer", func(t *testing.T) {
		a, firewall := startRelayedPartyWith(t, 0, c, "udp", func(pc net.PacketConn) net.PacketConn { return testkit.NewDelayConn(pc, 40*time.Millisecond) }, nil)
		b := startPartyWith(t, 1, nil, allowAll, short)
		r := startPartyWith(t, 2, nil, allowAll, short)
		firewall.Drop(b.m.LocalAddr(), true)
		introduce(a, b, r)
		echo := halfCloseEcho(t)
		roundTrip(t, a.m, 1, echo, 64<<10)
		if ps := peerStats(a.m, 1); ps.Path != PathRelayed && ps.Path != PathPeerRelayed {
			t.Fatalf("party 0's path to party 1 = %v; want TURN first, or already the peer relay", ps.Path)
		}
		echoAcross(t, a.m, 1, echo, 60*time.Second, "the move from TURN to the peer relay", func() {
			waitPath(t, a.m, 1, PathPeerRelayed)
		})
		if ps := peerStats(a.m, 1); ps.Via != "peer 2" {
			t.Errorf("party 0's path to party 1 = %+v; want relayed via peer 2", ps)
		}
		if ps := waitPath(t, b.m, 0, PathPeerRelayed); ps.Via != "peer 2" {
			t.Errorf("party 1's path to party 0 = %+v; want relayed via peer 2", ps)
		}
	})
	t.Run("farther", func(t *testing.T) {
		a, firewall := startRelayedPartyWith(t, 0, c, "udp", nil, nil)
		b := startPartyWith(t, 1, nil, allowAll, short)
		r := startPartyConf(t, 2, partyConf{allow: allowAll, adjust: short, pc: testkit.NewDelayConn(listenLoopback(t), 40*time.Millisecond)})
		firewall.Drop(b.m.LocalAddr(), true)
		introduce(a, b, r)
		echo := halfCloseEcho(t)
		roundTrip(t, a.m, 1, echo, 64<<10)
		waitPath(t, a.m, 1, PathRelayed)
		testkit.Eventually(t, "party 0 reaches party 2", func() bool { return a.m.relayable(2) != nil })
		time.Sleep(rankFirst + time.Second)
		roundTrip(t, a.m, 1, echo, 64<<10)
		if ps := peerStats(a.m, 1); ps.Path != PathRelayed {
			t.Errorf("party 0's path to party 1 = %v; want still TURN", ps.Path)
		}
		if rs := r.m.Stats().PeerRelay; rs.Refused != 0 || rs.Sessions != 0 {
			t.Errorf("the far relay was asked: %+v", rs)
		}
	})
}

// TestRankBackoff: a pair back on TURN within a minute of a ranking's
// move waits a minute before ranking again, then twice as long each time
// that happens, up to rankMaxWait; going back to TURN again without a new
// move (its keep starting over) does not stretch the wait, nor end it;
// a move that held makes the next ranking come at rankFirst.
func TestRankBackoff(t *testing.T) {
	p := &peer{}
	near := func(got, want time.Duration) bool { return got <= want && got > want-time.Second }
	if got := p.rankDelay(); got != rankFirst {
		t.Errorf("first ranking after %v; want %v", got, rankFirst)
	}
	want := rankEvery
	for range 7 {
		p.rankedAt = time.Now().Add(-10 * time.Second) // a move that did not hold
		if got := p.rankDelay(); !near(got, want) {
			t.Errorf("after a move that did not hold: %v; want %v", got, want)
		}
		if got := p.rankDelay(); !near(got, want) {
			t.Errorf("keep starting over on TURN: %v; want still %v", got, want)
		}
		want = min(2*want, rankMaxWait)
	}
	p.rankedAt = time.Now().Add(-2 * rankEvery) // a move that held
	if got := p.rankDelay(); got != rankFirst {
		t.Errorf("after a move that held: %v; want %v", got, rankFirst)
	}
}

// TestRelayClaimsAreBounded: a hostile relay's answer claims a round trip
// to the far end; the largest it can send counts as rankMaxRTT, and does
// not wrap around into one that beats TURN.
func TestRelayClaimsAreBounded(t *testing.T) {
	for _, far := range []uint64{math.MaxUint64, math.MaxInt64, 1 << 63, uint64(rankMaxRTT/time.Microsecond) + 1} {
		if got := viaRTT(time.Millisecond, far); got != time.Millisecond+rankMaxRTT {
			t.Errorf("viaRTT(1ms, %d) = %v; want %v", far, got, time.Millisecond+rankMaxRTT)
		}
		if beats(viaRTT(time.Millisecond, far), 40*time.Millisecond) {
			t.Errorf("a claim of %d µs beats a TURN path of 40 ms", far)
		}
	}
	if got := viaRTT(time.Millisecond, 500); got != 1500*time.Microsecond {
		t.Errorf("viaRTT(1ms, 500) = %v; want 1.5ms", got)
	}
}

// TestPeerRelayGoesAway: the relay carrying a live transfer stops; the
// connection moves to the other relay within the path-loss time, and the
// transfer completes with every byte right.
func TestPeerRelayGoesAway(t *testing.T) {
	s := newRelayScene(t, 2, nil)
	echo := halfCloseEcho(t)
	roundTrip(t, s.a.m, 1, echo, 64<<10)
	first := waitPath(t, s.a.m, 1, PathPeerRelayed).Via
	echoAcross(t, s.a.m, 1, echo, 60*time.Second, "the relay's end", func() {
		for _, r := range s.relays {
			if "peer "+strconv.Itoa(r.info.PID) == first {
				r.stop()
			}
		}
	})
	if ps := peerStats(s.a.m, 1); ps.Path != PathPeerRelayed || ps.Via == first {
		t.Errorf("after %s stopped: stats %+v; want relayed via the other", first, ps)
	}
}

// TestPeerRelayOff: a relay started with peer relay off refuses sessions,
// and the pair stays unconnected.
func TestPeerRelayOff(t *testing.T) {
	s := newRelayScene(t, 0, nil)
	r := startPartyWith(t, 2, nil, allowAll, func(o *Options) { o.NoPeerRelay = true })
	introduce(s.a, s.b, r)
	testkit.Eventually(t, "a refused session", func() bool { return r.m.Stats().PeerRelay.Refused > 0 })
	if ps := peerStats(s.a.m, 1); ps.State.Connected() {
		t.Errorf("stats %+v; want no connection with the relay off", ps)
	}
}

// TestHostileRelayMember: a member with a valid key, connected to the
// relay, cannot use it against others: datagrams with a session id that
// is not its own (even a live one) are dropped and reach nobody; it
// cannot ask for a session to itself or to the relay, nor one its target
// would not dial; its offers of sessions are taken at most relaySessions
// times, and never for itself or a stranger.
func TestHostileRelayMember(t *testing.T) {
	s := newRelayScene(t, 0, nil)
	// The relay is party 5; the hostile member, party 4, dials it.
	r := startPartyWith(t, 5, nil, allowAll, func(o *Options) { o.RelayDelay = 300 * time.Millisecond })
	introduce(s.a, s.b, r)
	echo := halfCloseEcho(t)
	roundTrip(t, s.a.m, 1, echo, 64<<10)
	waitPath(t, s.a.m, 1, PathPeerRelayed)
	h := newHostilePeer(t, 4, r)
	infos := []PeerInfo{s.a.info, s.b.info, r.info, h.info}
	for _, p := range []*testParty{s.a, s.b, r} {
		p.m.SetPeers(infos)
	}
	testkit.Eventually(t, "party 4 known", func() bool { return peerOf(r.m, 4) != nil && peerOf(s.b.m, 4) != nil })
	qc := h.dial()
	testkit.Eventually(t, "party 4 connected to the relay", func() bool { return r.m.relayable(4) != nil })

	// A live session's id, as if it had leaked.
	r.m.prelay.mu.Lock()
	var live sessionID
	for id := range r.m.prelay.relayed {
		live = id
	}
	r.m.prelay.mu.Unlock()
	before := r.m.Stats().PeerRelay
	for i := range 200 {
		id := live
		if i%2 == 0 {
			id = newSessionID()
		}
		d := append(append([]byte{dgRelay}, id[:]...), pieceWhole, 0, 0)
		qc.SendDatagram(append(d, bytes.Repeat([]byte{0xee}, 1000)...))
	}
	testkit.Eventually(t, "the forged datagrams dropped", func() bool {
		return r.m.Stats().PeerRelay.Dropped >= before.Dropped+150
	})
	roundTrip(t, s.a.m, 1, echo, 256<<10) // the live session is unharmed
	// The same as raw packets from party 4's own socket, to the relay and
	// to both ends: dropped, none taken, none forwarded.
	before, beforeA, beforeB := r.m.Stats().PeerRelay, s.a.m.Stats().PeerRelay, s.b.m.Stats().PeerRelay
	for range 100 {
		d := append(append([]byte{rawHeard}, live[:]...), pieceWhole, 0, 0)
		d = append(d, bytes.Repeat([]byte{0xee}, 1000)...)
		for _, to := range []*testParty{r, s.a, s.b} {
			h.tr.WriteTo(d, net.UDPAddrFromAddrPort(to.m.LocalAddr()))
		}
		time.Sleep(time.Millisecond) // quic-go queues 32 non-QUIC packets
	}
	testkit.Eventually(t, "the forged raw packets dropped", func() bool {
		return r.m.Stats().PeerRelay.Dropped >= before.Dropped+100 && s.a.m.Stats().PeerRelay.Dropped >= beforeA.Dropped+100 &&
			s.b.m.Stats().PeerRelay.Dropped >= beforeB.Dropped+100
	})
	roundTrip(t, s.a.m, 1, echo, 256<<10)

	ask := func(kind header.Kind, pid int) header.Status {
		ctx := ctxTimeout(t, 15*time.Second)
		str, rep, err := openStream(ctx, qc, newSessionID().request(kind, pid))
		if err != nil {
			t.Fatalf("hostile request: %v", err)
		}
		if str != nil {
			endStream(str)
		}
		return rep.Status
	}
	if st := ask(header.KindRelay, 4); st != header.StatusBadRequest {
		t.Errorf("a session to itself: %v; want bad request", st)
	}
	if st := ask(header.KindRelay, 5); st != header.StatusBadRequest {
		t.Errorf("a session to the relay: %v; want bad request", st)
	}
	// Party 4 asks the relay for a session to party 1, which refuses it:
	// party 4 does not dial party 1 (a higher pid).
	if st := ask(header.KindRelay, 1); st != header.StatusRefused {
		t.Errorf("a session to a party it does not dial: %v; want refused", st)
	}
	// Offers from party 4 to the relay (as if party 4 relayed) of sessions
	// with party 0: taken, up to pairSessions; and party 0's own sessions
	// through an honest relay are still taken (the slots are per relay).
	ok := 0
	for range pairSessions + 3 {
		if ask(header.KindRelayOffer, 0) == header.StatusOK {
			ok++
		}
	}
	if ok != pairSessions {
		t.Errorf("%d offers taken; want at most %d", ok, pairSessions)
	}
	if _, err := r.m.newSessionEnd(newSessionID(), 1, 0); err != nil {
		t.Errorf("a session with party 0 through party 1, after party 4's offers: %v", err)
	}
	// Offers for itself, or for a party not in the study.
	for _, pid := range []int{4, 9} {
		if st := ask(header.KindRelayOffer, pid); st != header.StatusBadRequest {
			t.Errorf("an offer for party %d: %v; want bad request", pid, st)
		}
	}
	roundTrip(t, s.a.m, 1, echo, 256<<10)

	// Routes of two relays. Party 4 cannot be the first hop of a route
	// for another party (its origin must be itself), nor ask the relay to
	// go on past a second relay.
	askVia := func(to int, route header.Route) (sessionID, header.Status) {
		id := newSessionID()
		str, rep, err := openStream(ctxTimeout(t, 15*time.Second), qc, id.request(header.KindRelayVia, to), route.Append(nil)...)
		if err != nil {
			t.Fatalf("hostile route request: %v", err)
		}
		if str != nil {
			endStream(str)
		}
		return id, rep.Status
	}
	if _, st := askVia(1, header.Route{Next: 2, Origin: 0}); st != header.StatusBadRequest {
		t.Errorf("a first hop for party 0 asked by party 4: %v; want bad request", st)
	}
	if _, st := askVia(1, header.Route{Next: 2, Origin: 4}); st == header.StatusOK {
		t.Errorf("a route of three relays: %v; want it refused", st)
	}
	// As the last hop, claiming to relay for party 0: party 1 takes no
	// such session without party 0's proof, so party 4 spends none of
	// party 0's sessions there; junk with that id reaches nobody, and
	// party 0's own path is unharmed.
	before1 := peerStats(s.b.m, 0)
	refusedBefore := s.b.m.Stats().PeerRelay.Refused
	id, st := askVia(1, header.Route{Next: 1, Origin: 0, MAC: [16]byte{1, 2, 3}})
	if st == header.StatusOK {
		t.Errorf("a session claimed for party 0 with no proof: taken")
	}
	if s.b.m.Stats().PeerRelay.Refused == refusedBefore {
		t.Errorf("party 1 did not count the refusal of the claimed session")
	}
	for range 50 {
		d := append(append([]byte{dgRelay}, id[:]...), pieceWhole, 0, 0)
		qc.SendDatagram(append(d, bytes.Repeat([]byte{0xc3}, 1200)...))
	}
	time.Sleep(time.Second)
	if after := peerStats(s.b.m, 0); after.Via != before1.Via || after.Repairs != before1.Repairs {
		t.Errorf("party 1's path to party 0 moved after party 4's claimed session: %+v, was %+v", after, before1)
	}
	roundTrip(t, s.a.m, 1, echo, 256<<10)
}

// TestRelayedPieces: a packet too large for the outer connection's
// datagrams goes as two pieces, joined again at the far end; pieces of
// other packets, and lone pieces, do not join.
func TestRelayedPieces(t *testing.T) {
	e := &sessionEnd{m: &Mux{}, in: make(chan []byte, 4), partials: map[uint16]*partial{}, closed: make(chan struct{})}
	hdr := func(piece byte, seq uint16) []byte {
		return append(append([]byte{dgRelay}, make([]byte, 16)...), piece, byte(seq>>8), byte(seq))
	}
	e.take(append(hdr(pieceSecond, 7), "world"...))
	e.take(append(hdr(pieceFirst, 8), "other"...))
	e.take(append(hdr(pieceFirst, 7), "hello "...))
	e.take(append(hdr(pieceWhole, 0), "whole"...))
	for _, want := range []string{"hello world", "whole"} {
		select {
		case got := <-e.in:
			if string(got) != want {
				t.Errorf("got %q; want %q", got, want)
			}
		default:
			t.Fatalf("no packet; want %q", want)
		}
	}
	if len(e.in) != 0 {
		t.Errorf("%d packets more; want none", len(e.in))
	}
}

// datagramConn is a hostile relay's end of a session it offered: inner
// packets as relayed datagrams on its own connection qc.
type datagramConn struct {
	qc       *quic.Conn
	id       sessionID
	ctx      context.Context
	cancel   context.CancelFunc
	seq      uint16
	partials map[uint16][]byte // first pieces (the relay sends them in order)
}

func (d *datagramConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		p, err := d.qc.ReceiveDatagram(d.ctx)
		if err != nil {
			return 0, nil, err
		}
		if len(p) < relayHeaderLen || p[0] != dgRelay || sessionID(p[1:17]) != d.id {
			continue
		}
		if p[17] == pieceWhole {
			return copy(b, p[relayHeaderLen:]), relayAddr{}, nil
		}
		seq := binary.BigEndian.Uint16(p[18:20])
		if first, ok := d.partials[seq]; ok && p[17] == pieceSecond {
			return copy(b, append(first, p[relayHeaderLen:]...)), relayAddr{}, nil
		}
		d.partials[seq] = p[relayHeaderLen:]
	}
}

func (d *datagramConn) WriteTo(b []byte, _ net.Addr) (int, error) {
	h := append(append([]byte{dgRelay}, d.id[:]...), pieceWhole, 0, 0)
	d.seq++
	return len(b), sendRelayed(d.qc, append(h, b...), func() uint16 { return d.seq })
}

func (d *datagramConn) Close() error                { d.cancel(); return nil }
func (d *datagramConn) LocalAddr() net.Addr         { return relayAddr{} }
func (d *datagramConn) SetDeadline(time.Time) error { return nil }
func (d *datagramConn) SetReadDeadline(t time.Time) error {
	if !t.IsZero() && !t.After(time.Now()) {
		d.cancel() // the transport closes
	}
	return nil
}
func (d *datagramConn) SetWriteDeadline(time.Time) error { return nil }

// TestHostileRelayCannotPivot: a member that offers the target a session
// "with party 0" and then, as its relay, handshakes through it, gets no
// connection: not as itself (the session is party 0's), not as party 0
// (it does not hold party 0's key).
func TestHostileRelayCannotPivot(t *testing.T) {
	x := startParty(t, 0, nil, allowAll)
	r := startParty(t, 5, nil, allowAll)
	h := newHostilePeer(t, 4, r)
	infos := []PeerInfo{x.info, r.info, h.info}
	x.m.SetPeers(infos)
	r.m.SetPeers(infos)
	testkit.Eventually(t, "party 4 known", func() bool { return peerOf(r.m, 4) != nil })
	qc := h.dial()
	id := newSessionID()
	str, rep, err := openStream(ctxTimeout(t, 10*time.Second), qc, id.request(header.KindRelayOffer, 0))
	if err != nil || rep.Status != header.StatusOK {
		t.Fatalf("offer: %v %v", rep.Status, err)
	}
	endStream(str)
	dctx, dcancel := context.WithCancel(context.Background())
	tr := &quic.Transport{Conn: &datagramConn{qc: qc, id: id, ctx: dctx, cancel: dcancel, partials: map[uint16][]byte{}}}
	defer tr.Close()
	rejected := r.m.Stats().AcceptsRejected
	for _, as := range []int{4, 0} {
		cfg := &tls.Config{Certificates: []tls.Certificate{h.id.Cert}, NextProtos: []string{ALPN}, MinVersion: tls.VersionTLS13,
			InsecureSkipVerify: true, ServerName: handshakeName(as, 5)}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		inner, err := tr.Dial(ctx, relayAddr{}, cfg, QUICConfig(3*time.Second))
		cancel()
		t.Logf("as party %d: dial: %v", as, err)
		if err == nil {
			// The handshake may complete before the acceptor's check: then
			// the acceptor closes it at once, and it carries nothing.
			if _, _, err = openStream(ctxTimeout(t, 5*time.Second), inner, header.Request{Kind: header.KindPing}); err == nil {
				t.Fatalf("party 4 got a working connection through its own session, as party %d", as)
			}
		}
		for _, pid := range []int{0, 4} {
			if ps := peerStats(r.m, pid); ps.Path == PathPeerRelayed {
				t.Fatalf("as party %d: the target took the session's connection as party %d's: %+v", as, pid, ps)
			}
		}
	}
	if r.m.Stats().AcceptsRejected == rejected {
		t.Error("no handshake was rejected")
	}
}

// TestRelayLimits: a relay holds at most pairSessions for one pair and
// peerSessions for one peer, so that a member that fills its own pair's
// slots leaves the other pairs theirs.
func TestRelayLimits(t *testing.T) {
	var r peerRelays
	r.init(1 << 20)
	add := func(a, b int) bool {
		if r.fullLocked(a, b) {
			return false
		}
		r.relayed[newSessionID()] = &relaySession{a: a, b: b}
		return true
	}
	for i := range pairSessions {
		if !add(4, 1) {
			t.Fatalf("session %d of pair 4–1 refused", i)
		}
	}
	if add(4, 1) || add(1, 4) {
		t.Fatal("a session past pairSessions taken")
	}
	if !add(0, 1) {
		t.Fatal("another pair's session with party 1 refused: party 4 took its slots")
	}
	n := pairSessions
	for b := 10; n < peerSessions; b++ {
		for range pairSessions {
			if n < peerSessions && add(4, b) {
				n++
			}
		}
	}
	if add(4, 99) {
		t.Fatalf("party 4 holds more than %d sessions", peerSessions)
	}
}

// TestPeerRelayTwoHops: party 0 reaches only party 2, party 1 only party
// 3, and parties 2 and 3 reach each other: no single member reaches both
// 0 and 1, so 0 reaches 1 through a route of two relays, 2 then 3, both
// ways, every byte right; each relay counts its hop.
func TestPeerRelayTwoHops(t *testing.T) {
	short := func(o *Options) { o.RelayDelay = 300 * time.Millisecond }
	var fa, fb *testkit.FilterConn
	a := startPartyConf(t, 0, partyConf{allow: allowAll, adjust: short, pc: func() *testkit.FilterConn {
		fa = testkit.NewFilterConn(listenLoopback(t))
		return fa
	}()})
	b := startPartyConf(t, 1, partyConf{allow: allowAll, adjust: short, pc: func() *testkit.FilterConn {
		fb = testkit.NewFilterConn(listenLoopback(t))
		return fb
	}()})
	r1 := startPartyWith(t, 2, nil, allowAll, short)
	r2 := startPartyWith(t, 3, nil, allowAll, short)
	fa.Drop(b.m.LocalAddr(), true)
	fa.Drop(r2.m.LocalAddr(), true)
	fb.Drop(r1.m.LocalAddr(), true)
	introduce(a, b, r1, r2)
	ps := waitPath(t, a.m, 1, PathPeerRelayed)
	if ps.Via != "peer 2 → peer 3" {
		t.Errorf("dialer's stats = %+v; want relayed via peer 2 → peer 3", ps)
	}
	echo := halfCloseEcho(t)
	roundTrip(t, a.m, 1, echo, 1<<20)
	roundTrip(t, b.m, 0, echo, 1<<20)
	if ps := waitPath(t, b.m, 0, PathPeerRelayed); ps.Via != "peer 3" {
		t.Errorf("acceptor's stats = %+v; want relayed via peer 3 (its own hop)", ps)
	}
	for _, r := range []*testParty{r1, r2} {
		var carried uint64
		for _, s := range r.m.Stats().PeerRelay.Relaying {
			if s.BytesAB+s.BytesBA >= 2<<20 {
				carried = s.BytesAB + s.BytesBA
			}
		}
		if carried == 0 {
			t.Errorf("relay %d's stats = %+v; want a session carrying the 4 MiB", r.info.PID, r.m.Stats().PeerRelay)
		}
	}
}

// TestRoutesAreBounded: a relay refuses a route request that is not the
// first or the last hop of a route of two relays ending at its far end:
// one that came from a relay and asks to go on (three relays or more), and
// one whose origin is the relay itself.
func TestRoutesAreBounded(t *testing.T) {
	s := newRelayScene(t, 1, nil)
	roundTrip(t, s.a.m, 1, halfCloseEcho(t), 1024) // the relay is connected to both
	r := s.relays[0]
	l := s.a.m.relayable(2)
	if l == nil {
		t.Fatal("party 0 has no connection to the relay of its own")
	}
	for _, tc := range []struct {
		name  string
		route header.Route
	}{
		{"a middle hop asked to go on", header.Route{Next: 1, Origin: 1}},
		{"origin not the asker, next not the far end", header.Route{Next: 3, Origin: 5}},
		{"origin the relay", header.Route{Next: 1, Origin: 2}},
		{"next the asker", header.Route{Next: 0, Origin: 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := newSessionID()
			_, rep, err := openStream(ctxTimeout(t, 10*time.Second), l.conn, id.request(header.KindRelayVia, 1), tc.route.Append(nil)...)
			if err == nil && rep.Status == header.StatusOK {
				t.Errorf("route %+v to party 1 was taken", tc.route)
			}
		})
	}
	if rs := r.m.Stats().PeerRelay; rs.Sessions != 1 {
		t.Errorf("relay sessions = %d; want only the first one", rs.Sessions)
	}
}
