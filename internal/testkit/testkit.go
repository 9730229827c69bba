// Package testkit holds what tests of several packages need: local TCP
// servers (TCP, and a UDP echo) that end with the test, and a log sink that is safe to read while
// it is written.
package testkit

import (
	"bytes"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// Serve serves each connection to ln with handle, which must close it,
// until the test ends.
func Serve(t testing.TB, ln net.Listener, handle func(net.Conn)) {
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
}

// Local listens on a free port of 127.0.0.1 and serves each connection
// with handle (which must close it) until the test ends; it returns the
// port.
func Local(t testing.TB, handle func(net.Conn)) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	Serve(t, ln, handle)
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

// Echo is a local server that sends back what it reads, as it reads it.
func Echo(t testing.TB) uint16 {
	return Local(t, func(c net.Conn) {
		defer c.Close()
		io.Copy(c, c)
	})
}

// UDPEcho is a local UDP server on a free port of 127.0.0.1 that sends
// each datagram back to its sender until the test ends; it returns the
// port.
func UDPEcho(t testing.TB) uint16 {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	pc.SetReadBuffer(4 << 20)
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			pc.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	return uint16(pc.LocalAddr().(*net.UDPAddr).Port)
}

// LogBuffer is a log sink whose text can be read while it is written.
type LogBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *LogBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *LogBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Eventually checks cond every 25 ms until it holds, and fails the test
// after 10 s, saying what it waited for.
func Eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for range 400 {
		if cond() {
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}
