package socks

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"

	"sfkit-proxy/splice"
)

// BenchmarkConnect is a SOCKS5 greeting and CONNECT to a local server that
// sends one byte, through the server in this process.
func BenchmarkConnect(b *testing.B) {
	hello, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer hello.Close()
	go func() {
		for {
			c, err := hello.Accept()
			if err != nil {
				return
			}
			c.Write([]byte{1})
			c.Close()
		}
	}()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		New(Options{Peers: netip.MustParsePrefix("10.0.0.0/24"), Direct: true,
			DialPeer: func(context.Context, int, uint16) (splice.Conn, error) { return nil, errors.New("unused") }}).Serve(ctx, ln)
		close(done)
	}()
	defer func() { cancel(); <-done }()
	port := hello.Addr().(*net.TCPAddr).Port
	req := []byte{5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, byte(port >> 8), byte(port)}
	b.ReportAllocs()
	for b.Loop() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		c.Write(req)
		var rep [13]byte
		if _, err := io.ReadFull(c, rep[:]); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
