package splice

import (
	"bytes"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// tcpConn is a TCP connection as a Conn: its ReadFrom and WriteTo are
// net.TCPConn's (the zero-copy paths).
type tcpConn struct{ *net.TCPConn }

func (c tcpConn) Reset() error {
	c.SetLinger(0)
	return c.Close()
}

// plainConn hides every method but Conn's: Splice copies with buffers of
// its own.
type plainConn struct{ Conn }

// tcpPair returns both ends of a loopback TCP connection, closed when the
// test ends.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	a, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	b, err := ln.AcceptTCP()
	if err != nil {
		a.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	a.SetDeadline(time.Now().Add(10 * time.Second))
	b.SetDeadline(time.Now().Add(10 * time.Second))
	return a, b
}

// spliced is a client and a far program with Splice between them: the
// client's connection is the TCP side, the far program's the Conn side,
// made by wrap.
type spliced struct {
	client, far *net.TCPConn
	done        chan struct{} // closed when Splice returns
}

func newSpliced(t *testing.T, wrap func(*net.TCPConn) Conn) *spliced {
	t.Helper()
	client, local := tcpPair(t)
	near, far := tcpPair(t)
	// Splice's own side of each connection must not time out under it.
	local.SetDeadline(time.Time{})
	near.SetDeadline(time.Time{})
	s := &spliced{client: client, far: far, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		Splice(local, wrap(near))
	}()
	t.Cleanup(func() {
		client.Close()
		far.Close()
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
			t.Error("Splice did not return after both connections ended")
		}
	})
	return s
}

// wait fails the test if Splice has not returned within 10 s.
func (s *spliced) wait(t *testing.T) {
	t.Helper()
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		t.Fatal("Splice did not return after both directions ended")
	}
}

var conns = []struct {
	name string
	wrap func(*net.TCPConn) Conn
}{
	{"ReaderFrom and WriterTo", func(c *net.TCPConn) Conn { return tcpConn{c} }},
	{"plain Conn", func(c *net.TCPConn) Conn { return plainConn{tcpConn{c}} }},
}

// TestCleanEndsAreHalfCloses: each side's end of stream reaches the other
// as an end of stream while the other direction goes on, both ways.
func TestCleanEndsAreHalfCloses(t *testing.T) {
	request, reply := bytes.Repeat([]byte("request "), 100_000), bytes.Repeat([]byte("reply "), 100_000)
	for _, cc := range conns {
		t.Run(cc.name, func(t *testing.T) {
			s := newSpliced(t, cc.wrap)
			// The client sends and half-closes; the far program reads to
			// the end, then answers through the half that is still open.
			go func() {
				s.client.Write(request)
				s.client.CloseWrite()
			}()
			got, err := io.ReadAll(s.far)
			if err != nil || !bytes.Equal(got, request) {
				t.Fatalf("far program read %d bytes, then %v; want %d bytes, then the end of stream", len(got), err, len(request))
			}
			go func() {
				s.far.Write(reply)
				s.far.CloseWrite()
			}()
			got, err = io.ReadAll(s.client)
			if err != nil || !bytes.Equal(got, reply) {
				t.Fatalf("client read %d bytes, then %v; want %d bytes, then the end of stream", len(got), err, len(reply))
			}
			s.wait(t)
		})
	}
}

// TestResetsStayResets: a reset on either side arrives on the other as a
// reset (ECONNRESET), never as an end of stream that would pass for a
// complete transfer.
func TestResetsStayResets(t *testing.T) {
	for _, cc := range conns {
		for _, tt := range []struct {
			name        string
			reset, peer func(*spliced) *net.TCPConn
		}{
			{"far program resets", func(s *spliced) *net.TCPConn { return s.far }, func(s *spliced) *net.TCPConn { return s.client }},
			{"client resets", func(s *spliced) *net.TCPConn { return s.client }, func(s *spliced) *net.TCPConn { return s.far }},
		} {
			t.Run(cc.name+"/"+tt.name, func(t *testing.T) {
				s := newSpliced(t, cc.wrap)
				resetter, peer := tt.reset(s), tt.peer(s)
				// Some data first, all of it through, so the connection is
				// spliced both ways before the reset.
				if _, err := resetter.Write([]byte("partial")); err != nil {
					t.Fatal(err)
				}
				if _, err := io.ReadFull(peer, make([]byte, len("partial"))); err != nil {
					t.Fatalf("peer read: %v", err)
				}
				resetter.SetLinger(0)
				resetter.Close()
				n, err := io.Copy(io.Discard, peer)
				if !errors.Is(err, syscall.ECONNRESET) {
					t.Errorf("peer read %d more bytes, then %v; want ECONNRESET", n, err)
				}
				s.wait(t)
			})
		}
	}
}
