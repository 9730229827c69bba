package gateway

import (
	"bytes"
	"fmt"
	"net"
	"testing"
	"time"

	"sfkit-proxy/dgram"
	"sfkit-proxy/internal/testkit"
)

// udpManager is a Manager whose UDP goes through a real dgram.Carrier
// that is party 1 itself: party 1's port P is 127.0.0.1:P here.
func udpManager(t *testing.T) *Manager {
	c := dgram.New(dgram.Options{Self: 1, Send: func(int, []byte) error { return fmt.Errorf("no tunnel in this test") }})
	t.Cleanup(c.Close)
	return manager(t, func(o *Options) {
		o.UDP = func(recv func(int, uint16, []byte)) (UDPAssoc, error) { return c.Open(recv) }
	})
}

// TestUDPGateway: 10,000 datagrams from two clients through a UDP gateway,
// each client's echoes back to it alone, the counts and bytes as sent.
func TestUDPGateway(t *testing.T) {
	m := udpManager(t)
	port := testkit.UDPEcho(t)
	ap := freeUDP(t)
	if _, err := m.Add(Spec{Proto: "udp", Listen: ap, PID: 1, Port: port}); err != nil {
		t.Fatal(err)
	}
	var clients [2]*net.UDPConn
	for i := range clients {
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(ap))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetReadBuffer(4 << 20)
		clients[i] = c
	}
	const n, batch = 5000, 50 // each; a batch's echoes are awaited before the next (loopback buffers are not unbounded)
	var sent, gotBytes uint64
	var got [2]int
	buf := make([]byte, 2048)
	for i := 0; i < n; i += batch {
		for k, c := range clients {
			for j := i; j < i+batch; j++ {
				b := fmt.Appendf(nil, "client %d datagram %05d", k, j)
				c.Write(b)
				sent += uint64(len(b))
			}
		}
		for k, c := range clients {
			prefix := fmt.Appendf(nil, "client %d ", k)
			c.SetReadDeadline(time.Now().Add(time.Second))
			for r := 0; r < batch; r++ {
				m, err := c.Read(buf)
				if err != nil {
					break
				}
				if !bytes.HasPrefix(buf[:m], prefix) {
					t.Fatalf("client %d got %q: another association's datagram", k, buf[:m])
				}
				got[k]++
				gotBytes += uint64(m)
			}
		}
	}
	if got[0]+got[1] < 2*n*9/10 {
		t.Fatalf("%d and %d of %d datagrams each came back", got[0], got[1], n)
	}
	g, err := m.Get("udp", ap)
	if err != nil {
		t.Fatal(err)
	}
	if g.Conns != 2 || g.Open != 2 || g.BytesToPeer > sent || g.BytesToPeer < gotBytes || g.BytesFromPeer < gotBytes {
		t.Errorf("gateway %+v; want 2 associations, %d bytes sent at most, at least %d back", g, sent, gotBytes)
	}
	var listed uint64
	for _, c := range g.Connections {
		listed += c.BytesFromPeer
	}
	if len(g.Connections) != 2 || listed != g.BytesFromPeer {
		t.Errorf("connections %+v; want the 2 clients, their bytes adding up to %d", g.Connections, g.BytesFromPeer)
	}
	if !m.Listens("udp", ap.Port()) || m.Listens("tcp", ap.Port()) {
		t.Errorf("Listens(udp, %d) = %v, Listens(tcp) = %v; want true, false", ap.Port(), m.Listens("udp", ap.Port()), m.Listens("tcp", ap.Port()))
	}
	if err := m.Remove("udp", ap, true); err != nil {
		t.Fatal(err)
	}
	clients[0].Write([]byte("after"))
	clients[0].SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := clients[0].Read(make([]byte, 64)); err == nil {
		t.Error("a removed UDP gateway still carries datagrams")
	}
}

// TestUDPGatewayLimits: past max_conns a new client address is refused,
// and an idle association ends, freeing its place.
func TestUDPGatewayLimits(t *testing.T) {
	m := udpManager(t)
	port := testkit.UDPEcho(t)
	ap := freeUDP(t)
	if _, err := m.Add(Spec{Proto: "udp", Listen: ap, PID: 1, Port: port, MaxConns: 1, IdleTimeout: 200 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	roundTrip := func(c *net.UDPConn) bool {
		c.Write([]byte("ping"))
		c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		_, err := c.Read(make([]byte, 64))
		return err == nil
	}
	a, _ := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(ap))
	b, _ := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(ap))
	defer a.Close()
	defer b.Close()
	if !roundTrip(a) {
		t.Fatal("the first client got no echo")
	}
	if roundTrip(b) {
		t.Fatal("a second client past max_conns 1 got an echo")
	}
	if g, _ := m.Get("udp", ap); g.Refused["max_conns"] == 0 {
		t.Errorf("refused %v; want max_conns counted", g.Refused)
	}
	time.Sleep(300 * time.Millisecond)
	m.Sample(time.Now())
	if g, _ := m.Get("udp", ap); g.Open != 0 {
		t.Fatalf("%d associations open after the idle timeout; want 0", g.Open)
	}
	if !roundTrip(b) {
		t.Error("after the idle one ended, the second client got no echo")
	}
}
