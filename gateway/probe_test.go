package gateway

import (
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"sfkit-proxy/internal/testkit"
)

func freeUDP(t *testing.T) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

// TestProbes: a probe answers its requester with the token, over TCP and
// UDP, and Check says reachable; someone else gets nothing and Check says
// why; a wrong token is told apart; probes end when removed and when their
// time is up; what Open refuses, it refuses with the reason.
func TestProbes(t *testing.T) {
	ps := NewProbes(false)
	t.Cleanup(ps.Close)
	me := []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	other := []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}
	tcp, udp, stranger := freeAddr(t), freeUDP(t), freeAddr(t)
	for _, s := range []ProbeSpec{
		{Proto: "tcp", Listen: tcp, Requester: me, Token: "tok-tcp"},
		{Proto: "udp", Listen: udp, Requester: me, Token: "tok-udp"},
		{Proto: "tcp", Listen: stranger, Requester: other, Token: "tok-other"},
	} {
		if _, err := ps.Open(s); err != nil {
			t.Fatalf("Open(%+v) = %v", s, err)
		}
	}
	if err := Check("tcp", tcp, "tok-tcp", 5*time.Second); err != nil {
		t.Errorf("tcp probe, its requester: %v", err)
	}
	if err := Check("udp", udp, "tok-udp", 5*time.Second); err != nil {
		t.Errorf("udp probe, its requester: %v", err)
	}
	if err := Check("tcp", tcp, "not-it", 5*time.Second); err == nil || !strings.Contains(err.Error(), "not the token") {
		t.Errorf("tcp probe, a wrong token: %v; want 'not the token'", err)
	}
	if err := Check("tcp", stranger, "tok-other", 5*time.Second); err == nil || !strings.Contains(err.Error(), "no token") {
		t.Errorf("a probe for someone else: %v; want 'no token'", err)
	}
	var answered, ignored uint64
	for _, p := range ps.List() {
		answered += p.Answered
		ignored += p.Ignored
	}
	if answered != 3 || ignored != 1 {
		t.Errorf("probes answered %d and ignored %d; want 3 and 1", answered, ignored)
	}
	if err := ps.Remove("tcp", tcp); err != nil {
		t.Fatal(err)
	}
	if err := Check("tcp", tcp, "tok-tcp", time.Second); err == nil || !strings.Contains(err.Error(), "not reachable") {
		t.Errorf("a removed probe: %v; want not reachable", err)
	}
	short := freeAddr(t)
	if _, err := ps.Open(ProbeSpec{Proto: "tcp", Listen: short, Requester: me, Token: "t", TTL: 200 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "the probe's time up", func() bool {
		return Check("tcp", short, "t", time.Second) != nil
	})
	free := freeAddr(t)
	for _, c := range []struct {
		spec ProbeSpec
		want error
	}{
		{ProbeSpec{Proto: "sctp", Listen: free, Requester: me, Token: "t"}, ErrBadSpec},
		{ProbeSpec{Proto: "tcp", Listen: free, Requester: me, Token: "has space"}, ErrBadSpec},
		{ProbeSpec{Proto: "tcp", Listen: free, Token: "t"}, ErrBadSpec},
		{ProbeSpec{Proto: "tcp", Listen: free, Requester: me, Token: "t", TTL: time.Hour}, ErrBadSpec},
		{ProbeSpec{Proto: "tcp", Listen: netip.MustParseAddrPort("203.0.113.5:9"), Requester: me, Token: "t"}, ErrNoConsent},
		{ProbeSpec{Proto: "udp", Listen: udp, Requester: me, Token: "t"}, ErrExists},
	} {
		if _, err := ps.Open(c.spec); !errors.Is(err, c.want) {
			t.Errorf("Open(%+v) = %v; want %v", c.spec, err, c.want)
		}
	}
	for i := len(ps.List()); i < MaxProbes; i++ {
		if _, err := ps.Open(ProbeSpec{Proto: "tcp", Listen: freeAddr(t), Requester: me, Token: "t"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ps.Open(ProbeSpec{Proto: "tcp", Listen: freeAddr(t), Requester: me, Token: "t"}); !errors.Is(err, ErrTooMany) {
		t.Errorf("probe %d = %v; want ErrTooMany", MaxProbes+1, err)
	}
}
