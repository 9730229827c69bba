package quicmux

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"sfkit-proxy/quicmux/header"
)

func BenchmarkRequestHeader(b *testing.B) {
	b.ReportAllocs()
	buf := make([]byte, 0, header.RequestLen)
	for b.Loop() {
		buf = header.Request{Kind: header.KindConnect, Port: 8020, Flow: 1}.Append(buf[:0])
		if _, err := header.ParseRequest(buf); err != nil {
			b.Fatal(err)
		}
	}
}

// benchPair is two connected parties on loopback and a local TCP server at
// the second that answers each connection with one byte, then copies.
func benchPair(b *testing.B) (*Mux, uint16) {
	b.Helper()
	port := localServer(b, func(c net.Conn) {
		c.Write([]byte{1})
		io.Copy(io.Discard, c)
	})
	a := startParty(b, 0, nil, allowAll)
	p := startParty(b, 1, nil, allowAll)
	introduce(a, p)
	return a.m, port
}

// BenchmarkDial opens a tunnelled connection over an established QUIC
// connection and reads the first byte from the far side.
func BenchmarkDial(b *testing.B) {
	m, port := benchPair(b)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b.ReportAllocs()
	for b.Loop() {
		c, err := m.Dial(ctx, 1, port)
		if err != nil {
			b.Fatal(err)
		}
		var one [1]byte
		if _, err := io.ReadFull(c, one[:]); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}

// BenchmarkCopy moves data through one tunnelled connection: the opener's
// stream writes, the acceptor's copy loop into the local TCP server.
func BenchmarkCopy(b *testing.B) {
	m, port := benchPair(b)
	c, err := m.Dial(context.Background(), 1, port)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	var one [1]byte
	io.ReadFull(c, one[:])
	buf := make([]byte, 256<<10)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	start := time.Now()
	n := 0
	for b.Loop() {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
		n++
	}
	b.ReportMetric(float64(n*len(buf))/1e6/time.Since(start).Seconds(), "MB/s")
}
