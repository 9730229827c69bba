// Package backoff is the one retry pause of the codebase: bounded,
// jittered, and over when ctx ends. Retry only what is safe to repeat (a
// dial, a publish, a connection to a relay), never a half-copied stream.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff doubles a pause from Min to Max. The zero value pauses 1 s
// doubling to 30 s.
type Backoff struct {
	Min, Max time.Duration
	next     time.Duration
}

// Next is the pause the next Wait takes, before jitter.
func (b *Backoff) Next() time.Duration {
	if b.next == 0 {
		b.next = b.min()
	}
	return b.next
}

func (b *Backoff) min() time.Duration {
	if b.Min == 0 {
		return time.Second
	}
	return b.Min
}

// Reset starts again from Min, after a success.
func (b *Backoff) Reset() { b.next = 0 }

// Step is the pause after one more failure, jittered as Wait's, for a
// caller that schedules its own retry (a time to try again, not a sleep);
// it doubles the next pause up to Max.
func (b *Backoff) Step() time.Duration {
	d := b.Next()
	limit := b.Max
	if limit == 0 {
		limit = 30 * time.Second
	}
	b.next = min(2*d, limit)
	return d + rand.N(d/4+1)
}

// Wait pauses for the next pause plus up to a quarter of it, then doubles
// it up to Max. It returns ctx's error if ctx ends first.
func (b *Backoff) Wait(ctx context.Context) error {
	t := time.NewTimer(b.Step())
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
