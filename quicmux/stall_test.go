package quicmux

import (
	"context"
	"encoding/binary"
	"net"
	"sync"
	"testing"
	"time"

	"sfkit-proxy/internal/testkit"
)

// TestNoStallAcrossPeers: while every packet to one peer is held (its
// path dies under a pool of connections, and not one of them can even
// finish closing), another peer's dials, pings and transfers go on, and
// status answers. Once the held packets go, the first peer's flows resume
// and complete.
func TestNoStallAcrossPeers(t *testing.T) {
	udp, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	network := testkit.NewFilterConn(udp)
	x := startPartyConf(t, 0, partyConf{allow: allowAll, pc: network, tune: func(tu *tuning) { tu.pathDeadAfter = 2 * time.Second }})
	y := startParty(t, 1, nil, allowAll)
	z := startParty(t, 2, nil, allowAll)
	introduce(x, y, z)
	echo := testkit.Echo(t)
	checkY := echoFlows(t, x.m, 1, echo, 3, 256<<10)
	testkit.Eventually(t, "a pool of 3 to party 1", func() bool { return len(poolShape(x.m, 1)) == 3 })
	roundTrip(t, x.m, 2, echo, 1000)

	release := make(chan struct{})
	var once sync.Once
	let := func() { once.Do(func() { close(release) }) }
	defer let()
	held := time.AfterFunc(10*time.Second, let)
	network.Stall(y.m.LocalAddr(), release)
	cut(y.m, 0) // party 1's end of the path dies
	testkit.Eventually(t, "party 0 sees the path to party 1 lost", func() bool {
		return peerStats(x.m, 1).State == StateRepairing
	})

	for range 3 {
		roundTrip(t, x.m, 2, echo, 256<<10)
	}
	if _, _, _, err := x.m.Ping(ctxTimeout(t, 5*time.Second), 2); err != nil {
		t.Errorf("ping party 2: %v", err)
	}
	if s := peerStats(x.m, 2); s.State != StateDirect {
		t.Errorf("party 2 is %v; want %v", s.State, StateDirect)
	}
	if !held.Stop() {
		t.Fatal("party 2's work waited until party 1's packets were let go")
	}
	let()
	checkY()
}

// TestStalledPathIsReplaced: the path's MTU shrinks under the packet size
// the connection found (every larger packet lost both ways, small ones
// passing, no ICMP). The stall watch notices, a full-size probe goes
// unanswered, the connection is dropped, and the transfer that was
// running completes on a new one whose packets fit.
func TestStalledPathIsReplaced(t *testing.T) {
	udp, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	network := testkit.NewFilterConn(udp)
	x := startPartyConf(t, 0, partyConf{allow: allowAll, pc: network})
	y := startParty(t, 1, nil, allowAll)
	introduce(x, y)
	echo := testkit.Echo(t)
	roundTrip(t, x.m, 1, echo, 1<<20) // the packet size grows to what loopback carries
	wait := honestTransfer(x.m, 1, echo, 32<<20)
	time.Sleep(100 * time.Millisecond)
	network.MaxSize(y.m.LocalAddr(), 1250) // an IPv4 MTU of 1278
	if err := wait(); err != nil {
		t.Fatalf("the transfer across the shrinking MTU: %v", err)
	}
	stalls := x.m.Stats().PathStalls + y.m.Stats().PathStalls
	if stalls == 0 {
		t.Error("the transfer completed, but no stalled path was noticed")
	}
	for _, ps := range []PeerStats{peerStats(x.m, 1), peerStats(y.m, 0)} {
		if ps.LastRepairReason != "stall" {
			t.Errorf("party %d's last repair: reason %q; want stall", ps.PID, ps.LastRepairReason)
		}
	}
	roundTrip(t, x.m, 1, echo, 1<<20) // and a new one, on the shrunk path
}

// TestMaxPacketSize: with MaxPacketSize set, no packet is larger, though
// the path would carry more (on loopback path MTU discovery reaches 1452
// bytes). The packets are seen at the far end, behind a filtering socket
// (on which quic-go itself discovers nothing and stays at 1200).
func TestMaxPacketSize(t *testing.T) {
	for _, tt := range []struct {
		max, wantMore, wantAtMost int
	}{{1300, 1200, 1300}, {0, 1300, 1452}} {
		udp, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		network := testkit.NewFilterConn(udp)
		x := startPartyConf(t, 0, partyConf{allow: allowAll, pc: network})
		y := startPartyWith(t, 1, nil, allowAll, func(o *Options) { o.MaxPacketSize = tt.max })
		introduce(x, y)
		echo := testkit.Echo(t)
		for range 20 {
			roundTrip(t, x.m, 1, echo, 256<<10)
		}
		if n := network.Largest(); n > tt.wantAtMost || n <= tt.wantMore {
			t.Errorf("MaxPacketSize %d: largest packet %d bytes; want more than %d, at most %d", tt.max, n, tt.wantMore, tt.wantAtMost)
		}
		// What party 1 sends on its own UDP socket, as its stats say:
		// fixed, or discovered up to a 1,500-byte MTU's worth.
		want := func(n int) bool { return n == tt.max }
		if tt.max == 0 {
			want = func(n int) bool { return n >= fullPacket && n <= 1452 }
		}
		testkit.Eventually(t, "packet size in party 1's stats", func() bool {
			st := y.m.Stats()
			return len(st.Peers) == 1 && want(st.Peers[0].PacketSize)
		})
	}
}

// TestProbesAreRateLimited: a member that floods the target with probes
// (9-byte datagrams the target answers full-size) gets at most
// echoesPerSec answers a second on a connection: its own connection is
// all it can aim them at, and they cost the target little.
func TestProbesAreRateLimited(t *testing.T) {
	x := startParty(t, 5, nil, allowAll)
	h := newHostilePeer(t, 4, x)
	x.m.SetPeers([]PeerInfo{x.info, h.info})
	testkit.Eventually(t, "party 4 known", func() bool { return peerOf(x.m, 4) != nil })
	qc := h.dial()
	start := time.Now()
	for i := range 2000 {
		qc.SendDatagram(binary.BigEndian.AppendUint64([]byte{dgProbe}, uint64(i)))
		if i%100 == 99 {
			time.Sleep(10 * time.Millisecond) // the sender's queue drains
		}
	}
	echoes := 0
	ctx := ctxTimeout(t, 3*time.Second)
	for {
		b, err := qc.ReceiveDatagram(ctx)
		if err != nil {
			break
		}
		if len(b) >= 9 && b[0] == dgEcho {
			echoes++
		}
	}
	secs := time.Since(start).Seconds()
	if limit := int(echoesPerSec * (secs + 1)); echoes == 0 || echoes > limit {
		t.Errorf("%d probes in %.1f s got %d echoes; want between 1 and %d", 2000, secs, echoes, limit)
	}
	if qc.Context().Err() != nil || peerStats(x.m, 4).State != StateDirect {
		t.Errorf("after the flood the member's connection is %v, the target says %v; want it kept", context.Cause(qc.Context()), peerStats(x.m, 4).State)
	}
}
