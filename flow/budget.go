package flow

import "sync"

// Budget is memory shared by the flows of one peer, so that what one peer
// can make a sidecar hold is bounded whatever the number of its flows: the
// buffers of data received and not yet read, and of data sent and not yet
// acknowledged, counted by their real size. Each flow holds up to
// FreeBytes each way of its own; beyond that it takes from the budget, and
// while the budget is spent it waits (it stops reading its stream, or its
// writer waits), so that a flow is slowed, never failed. A flow whose
// buffers are empty always makes progress within its own FreeBytes: one
// flow's full buffers never stall another's for good.
type Budget struct {
	limit int

	mu      sync.Mutex // guards used, waiting
	used    int
	waiting []waiter // flows to wake when some is given back, oldest first
}

// waiter is a flow waiting for need bytes of its budget.
type waiter struct {
	c    *Conn
	need int
}

// maxWakes bounds the flows one give wakes: a give costs little however
// many wait. A flow's own events wake it too (its program reads, its peer
// acknowledges, either of which frees what it holds); the budget's wake
// only hurries it.
const maxWakes = 8

// FreeBytes is what a flow holds each way without taking from its budget.
const FreeBytes = 16 << 10

// NewBudget returns a budget of limit bytes.
func NewBudget(limit int) *Budget { return &Budget{limit: limit} }

// Used is how much of the budget its flows hold.
func (b *Budget) Used() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// take takes n bytes for c if the budget has them; if not, it remembers c,
// to wake it once some are given back. It is called with c's lock held.
func (b *Budget) take(c *Conn, n int) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used+n <= b.limit {
		b.used += n
		return true
	}
	for i := range b.waiting {
		if b.waiting[i].c == c {
			b.waiting[i].need = n
			return false
		}
	}
	b.waiting = append(b.waiting, waiter{c, n})
	return false
}

// give gives back n bytes and wakes the oldest waiters whose need the
// room now covers, at most maxWakes. It is called with a flow's lock
// held: each waiter is woken on a goroutine of its own, which takes that
// flow's lock once this one is let go of (a waiter is in its Wait by then:
// it registered under its own lock).
func (b *Budget) give(n int) {
	if n <= 0 {
		return
	}
	b.mu.Lock()
	b.used -= n
	room := b.limit - b.used
	var wake []*Conn
	for len(b.waiting) > 0 && len(wake) < maxWakes && b.waiting[0].need <= room {
		room -= b.waiting[0].need
		wake = append(wake, b.waiting[0].c)
		b.waiting[0] = waiter{}
		b.waiting = b.waiting[1:]
	}
	if len(b.waiting) == 0 {
		b.waiting = nil
	}
	b.mu.Unlock()
	for _, c := range wake {
		go c.wake()
	}
}

// wake wakes whatever waits on c.
func (c *Conn) wake() {
	c.mu.Lock()
	c.cond.Broadcast()
	c.mu.Unlock()
}

// wantLocked is what c should hold of its budget: its buffers beyond its
// free bytes each way, with rpend bytes of received data landing.
func (c *Conn) wantLocked() int {
	return max(0, c.rmem+c.rpend-FreeBytes) + max(0, c.smem-FreeBytes)
}

// growLocked takes what c's buffers growing by recv (received data) and
// send (data to send) bytes need of its budget, and reports whether it
// could; a flow without a budget always can, within its own bounds.
func (c *Conn) growLocked(recv, send int) bool {
	b := c.opts.Budget
	if b == nil {
		return true
	}
	c.rpend += recv
	c.smem += send
	want := c.wantLocked()
	c.rpend -= recv
	c.smem -= send
	if want <= c.held {
		return true
	}
	if !b.take(c, want-c.held) {
		return false
	}
	c.held = want
	return true
}

// settleLocked gives back what c holds of its budget beyond what its
// buffers need now.
func (c *Conn) settleLocked() {
	if b := c.opts.Budget; b != nil {
		if want := c.wantLocked(); c.held > want {
			b.give(c.held - want)
			c.held = want
		}
	}
}
