package quicmux

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"sfkit-proxy/flow"
	"sfkit-proxy/internal/testkit"
)

// cut kills the connection between m and pid as a broken path does for
// the flows on it: the far side sees it end with an error that is not a
// shutdown.
func cut(m *Mux, pid int) {
	if l := primaryOf(m, pid); l != nil {
		l.conn.CloseWithError(0x999, "test: path cut")
	}
}

// TestFlowsSurviveTheirConnection: a transfer both ways runs while the QUIC
// connection under it is cut three times; the same tunnelled connection
// completes with every byte, once.
func TestFlowsSurviveTheirConnection(t *testing.T) {
	const size = 6 << 20
	down := make([]byte, size)
	rand.Read(down)
	upSum := make(chan [32]byte, 1)
	port := localServer(t, func(c net.Conn) {
		// Paced, so that the cuts land mid-transfer.
		sent := make(chan struct{})
		go func() {
			defer close(sent)
			for b := down; len(b) > 0; b = b[min(len(b), 64<<10):] {
				c.Write(b[:min(len(b), 64<<10)])
				time.Sleep(3 * time.Millisecond)
			}
			c.(*net.TCPConn).CloseWrite()
		}()
		h := sha256.New()
		io.Copy(h, c)
		upSum <- [32]byte(h.Sum(nil))
		<-sent
	})
	a := startParty(t, 0, nil, allowAll)
	b := startParty(t, 1, nil, allowAll)
	introduce(a, b)
	c, err := a.m.Dial(ctxTimeout(t, 10*time.Second), 1, port)
	if err != nil {
		t.Fatal(err)
	}
	up := make([]byte, 3<<20)
	rand.Read(up)
	go func() {
		c.Write(up)
		c.CloseWrite()
	}()
	got := make(chan []byte, 1)
	go func() {
		b, err := io.ReadAll(c)
		if err != nil {
			t.Errorf("ReadAll: %v", err)
		}
		got <- b
	}()
	for i := range 3 {
		time.Sleep(150 * time.Millisecond)
		cut([]*Mux{a.m, b.m}[i%2], 1-i%2)
	}
	var gotDown []byte
	select {
	case gotDown = <-got:
	case <-time.After(60 * time.Second):
		t.Fatal("the transfer did not finish")
	}
	if !bytes.Equal(gotDown, down) {
		t.Errorf("received %d bytes; want %d, equal", len(gotDown), len(down))
	}
	if sum := <-upSum; sum != sha256.Sum256(up) {
		t.Error("the server received other bytes than sent")
	}
	if n := a.m.Stats().FlowsResumed + b.m.Stats().FlowsResumed; n < 2 {
		t.Errorf("%d resumes counted; want one per cut and side", n)
	}
}

// heldFlow is a flow from party 0 to a server at party 1 that reads and
// never answers.
func heldFlow(t *testing.T) (a, b *testParty, c *flow.Conn) {
	t.Helper()
	hold := localServer(t, func(c net.Conn) { io.Copy(io.Discard, c) })
	a = startParty(t, 0, nil, allowAll)
	b = startParty(t, 1, nil, allowAll)
	introduce(a, b)
	c, err := a.m.Dial(ctxTimeout(t, 10*time.Second), 1, hold)
	if err != nil {
		t.Fatal(err)
	}
	return a, b, c
}

// TestShutdownPeerResetsFlows: a peer that stops (its sidecar is told to
// stop) resets the flows with it at once: the application sees a reset,
// not a hang and not an end of stream.
func TestShutdownPeerResetsFlows(t *testing.T) {
	_, b, c := heldFlow(t)
	b.stop()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, flow.ErrReset) {
		t.Errorf("Read after the peer stopped = %v; want flow.ErrReset", err)
	}
}

// TestRestartedPeerResetsFlows: a connection from the peer whose hello
// carries another boot id than before (it restarted, maybe without the
// registry telling us) resets the flows of its old instance at once.
func TestRestartedPeerResetsFlows(t *testing.T) {
	a, b, c := heldFlow(t)
	testkit.Eventually(t, "party 0 learned party 1's boot id", func() bool {
		p := peerOf(a.m, 1)
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.boot == b.m.boot
	})
	peerOf(a.m, 1).hello(b.m.boot, nil) // the same instance again: nothing happens
	c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read = %v; want the flow alive (a deadline)", err)
	}
	peerOf(a.m, 1).hello(newBoot(), nil) // a new instance says hello
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, flow.ErrReset) {
		t.Errorf("Read after the peer restarted = %v; want flow.ErrReset", err)
	}
}
