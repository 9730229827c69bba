package quicmux

import (
	"net/netip"
	"slices"
	"testing"
	"time"
)

func TestCandidatesBest(t *testing.T) {
	t0 := time.Unix(1000, 0)
	ms := func(n int) time.Time { return t0.Add(time.Duration(n) * time.Millisecond) }
	pub := netip.MustParseAddrPort("203.0.113.1:1000")
	lan := netip.MustParseAddrPort("192.168.1.2:1000")
	rel := netip.MustParseAddrPort("198.51.100.9:3000") // the peer's relayed address
	v6 := netip.MustParseAddrPort("[2001:db8::1]:1000")
	type event struct {
		at   time.Time
		do   string // "answer", "fail"
		addr netip.AddrPort
		via  via
	}
	tests := []struct {
		name    string
		events  []event
		now     time.Time
		since   time.Time
		relayed bool
		want    pick
		ok      bool
	}{
		{name: "nothing answered", now: ms(100), since: t0},
		{name: "a direct answer", events: []event{{ms(10), "answer", pub, viaMain}}, now: ms(20), since: t0,
			want: pick{pub, viaMain}, ok: true},
		{name: "the newest answer first", events: []event{{ms(10), "answer", pub, viaMain}, {ms(11), "answer", lan, viaMain}},
			now: ms(20), since: t0, want: pick{lan, viaMain}, ok: true},
		{name: "an answer from before the round does not count", events: []event{{ms(10), "answer", pub, viaMain}},
			now: ms(30), since: ms(20)},
		{name: "a relayed pair waits for the relay delay", events: []event{{ms(10), "answer", rel, viaMain}, {ms(11), "answer", pub, viaRelay}},
			now: ms(20), since: t0},
		{name: "after the delay, our own relay first", events: []event{{ms(10), "answer", rel, viaMain}, {ms(9), "answer", pub, viaRelay}},
			now: ms(20), since: t0, relayed: true, want: pick{pub, viaRelay}, ok: true},
		{name: "the peer's relay from our socket when ours did not answer", events: []event{{ms(10), "answer", rel, viaMain}},
			now: ms(20), since: t0, relayed: true, want: pick{rel, viaMain}, ok: true},
		{name: "direct beats relayed even after the delay", events: []event{{ms(11), "answer", pub, viaRelay}, {ms(10), "answer", lan, viaMain}},
			now: ms(20), since: t0, relayed: true, want: pick{lan, viaMain}, ok: true},
		{name: "a failed pair waits", events: []event{{ms(10), "answer", pub, viaMain}, {ms(11), "answer", lan, viaMain}, {ms(12), "fail", lan, viaMain}},
			now: ms(13), since: t0, want: pick{pub, viaMain}, ok: true},
		{name: "a failed pair is tried again after its pause", events: []event{{ms(10), "answer", lan, viaMain}, {ms(12), "fail", lan, viaMain}},
			now: ms(12 + 400), since: t0, want: pick{lan, viaMain}, ok: true},
		{name: "an address of the other family is no target", events: []event{{ms(10), "answer", v6, viaMain}}, now: ms(20), since: t0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newCandidates(true)
			c.publish([]netip.AddrPort{pub, lan, v6}, []netip.AddrPort{rel})
			for _, ev := range tt.events {
				switch ev.do {
				case "answer":
					c.answered(ev.addr, ev.via, ev.at)
				case "fail":
					c.failed(ev.addr, ev.via, ev.at)
				}
			}
			got, ok := c.best(tt.now, tt.since, tt.relayed)
			if got != tt.want || ok != tt.ok {
				t.Errorf("best = %v, %v; want %v, %v", got, ok, tt.want, tt.ok)
			}
		})
	}
}

// TestCandidatesBackOff: each failure of a pair doubles its pause, up to
// dialRetryMax; a success forgets them.
func TestCandidatesBackOff(t *testing.T) {
	t0 := time.Unix(1000, 0)
	a := netip.MustParseAddrPort("203.0.113.1:1000")
	c := newCandidates(true)
	c.publish([]netip.AddrPort{a}, nil)
	c.answered(a, viaMain, t0)
	now := t0
	var last time.Duration
	for i := range 8 {
		c.failed(a, viaMain, now)
		pause := c.byAddr[a].routes[viaMain].nextTry.Sub(now)
		lo := min(dialRetryMin<<i, dialRetryMax)
		if pause < lo || pause > lo+lo/4 {
			t.Fatalf("pause after %d failures = %v; want %v plus up to a quarter", i+1, pause, lo)
		}
		if _, ok := c.best(now.Add(pause-time.Millisecond), t0, false); ok {
			t.Fatalf("after %d failures the pair is dialled before its pause", i+1)
		}
		if _, ok := c.best(now.Add(pause), t0, false); !ok {
			t.Fatalf("after %d failures the pair is not dialled after its pause", i+1)
		}
		now, last = now.Add(pause), pause
	}
	if last > dialRetryMax+dialRetryMax/4 {
		t.Errorf("last pause %v; want at most %v", last, dialRetryMax)
	}
	c.succeeded(a, viaMain)
	if r := c.byAddr[a].routes[viaMain]; r.failures != 0 || !r.nextTry.IsZero() || r.answered != t0 {
		t.Errorf("after a success the route is %+v; want its failures forgotten and its answer kept", r)
	}
}

// TestCandidatesLearned: addresses learned from the peer's checks are
// targets until they are silent for prflxTTL, at most maxPrflx of them,
// the newest kept; published addresses stay whatever is learned.
func TestCandidatesLearned(t *testing.T) {
	t0 := time.Unix(1000, 0)
	pub := netip.MustParseAddrPort("203.0.113.1:1000")
	c := newCandidates(true)
	c.publish([]netip.AddrPort{pub}, nil)
	var learned []netip.AddrPort
	for i := range maxPrflx + 3 {
		a := netip.AddrPortFrom(netip.MustParseAddr("198.51.100.1"), uint16(2000+i))
		learned = append(learned, a)
		c.learn(a, t0.Add(time.Duration(i)*time.Second))
	}
	now := t0.Add(time.Duration(maxPrflx+3) * time.Second)
	got := c.targets(now)
	want := append([]netip.AddrPort{pub}, learned[3:]...)
	slices.SortFunc(want, netip.AddrPort.Compare)
	if !slices.Equal(got, want) {
		t.Errorf("targets = %v; want %v", got, want)
	}
	later := t0.Add(time.Duration(maxPrflx+2)*time.Second + prflxTTL + time.Second)
	if got := c.targets(later); !slices.Equal(got, []netip.AddrPort{pub}) {
		t.Errorf("targets after %v of silence = %v; want only the published %v", prflxTTL, got, pub)
	}
	// The peer stops publishing an address it still checks us from: it
	// stays a target while heard.
	c.learn(pub, now)
	c.publish(nil, nil)
	if !c.isTarget(pub, now) {
		t.Error("an address the peer checks us from is no target once unpublished")
	}
	if c.isTarget(pub, now.Add(prflxTTL+time.Second)) {
		t.Error("an unpublished address is a target after its silence")
	}
}
