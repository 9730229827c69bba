package quicmux

import (
	"testing"
	"time"
)

func TestStallWatch(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	const after = 3 * time.Second
	type step struct {
		at    time.Time
		read  uint64
		owes  bool
		probe bool
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"owes nothing: no probe", []step{{at(1), 0, false, false}, {at(100), 0, false, false}}},
		{"owes, and acknowledgements come: no probe", []step{{at(1), 10, true, false}, {at(3), 20, true, false}, {at(5), 30, true, false}, {at(7), 40, true, false}}},
		{"owes, nothing back for long enough: a probe", []step{{at(1), 0, true, false}, {at(3.9), 0, true, false}, {at(4), 0, true, true}}},
		{"the wait counts from when it began to owe", []step{{at(1), 5, false, false}, {at(100), 5, true, false}, {at(102.9), 5, true, false}, {at(103), 5, true, true}}},
		{"after a probe, the next only probeAgain later", []step{{at(1), 0, true, false}, {at(4), 0, true, true}, {at(5), 0, true, false}, {at(13.9), 0, true, false}, {at(14), 0, true, true}}},
		{"a read restarts the wait", []step{{at(1), 0, true, false}, {at(4), 0, true, true}, {at(5), 50, true, false}, {at(7.9), 50, true, false}, {at(8), 50, true, true}}},
		{"paid back: owes no more", []step{{at(1), 0, true, false}, {at(2), 0, false, false}, {at(30), 0, false, false}, {at(31), 0, true, false}, {at(33.9), 0, true, false}, {at(34), 0, true, true}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var w stallWatch
			for i, s := range tt.steps {
				if got := w.observe(s.read, s.owes, s.at, after); got != s.probe {
					t.Fatalf("step %d (%v, read %d, owes %v): probe = %v; want %v", i, s.at.Sub(t0), s.read, s.owes, got, s.probe)
				}
			}
		})
	}
}

// TestRegrow: trials of larger packets begin regrowFirst after the link,
// one at a time, then twice as far apart each time up to regrowMax; none
// while packets are full size or of unknown size.
func TestRegrow(t *testing.T) {
	t0 := time.Unix(1000, 0)
	r := newRegrow(t0)
	if r.due(t0.Add(regrowFirst-time.Second), 1252) {
		t.Fatal("a trial before regrowFirst")
	}
	now := t0.Add(regrowFirst)
	if r.due(now, fullPacket) || r.due(now, 0) {
		t.Fatal("a trial with full-size packets, or packets of unknown size")
	}
	if !r.due(now, 1252) {
		t.Fatal("no trial at regrowFirst with small packets")
	}
	if r.due(now.Add(time.Hour), 1252) {
		t.Fatal("a second trial while one is out")
	}
	wait := regrowFirst
	for range 10 {
		r.done(now)
		wait = min(2*wait, regrowMax)
		if r.due(now.Add(wait-time.Second), 1252) {
			t.Fatalf("a trial %v after the last; want %v", wait-time.Second, wait)
		}
		now = now.Add(wait)
		if !r.due(now, 1252) {
			t.Fatalf("no trial %v after the last", wait)
		}
	}
	if wait != regrowMax {
		t.Fatalf("trials %v apart at last; want %v", wait, regrowMax)
	}
}
