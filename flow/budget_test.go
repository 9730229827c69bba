package flow

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"os"
	"sync"
	"testing"
	"time"

	"sfkit-proxy/internal/testkit"
)

// sendFrames writes data to s as data frames of frame bytes, then an end.
func sendFrames(s pipeStream, data []byte, frame int) {
	for len(data) > 0 {
		n := min(frame, len(data))
		if _, err := s.Write(append(appendData(nil, n), data[:n]...)); err != nil {
			return
		}
		data = data[n:]
	}
	s.Write([]byte{frameFin})
}

// TestBudgetIsShared: two flows of one peer share a budget smaller than
// one flow's receive bound. The first one's application reads nothing:
// it fills the budget, and stops there. The second one still gets every
// byte (within its free bytes, a piece at a time), and once the first is
// read and both end, the budget is whole again.
func TestBudgetIsShared(t *testing.T) {
	const limit = 128 << 10
	b := NewBudget(limit)
	opts := Options{MaxRecv: 1 << 20, Budget: b}
	stuck, moving := New(opts, nil, nil), New(opts, nil, nil)
	var wg sync.WaitGroup
	defer wg.Wait()
	streams := make([]pipeStream, 2)
	want := make([][]byte, 2)
	for i, c := range []*Conn{stuck, moving} {
		local, remote := streamPair()
		streams[i] = remote
		c.Attach(local, 0)
		want[i] = make([]byte, 1<<20)
		rand.Read(want[i])
		wg.Go(func() { io.Copy(io.Discard, remote) }) // its acknowledgements
		wg.Go(func() { sendFrames(remote, want[i], MaxData) })
		c.CloseWrite()
	}
	defer func() {
		for _, s := range streams {
			s.Abort()
		}
	}()
	testkit.Eventually(t, "the first flow to fill the budget", func() bool { return b.Used() >= limit-MaxData })

	got, err := io.ReadAll(moving)
	if err != nil || !bytes.Equal(got, want[1]) {
		t.Fatalf("the second flow read %d of %d bytes, %v; want all of them", len(got), len(want[1]), err)
	}
	stuck.mu.Lock()
	held := stuck.rmem
	stuck.mu.Unlock()
	if max := FreeBytes + limit; held > max {
		t.Errorf("the first flow holds %d bytes of memory; want at most %d (its free bytes and the budget)", held, max)
	}
	if used := b.Used(); used > limit {
		t.Errorf("budget used %d; want at most %d", used, limit)
	}
	if got, err = io.ReadAll(stuck); err != nil || !bytes.Equal(got, want[0]) {
		t.Fatalf("the first flow read %d of %d bytes, %v; want all of them", len(got), len(want[0]), err)
	}
	stuck.Close()
	moving.Close()
	testkit.Eventually(t, "the budget given back", func() bool { return b.Used() == 0 })
}

// TestBudgetHoldsUnacknowledged: what a flow keeps for a peer that never
// acknowledges counts too: with the budget spent, a writer waits, and
// another flow of the peer still sends; an acknowledgement frees it.
func TestBudgetHoldsUnacknowledged(t *testing.T) {
	const limit = 64 << 10
	b := NewBudget(limit)
	opts := Options{MaxSend: 1 << 20, Budget: b}
	unacked, other := New(opts, nil, nil), New(opts, nil, nil)
	la, ra := streamPair()
	unacked.Attach(la, 0)
	defer ra.Abort()
	go io.Copy(io.Discard, ra) // reads, never acknowledges
	unacked.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
	n, err := unacked.Write(make([]byte, 1<<20))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Write to a peer that never acknowledges = %d, %v; want it stopped by the budget", n, err)
	}
	if max := FreeBytes + limit + MaxData; n > max {
		t.Errorf("the writer queued %d bytes; want at most %d", n, max)
	}
	if used := b.Used(); used > limit {
		t.Errorf("budget used %d; want at most %d", used, limit)
	}

	lb, rb := streamPair()
	other.Attach(lb, 0)
	defer rb.Abort()
	sent := make([]byte, 200<<10)
	rand.Read(sent)
	done := make(chan error, 1)
	go func() {
		_, err := other.Write(sent)
		done <- err
	}()
	// The peer of the other flow reads and acknowledges as it goes.
	var got []byte
	var scratch [9]byte
	for len(got) < len(sent) {
		fr, err := readFrame(rb, &scratch)
		if err != nil {
			t.Fatalf("the other flow's peer: %v after %d bytes", err, len(got))
		}
		if fr.typ == frameData {
			data := make([]byte, fr.n)
			if _, err := io.ReadFull(rb, data); err != nil {
				t.Fatal(err)
			}
			got = append(got, data...)
			rb.Write(appendAck(nil, uint64(len(got))))
		}
	}
	if err := <-done; err != nil || !bytes.Equal(got, sent) {
		t.Errorf("the other flow sent %d of %d bytes, %v", len(got), len(sent), err)
	}
	unacked.Abandon()
	other.Abandon()
	testkit.Eventually(t, "the budget given back", func() bool { return b.Used() == 0 })
}
