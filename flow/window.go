package flow

import "time"

// The send window: how much unacknowledged data a flow keeps. MaxSend is
// its ceiling. A flow whose stream knows its path's round trip (a
// PathStream) keeps only what the path needs: windowGain times what the
// path carries in a round trip (the flow's delivery rate times the path's
// minimum round trip plus windowSlack), and at least minWindow. Data past
// that would only wait in queues (QUIC's, the far end's) where it costs
// memory and buys no speed. While the window is what limits the flow, the
// rate it sees fills the window in about a round trip, so the next window
// is windowGain times larger: a limited flow grows its window as fast as
// slow start grows a congestion window.
const (
	minWindow   = 512 << 10
	windowGain  = 4
	windowSlack = 2 * time.Millisecond // the ends' own work per round trip
	// rateSample is the shortest time a delivery rate is measured over;
	// rateDecay is what the rate keeps of its last value per sample (a
	// decaying maximum: a short lull does not shrink the window at once).
	rateSample = 10 * time.Millisecond
	rateDecay  = 0.9
)

// PathStream is a Stream that knows the minimum round trip of its path.
type PathStream interface {
	Stream
	MinRTT() time.Duration
}

// window sizes a flow's send window from what is acknowledged.
type window struct {
	rtt   func() time.Duration // nil: the window is MaxSend
	limit int
	t0    time.Time // start of the current rate sample
	acked int       // acknowledged since t0
	rate  float64   // bytes per second
}

// attach starts the window on a stream: at minWindow on a PathStream (it
// grows windowGain times a sample while it limits), at the ceiling on
// another.
func (w *window) attach(s Stream, ceiling int) {
	w.rtt, w.limit, w.t0, w.acked, w.rate = nil, ceiling, time.Time{}, 0, 0
	if ps, ok := s.(PathStream); ok {
		w.rtt, w.limit = ps.MinRTT, min(minWindow, ceiling)
	}
}

// onAck takes in n bytes acknowledged at now.
func (w *window) onAck(n int, now time.Time, ceiling int) {
	if w.rtt == nil {
		return
	}
	if w.t0.IsZero() {
		w.t0 = now
		return
	}
	w.acked += n
	el := now.Sub(w.t0)
	if el < rateSample {
		return
	}
	w.rate = max(float64(w.acked)/el.Seconds(), w.rate*rateDecay)
	w.t0, w.acked = now, 0
	w.limit = windowFor(w.rate, w.rtt(), ceiling)
}

// windowFor is the window for a flow delivering rate bytes per second on
// a path whose minimum round trip is rtt.
func windowFor(rate float64, rtt time.Duration, ceiling int) int {
	want := windowGain * rate * (rtt + windowSlack).Seconds()
	return int(min(max(want, minWindow), float64(ceiling)))
}
