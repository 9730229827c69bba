package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"sfkit-proxy/admin"
	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/status"
)

// socksUDP is a client's UDP association through a SOCKS5 proxy (RFC 1928
// §7), as Python's or socat's would be.
type socksUDP struct {
	ctl net.Conn
	uc  *net.UDPConn
}

func associateUDP(t *testing.T, proxy netip.AddrPort) *socksUDP {
	t.Helper()
	c, err := net.Dial("tcp", proxy.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte{5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0})
	var rep [12]byte
	if _, err := io.ReadFull(c, rep[:]); err != nil || rep[1] != 0 || rep[3] != 0 || rep[5] != 1 {
		t.Fatalf("UDP ASSOCIATE: %v, %v", rep, err)
	}
	c.SetDeadline(time.Time{})
	relay := netip.AddrPortFrom(netip.AddrFrom4([4]byte(rep[6:10])), binary.BigEndian.Uint16(rep[10:12]))
	uc, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(relay))
	if err != nil {
		t.Fatal(err)
	}
	uc.SetReadBuffer(4 << 20)
	t.Cleanup(func() { uc.Close() })
	return &socksUDP{ctl: c, uc: uc}
}

func (s *socksUDP) send(to netip.AddrPort, data []byte) {
	a := to.Addr().As4()
	b := append([]byte{0, 0, 0, 1}, a[:]...)
	s.uc.Write(append(binary.BigEndian.AppendUint16(b, to.Port()), data...))
}

// recv returns the next datagram's source and payload, or false after d.
func (s *socksUDP) recv(d time.Duration) (netip.AddrPort, []byte, bool) {
	buf := make([]byte, 2048)
	s.uc.SetReadDeadline(time.Now().Add(d))
	n, err := s.uc.Read(buf)
	if err != nil || n < 10 || buf[3] != 1 {
		return netip.AddrPort{}, nil, false
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), binary.BigEndian.Uint16(buf[8:10])), buf[10:n], true
}

// TestUDPThroughTheTunnel: a SOCKS5 UDP ASSOCIATE at party 0 to party 1's
// UDP echo carries 2,000 datagrams, each echo back from 10.0.0.1 to the
// association that sent it; party 1's UDP gateway carries its own
// programs' datagrams to party 0; and party 0 cannot reach, though party 1
// opens every port (--allow-ports all), party 1's QUIC socket, its UDP
// gateway or its SOCKS front's UDP association: each would speak as party
// 1, or as its local client.
func TestUDPThroughTheTunnel(t *testing.T) {
	l := newLab(t)
	echo := testkit.UDPEcho(t)
	s0, _ := l.party(0)
	s1, _ := l.party(1)
	far := netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), echo)

	a := associateUDP(t, s0.SOCKS)
	var up bool
	for range 100 { // until the path is up
		a.send(far, []byte("hello"))
		if from, b, ok := a.recv(200 * time.Millisecond); ok && from == far && string(b) == "hello" {
			up = true
			break
		}
	}
	if !up {
		t.Fatal("no echo through SOCKS UDP ASSOCIATE to 10.0.0.1")
	}
	for a.recvAll(100 * time.Millisecond) {
	}
	const n, batch = 2000, 50
	got, bytesSent := 0, 0
	for i := 0; i < n; i += batch {
		for j := i; j < i+batch; j++ {
			b := fmt.Appendf(nil, "datagram %05d", j)
			a.send(far, b)
			bytesSent += len(b)
		}
		for range batch {
			from, b, ok := a.recv(2 * time.Second)
			if !ok {
				break
			}
			if from != far || !bytes.HasPrefix(b, []byte("datagram ")) {
				t.Fatalf("got %q from %v; want one of ours from %v", b, from, far)
			}
			got++
		}
	}
	if got < n*9/10 {
		t.Errorf("%d of %d datagrams came back", got, n)
	}

	// Party 1's own sockets.
	api1 := &admin.Client{Addr: s1.Admin.String()}
	gw := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), freeUDPPort(t))
	var err error
	for range 100 { // until party 1 has party 0's published ports
		if _, err = api1.AddGateway(context.Background(), "udp", gw.String(), admin.GatewayRequest{PID: 0, Port: echo}); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("party 1's UDP gateway to party 0: %v", err)
	}
	own := associateUDP(t, s1.SOCKS)
	ownPort := uint16(own.uc.RemoteAddr().(*net.UDPAddr).Port)
	before := udpStatus(t, s1.Admin)
	for _, port := range []uint16{s1.UDP.Port(), gw.Port(), ownPort} {
		a.send(netip.AddrPortFrom(far.Addr(), port), []byte("\x00\x00\x00\x01\x7f\x00\x00\x01"+string([]byte{byte(echo >> 8), byte(echo)})+"pivot"))
	}
	if _, b, ok := a.recv(time.Second); ok {
		t.Errorf("party 0 got %q back from one of party 1's own sockets", b)
	}
	if _, b, ok := own.recv(200 * time.Millisecond); ok {
		t.Errorf("party 1's own association got %q: party 0 spoke as its client", b)
	}
	after := udpStatus(t, s1.Admin)
	if d := after.Dropped["not_allowed"] - before.Dropped["not_allowed"]; d != 3 || after.Served-before.Served != 0 {
		t.Errorf("party 1 refused %d datagrams to its own sockets and served %d; want 3 refused, none served", d, after.Served-before.Served)
	}

	// The gateway itself works, for party 1's own programs.
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(gw))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var answered bool
	for range 20 {
		c.Write([]byte("through the gateway"))
		c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		b := make([]byte, 64)
		if k, err := c.Read(b); err == nil && string(b[:k]) == "through the gateway" {
			answered = true
			break
		}
	}
	if !answered {
		t.Error("party 1's program got no echo through its UDP gateway to party 0")
	}
	st0 := udpStatus(t, s0.Admin)
	if st0.Sent < uint64(n) || st0.SentBytes < uint64(bytesSent) || st0.Received < uint64(got) {
		t.Errorf("party 0's UDP status %+v; want at least %d sent (%d bytes), %d received", st0, n, bytesSent, got)
	}
	if st0.Dropped["not_allowed"] == 0 {
		t.Errorf("party 0 was not told of party 1's refusals: %+v", st0)
	}
}

// recvAll drains one datagram; false when none came within d.
func (s *socksUDP) recvAll(d time.Duration) bool {
	_, _, ok := s.recv(d)
	return ok
}

func udpStatus(t *testing.T, api netip.AddrPort) status.UDP {
	t.Helper()
	st, err := (&admin.Client{Addr: api.String()}).Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st.UDP
}

func freeUDPPort(t *testing.T) uint16 {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	return uint16(pc.LocalAddr().(*net.UDPAddr).Port)
}
