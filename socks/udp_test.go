package socks

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"sfkit-proxy/splice"
	"sync"
	"testing"
	"time"
)

// upperAssoc is a tunnel that answers each datagram at once, upper-cased,
// from the destination it went to; it records what it was sent.
type upperAssoc struct {
	recv func(pid int, port uint16, data []byte)

	mu     sync.Mutex
	sent   []string
	closed bool
}

func (a *upperAssoc) Send(pid int, port uint16, data []byte) error {
	a.mu.Lock()
	a.sent = append(a.sent, string(data))
	a.mu.Unlock()
	a.recv(pid, port, bytes.ToUpper(data))
	return nil
}

func (a *upperAssoc) Close() {
	a.mu.Lock()
	a.closed = true
	a.mu.Unlock()
}

// associate performs a UDP ASSOCIATE and returns the control connection
// and the relay's address.
func associate(t *testing.T, proxy string) (net.Conn, *net.UDPAddr) {
	t.Helper()
	c := greet(t, proxy)
	c.Write([]byte{5, 3, 0, 1, 0, 0, 0, 0, 0, 0})
	var rep [10]byte
	if _, err := io.ReadFull(c, rep[:]); err != nil {
		t.Fatalf("UDP ASSOCIATE reply: %v", err)
	}
	if rep[1] != 0 || rep[3] != 1 {
		t.Fatalf("UDP ASSOCIATE reply %v; want success with an IPv4 address", rep)
	}
	return c, &net.UDPAddr{IP: net.IP(rep[4:8]), Port: int(binary.BigEndian.Uint16(rep[8:10]))}
}

// udpRequest is an RFC 1928 §7 datagram to ip:port.
func udpRequest(ip netip.Addr, port uint16, data string) []byte {
	a := ip.As4()
	b := append([]byte{0, 0, 0, 1}, a[:]...)
	return append(binary.BigEndian.AppendUint16(b, port), data...)
}

func TestUDPAssociate(t *testing.T) {
	var mu sync.Mutex
	var assocs []*upperAssoc
	proxy := startServer(t, Options{
		Peers: netip.MustParsePrefix("10.0.0.0/24"), Self: 0,
		DialPeer:   noDial,
		PeerAllows: func(pid int, port uint16) bool { return port != 7 },
		UDP: func(recv func(int, uint16, []byte)) (UDPAssoc, error) {
			a := &upperAssoc{recv: recv}
			mu.Lock()
			assocs = append(assocs, a)
			mu.Unlock()
			return a, nil
		},
	})
	ctl, relay := associate(t, proxy)
	uc, err := net.DialUDP("udp", nil, relay)
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	uc.SetDeadline(time.Now().Add(10 * time.Second))
	peer := netip.MustParseAddr("10.0.0.2")
	for _, tc := range []struct {
		name string
		b    []byte
		want []byte // the answer; nil: none
	}{
		{"to a peer", udpRequest(peer, 9000, "hello"), udpRequest(peer, 9000, "HELLO")},
		{"a fragment", append([]byte{0, 0, 1}, udpRequest(peer, 9000, "frag")[3:]...), nil},
		{"outside the peers", udpRequest(netip.MustParseAddr("192.0.2.1"), 53, "dns"), nil},
		{"a port the peer does not allow", udpRequest(peer, 7, "seven"), nil},
		{"short", []byte{0, 0, 0, 1, 10}, nil},
		{"by name", append(binary.BigEndian.AppendUint16(append([]byte{0, 0, 0, 3, 8}, "10.0.0.3"...), 53), "q"...),
			append(binary.BigEndian.AppendUint16(append([]byte{0, 0, 0, 3, 8}, "10.0.0.3"...), 53), "Q"...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := uc.Write(tc.b); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 2048)
			uc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			n, err := uc.Read(buf)
			switch {
			case tc.want == nil && err == nil:
				t.Errorf("got %q; want no answer", buf[:n])
			case tc.want != nil && !bytes.Equal(buf[:n], tc.want):
				t.Errorf("got %q, %v; want %q", buf[:n], err, tc.want)
			}
		})
	}
	mu.Lock()
	a := assocs[0]
	mu.Unlock()
	a.mu.Lock()
	sent := append([]string(nil), a.sent...)
	a.mu.Unlock()
	if len(sent) != 2 || sent[0] != "hello" || sent[1] != "q" {
		t.Errorf("the tunnel was sent %q; want hello and q only", sent)
	}

	// Only the client's own source: another socket on the same host is
	// not the client once it has sent.
	other, err := net.DialUDP("udp", nil, relay)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	other.Write(udpRequest(peer, 9000, "intruder"))
	other.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := other.Read(make([]byte, 64)); err == nil {
		t.Errorf("a second source got an answer of %d bytes", n)
	}

	// The association ends with its TCP connection.
	ctl.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		a.mu.Lock()
		closed := a.closed
		a.mu.Unlock()
		if closed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the association outlived its TCP connection")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestUDPAssociateNotServed(t *testing.T) {
	proxy := startServer(t, Options{Peers: netip.MustParsePrefix("10.0.0.0/24"), DialPeer: noDial})
	c, err := net.Dial("tcp", proxy)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write([]byte{5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0})
	var b [12]byte
	if _, err := io.ReadFull(c, b[:]); err != nil || b[3] != repNotSupported {
		t.Errorf("reply %v, %v; want command not supported", b, err)
	}
}

func noDial(_ context.Context, _ int, _ uint16) (splice.Conn, error) {
	return nil, errors.New("no tunnel in this test")
}

func TestParseUDPHeader(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    []byte
		host string
		port uint16
		err  error
	}{
		{"ipv4", udpRequest(netip.MustParseAddr("10.0.0.1"), 80, "x"), "10.0.0.1", 80, nil},
		{"name", append([]byte{0, 0, 0, 3, 1, 'a'}, 0, 9), "a", 9, nil},
		{"ipv6", append(append([]byte{0, 0, 0, 4}, netip.MustParseAddr("::1").AsSlice()...), 0, 1), "::1", 1, nil},
		{"fragment", []byte{0, 0, 2, 1, 1, 2, 3, 4, 0, 1}, "", 0, errUDPFragment},
		{"short name", []byte{0, 0, 0, 3, 9, 'a'}, "", 0, errUDPShort},
		{"port 0", udpRequest(netip.MustParseAddr("10.0.0.1"), 0, ""), "", 0, errUDPPort},
		{"atyp", []byte{0, 0, 0, 9, 0, 0}, "", 0, errUDPAddrType},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host, port, _, err := parseUDPHeader(tc.b)
			if host != tc.host || port != tc.port || !errors.Is(err, tc.err) {
				t.Errorf("parseUDPHeader(%x) = %q, %d, %v; want %q, %d, %v", tc.b, host, port, err, tc.host, tc.port, tc.err)
			}
		})
	}
}

func FuzzParseUDPHeader(f *testing.F) {
	f.Add(udpRequest(netip.MustParseAddr("10.0.0.1"), 80, "x"))
	f.Add(append([]byte{0, 0, 0, 3, 1, 'a'}, 0, 9))
	f.Fuzz(func(t *testing.T, b []byte) {
		host, port, n, err := parseUDPHeader(b)
		if err == nil && (host == "" || port == 0 || n > len(b)) {
			t.Fatalf("parseUDPHeader(%x) = %q, %d, %d", b, host, port, n)
		}
	})
}
