package quicmux

import (
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"sfkit-proxy/identity"
	"sfkit-proxy/stun"
)

// TestAnsweredChecksDoNotAmplify: a member with a valid key publishes its
// own socket and fifteen addresses of others (third parties it would have
// our sidecar flood), then answers every connectivity check at once. Each
// answer may speed up the next round of checks, but rounds go out at most
// twice per check interval, so each third party receives a few checks a
// second, not one per answer.
func TestAnsweredChecksDoNotAmplify(t *testing.T) {
	target := startParty(t, 1, nil, func(uint16) bool { return false }) // the higher pid: it only checks, never dials
	hostile, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer hostile.Close()
	key := identity.NewCheckKey()
	pairKey, err := key.PairKey("test", 0, 1, target.info.CheckKey)
	if err != nil {
		t.Fatal(err)
	}
	var answers atomic.Int64
	go func() { // answers every check, as fast as they come
		b := make([]byte, 1500)
		for {
			n, from, err := hostile.ReadFromUDPAddrPort(b)
			if err != nil {
				return
			}
			if !stun.Is(b[:n]) {
				continue
			}
			if m, err := stun.Parse(b[:n]); err == nil {
				if resp := stun.Answer(m, from, pairKey); resp != nil {
					hostile.WriteToUDPAddrPort(resp, from)
					answers.Add(1)
				}
			}
		}
	}()
	cands := []netip.AddrPort{hostile.LocalAddr().(*net.UDPAddr).AddrPort()}
	var received atomic.Int64
	for range 15 {
		sink, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer sink.Close()
		cands = append(cands, sink.LocalAddr().(*net.UDPAddr).AddrPort())
		go func() {
			b := make([]byte, 1500)
			for {
				if _, _, err := sink.ReadFromUDPAddrPort(b); err != nil {
					return
				}
				received.Add(1)
			}
		}()
	}
	id, err := identity.Load(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	target.m.SetPeers([]PeerInfo{target.info, {PID: 0, Pin: id.Pin, CheckKey: key.Public(), Instance: identity.NewInstance(), Candidates: cands}})

	const window = 2 * time.Second
	time.Sleep(window)
	interval := 50 * time.Millisecond // startParty's CheckInterval
	// At most two rounds per interval, and a round or two of slack.
	bound := int64(15 * (2*window/interval + 2))
	got, ans := received.Load(), answers.Load()
	t.Logf("in %v: %d checks answered by the member, %d checks at the 15 others (bound %d)", window, ans, got, bound)
	if ans < int64(window/interval) {
		t.Fatalf("the member answered only %d checks in %v: the test did not test answers", ans, window)
	}
	if got > bound {
		t.Errorf("the 15 third parties got %d checks in %v, more than %d: answers make rounds faster than the check interval allows", got, window, bound)
	}
}
