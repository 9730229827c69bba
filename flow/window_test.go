package flow

import (
	"sync"
	"testing"
	"time"
)

// TestWindowFor: the window is windowGain round trips of the rate, within
// minWindow and the ceiling.
func TestWindowFor(t *testing.T) {
	const ceiling = 4 << 20
	for _, tc := range []struct {
		rate float64
		rtt  time.Duration
		want int
	}{
		{0, time.Millisecond, minWindow},           // idle
		{200e6, 100 * time.Microsecond, 1_680_000}, // loopback: 4 × 200 MB/s × 2.1 ms
		{24e6, 50 * time.Millisecond, ceiling},     // a long path at its rate: the ceiling
		{1e6, 50 * time.Millisecond, minWindow},    // a slow reader on a long path
		{10e6, 20 * time.Millisecond, 880_000},     // 4 × 10 MB/s × 22 ms
		{1e12, time.Second, ceiling},               // never past the ceiling
		{-1, time.Millisecond, minWindow},          // nonsense stays within bounds
		{100e6, 0, 800_000},                        // 4 × 100 MB/s × 2 ms
	} {
		if got := windowFor(tc.rate, tc.rtt, ceiling); got != tc.want {
			t.Errorf("windowFor(%.0f B/s, %v) = %d; want %d", tc.rate, tc.rtt, got, tc.want)
		}
	}
}

// TestWindowGrowsWhenItLimits: a flow held back by its window sees a rate
// of one window per round trip, and its next window is windowGain times
// larger, up to the ceiling.
func TestWindowGrowsWhenItLimits(t *testing.T) {
	const rtt = 10 * time.Millisecond
	w := window{rtt: func() time.Duration { return rtt }, limit: minWindow}
	now := time.Unix(0, 0)
	w.onAck(0, now, 64<<20)
	var sizes []int
	for range 4 {
		// What the window lets through in one sample of a round trip and
		// the slack.
		now = now.Add(rtt + windowSlack)
		w.onAck(w.limit, now, 64<<20)
		sizes = append(sizes, w.limit)
	}
	for i := 1; i < len(sizes); i++ {
		if sizes[i] < min(2*sizes[i-1], 64<<20) {
			t.Fatalf("windows %v: a window-limited flow's window should at least double each round trip", sizes)
		}
	}
}

// slowStream is a pipe end whose path has a round trip (a PathStream).
type slowStream struct{ pipeStream }

func (slowStream) MinRTT() time.Duration { return time.Millisecond }

// TestWindowFollowsTheReader: a flow whose far end reads slowly keeps
// about minWindow unacknowledged on a PathStream, not MaxSend; on a plain
// Stream it fills MaxSend.
func TestWindowFollowsTheReader(t *testing.T) {
	for _, path := range []bool{true, false} {
		a, b := New(Options{}, nil, nil), New(Options{}, nil, nil)
		sa, sb := streamPair()
		if path {
			a.Attach(slowStream{sa}, 0)
		} else {
			a.Attach(sa, 0)
		}
		b.Attach(sb, 0)
		var reader, writer sync.WaitGroup
		stop := make(chan struct{})
		reader.Go(func() { // 64 KiB each 5 ms: 13 MB/s
			buf := make([]byte, 64<<10)
			for {
				select {
				case <-stop:
					return
				case <-time.After(5 * time.Millisecond):
				}
				b.Read(buf)
			}
		})
		writer.Go(func() {
			a.SetWriteDeadline(time.Now().Add(time.Second))
			for {
				if _, err := a.Write(make([]byte, 256<<10)); err != nil {
					return
				}
			}
		})
		writer.Wait() // its deadline ends it
		close(stop)
		reader.Wait()
		a.mu.Lock()
		unacked, limit := a.slen, a.win.limit
		a.mu.Unlock()
		a.Reset()
		b.Reset()
		switch {
		case path && unacked > minWindow+MaxData:
			t.Errorf("on a path of 1 ms with a slow reader, %d bytes unacknowledged (window %d); want about %d", unacked, limit, minWindow)
		case !path && unacked < 4<<20-MaxData:
			t.Errorf("on a plain stream, %d bytes unacknowledged; want MaxSend's 4 MiB", unacked)
		}
		t.Logf("path %v: %d bytes unacknowledged, window %d", path, unacked, limit)
	}
}
