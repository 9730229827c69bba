package backoff

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"
)

func TestBackoffDoublesToMaxAndResets(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := Backoff{Min: 100 * time.Millisecond, Max: 350 * time.Millisecond}
		var got []time.Duration
		for range 4 {
			got = append(got, b.Next())
			start := time.Now()
			if err := b.Wait(context.Background()); err != nil {
				t.Fatal(err)
			}
			if el := time.Since(start); el < got[len(got)-1] || el > got[len(got)-1]*5/4+time.Millisecond {
				t.Errorf("waited %v for a pause of %v; want it plus at most a quarter", el, got[len(got)-1])
			}
		}
		want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 350 * time.Millisecond, 350 * time.Millisecond}
		for i := range want {
			if got[i] != want[i] {
				t.Errorf("pauses = %v; want %v", got, want)
				break
			}
		}
		b.Reset()
		if b.Next() != 100*time.Millisecond {
			t.Errorf("after Reset, Next = %v; want Min", b.Next())
		}
	})
}

func TestBackoffEndsWithTheContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var b Backoff
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
		defer cancel()
		if err := b.Wait(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Wait = %v; want the context's error", err)
		}
	})
}
