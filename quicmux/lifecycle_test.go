package quicmux

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"sfkit-proxy/identity"
	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/status"
)

func udpLoopback(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// closed reports whether c was closed.
func closed(c net.PacketConn) bool {
	_, err := c.WriteTo([]byte{0}, c.LocalAddr())
	return errors.Is(err, net.ErrClosed)
}

// TestNewOwnsItsSockets: New takes the main socket and the relay's; when
// it fails it closes both, and Close closes them whether or not Run ran.
func TestNewOwnsItsSockets(t *testing.T) {
	id, err := identity.Load(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{Study: "s", PID: 0, Identity: id, CheckKey: identity.NewCheckKey()}

	pc, rc := udpLoopback(t), udpLoopback(t)
	if _, err := New(pc, &Relay{Conn: rc}, Options{}); err == nil {
		t.Fatal("New without an identity succeeded")
	}
	if !closed(pc) || !closed(rc) {
		t.Errorf("a failed New left its sockets open (main closed %v, relay closed %v)", closed(pc), closed(rc))
	}

	pc, rc = udpLoopback(t), udpLoopback(t)
	m, err := New(pc, &Relay{Conn: rc}, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Errorf("Close of a Mux never run = %v", err)
	}
	if !closed(pc) || !closed(rc) {
		t.Error("Close of a Mux never run left its sockets open")
	}
	if err := m.Close(); err != nil {
		t.Errorf("a second Close = %v", err)
	}
	if err := m.Run(context.Background()); err == nil {
		t.Error("Run after Close succeeded")
	}
}

// TestCloseEndsRun: Close makes Run end with net.ErrClosed, closing the
// socket; a second Close returns at once.
func TestCloseEndsRun(t *testing.T) {
	id, err := identity.Load(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	pc := udpLoopback(t)
	m, err := New(pc, nil, Options{Study: "s", PID: 0, Identity: id, CheckKey: identity.NewCheckKey()})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- m.Run(context.Background()) }()
	time.Sleep(50 * time.Millisecond)
	m.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Run after Close = %v; want net.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not end after Close")
	}
	if !closed(pc) {
		t.Error("the socket is open after Run ended")
	}
	m.Close()
}

// TestSocketInfo: status tells what the kernel gave the shared UDP socket
// once quic-go asked for its buffers.
func TestSocketInfo(t *testing.T) {
	id, err := identity.Load(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(udpLoopback(t), nil, Options{Study: "s", PID: 0, Identity: id, CheckKey: identity.NewCheckKey()})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	s := m.Stats().Socket
	// quic-go asks for 7 MiB; the kernel grants at least its default.
	if s.ReadBuffer < 64<<10 || s.WriteBuffer < 64<<10 {
		t.Errorf("socket buffers read %d, write %d; want what the kernel granted (64 KiB or more)", s.ReadBuffer, s.WriteBuffer)
	}
	t.Logf("read buffer %d, write buffer %d, GSO %v", s.ReadBuffer, s.WriteBuffer, s.GSO)
	if socketInfo(testkit.NewFilterConn(udpLoopback(t))) != (status.Socket{}) {
		t.Error("a PacketConn that is not a socket reported socket buffers")
	}
}
