package quicmux

import (
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
