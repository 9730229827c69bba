package website_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"

	"sfkit-proxy/identity"
	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/registry"
	"sfkit-proxy/website"
	"sfkit-proxy/website/websitetest"
)

type relay struct {
	srv *websitetest.Server
	url *url.URL
}

func newRelay(t *testing.T) *relay {
	t.Helper()
	srv := &websitetest.Server{Study: "s1", Participants: []string{"alice", "bob", "carol"},
		Keys: map[string]string{"key-alice": "alice", "key-bob": "bob", "key-carol": "carol", "key-mallory": "mallory"}}
	ts := httptest.NewServer(srv)
	t.Cleanup(ts.Close)
	u, _ := url.Parse(strings.Replace(ts.URL, "http://", "ws://", 1) + "/api/ice")
	srv.Origin = "ws://" + u.Host
	return &relay{srv: srv, url: u}
}

// party is one client with what it learned.
type party struct {
	pid     int
	entry   registry.Entry
	changed chan struct{}
	stop    func() error
	ended   chan struct{} // closed when Run returned by itself

	mu   sync.Mutex // guards view
	view []registry.Entry
}

func (p *party) seen() []registry.Entry {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.view)
}

func (r *relay) start(t *testing.T, pid int, key string) *party {
	t.Helper()
	id, err := identity.Load(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	p := &party{pid: pid, changed: make(chan struct{}, 1), ended: make(chan struct{}), entry: registry.Entry{PID: pid, Pin: id.Pin,
		CheckKey: identity.CheckKeyOf(id).Public(), Instance: identity.NewInstance(),
		Candidates: []registry.Candidate{
			{Kind: registry.KindHost, Addr: netip.AddrPortFrom(netip.MustParseAddr("192.168.1.2"), uint16(4000+pid))},
			{Kind: registry.KindSrflx, Addr: netip.AddrPortFrom(netip.MustParseAddr("203.0.113.9"), uint16(5000+pid))},
			{Kind: registry.KindRelay, Addr: netip.AddrPortFrom(netip.MustParseAddr("198.51.100.1"), uint16(6000+pid))},
		}}}
	c := website.New(website.Options{URL: r.url, Study: "s1", PID: pid, Parties: []int{0, 1, 2}, Cert: id.Cert.Certificate[0],
		Auth: func(context.Context, bool) (string, error) { return key, nil }})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	var mu sync.Mutex
	entry := func() registry.Entry {
		mu.Lock()
		defer mu.Unlock()
		return p.entry
	}
	go func() {
		done <- c.Run(ctx, entry, p.changed, func(v []registry.Entry) {
			p.mu.Lock()
			p.view = v
			p.mu.Unlock()
		})
		close(p.ended)
	}()
	stopped := false
	var runErr error
	p.stop = func() error {
		if !stopped {
			stopped = true
			cancel()
			runErr = <-done
		}
		return runErr
	}
	t.Cleanup(func() { p.stop() })
	return p
}

// knows reports whether p's view holds q as q publishes itself.
func knows(p, q *party) bool {
	for _, e := range p.seen() {
		if e.PID == q.pid {
			return e.Pin == q.entry.Pin && e.CheckKey == q.entry.CheckKey && e.Instance == q.entry.Instance &&
				slices.Equal(e.Candidates, q.entry.Candidates)
		}
	}
	return false
}

// TestPartiesFindEachOther: three parties exchange who they are through
// the relay, only once all three are there (the barrier), every candidate
// with its kind.
func TestPartiesFindEachOther(t *testing.T) {
	r := newRelay(t)
	a := r.start(t, 0, "key-alice")
	b := r.start(t, 1, "key-bob")
	testkit.Eventually(t, "two parties connected", func() bool { return len(r.srv.Connected()) == 2 })
	time.Sleep(300 * time.Millisecond)
	if len(a.seen())+len(b.seen()) != 0 {
		t.Fatalf("parties learned of each other before the barrier opened: %v %v", a.seen(), b.seen())
	}
	c := r.start(t, 2, "key-carol")
	all := []*party{a, b, c}
	for _, p := range all {
		for _, q := range all {
			if p != q {
				testkit.Eventually(t, "every party knows every other", func() bool { return knows(p, q) })
			}
		}
	}
	// A change is sent at once.
	c.entry.Candidates = c.entry.Candidates[1:]
	c.changed <- struct{}{}
	testkit.Eventually(t, "the new candidates reached party 0", func() bool {
		for _, e := range a.seen() {
			if e.PID == 2 && len(e.Candidates) == 3 { // the trickled host candidate stays known
				return e.Candidates[0] == c.entry.Candidates[0]
			}
		}
		return false
	})
}

// TestRelayRefusals: each refusal is one clear error, and ends Run before
// the first success.
func TestRelayRefusals(t *testing.T) {
	r := newRelay(t)
	tests := []struct {
		name, key string
		code      int
		want      string
	}{
		{"unknown key", "key-nobody", 401, "credential was refused"},
		{"not a participant", "key-mallory", 403, "not a participant"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := r.start(t, 0, tt.key)
			select {
			case <-p.ended:
			case <-time.After(10 * time.Second):
				t.Fatal("Run kept going after a refusal that needs a person")
			}
			err := p.stop()
			var se *website.StatusError
			if !errors.As(err, &se) || se.Code != tt.code || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Run = %v; want %d saying %q", err, tt.code, tt.want)
			}
		})
	}
	// A second sidecar for a connected party is refused with 409, and
	// keeps trying (it is not fatal): stop it to see the error.
	first := r.start(t, 0, "key-alice")
	testkit.Eventually(t, "party 0 connected", func() bool { return len(r.srv.Connected()) == 1 })
	second := r.start(t, 0, "key-alice")
	time.Sleep(300 * time.Millisecond)
	if err := second.stop(); !errors.Is(err, context.Canceled) {
		t.Errorf("second sidecar for party 0 stopped with %v; want it to keep retrying", err)
	}
	first.stop()
	// Missing headers, as a client other than ours would send them.
	for _, tt := range []struct {
		name string
		hdr  http.Header
		code int
	}{
		{"no study", http.Header{"Authorization": {"key-bob"}, "Origin": {r.srv.Origin}}, 400},
		{"no credential", http.Header{"X-Mpc-Study-Id": {"s1"}, "Origin": {r.srv.Origin}}, 401},
		{"foreign origin", http.Header{"Authorization": {"key-bob"}, "X-Mpc-Study-Id": {"s1"}, "Origin": {"https://attacker.example"}}, 401},
	} {
		_, resp, err := websocket.Dial(context.Background(), r.url.String(), &websocket.DialOptions{HTTPHeader: tt.hdr})
		if err == nil || resp == nil || resp.StatusCode != tt.code {
			t.Errorf("%s: dial = %v; want %d", tt.name, err, tt.code)
		}
	}
}

// TestRelayOverridesSourceAndDropsUnknownTypes plays a hostile client: it
// claims another party's pid, then sends a type the relay does not know.
func TestRelayOverridesSourceAndDropsUnknownTypes(t *testing.T) {
	r := newRelay(t)
	a := r.start(t, 0, "key-alice")
	c := r.start(t, 2, "key-carol")
	hdr := http.Header{"Authorization": {"key-bob"}, "X-Mpc-Study-Id": {"s1"}, "Origin": {r.srv.Origin}}
	conn, _, err := websocket.Dial(context.Background(), r.url.String(), &websocket.DialOptions{HTTPHeader: hdr})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseNow()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Bob (pid 1) says he is carol (pid 2) and sends carol's identity to alice.
	forged := website.Message{Type: website.TypeCredential, Data: `{"ufrag":"forged","pwd":"` + c.entry.CheckKey + `"}`,
		StudyID: "s1", SourcePID: 2, TargetPID: 0}
	if err := wsjson.Write(ctx, conn, forged); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "alice knows carol", func() bool { return knows(a, c) })
	time.Sleep(200 * time.Millisecond)
	for _, e := range a.seen() {
		if e.PID == 2 && e.Instance == "forged" {
			t.Errorf("the relay let party 1 speak as party 2")
		}
	}
	if err := wsjson.Write(ctx, conn, map[string]any{"type": "offer", "data": "", "studyID": "s1", "sourcePID": 1, "targetPID": 0}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := conn.Read(ctx); err == nil {
		// The relay may first deliver messages for us; the connection must end.
		for err == nil {
			_, _, err = conn.Read(ctx)
		}
	}
	if r.srv.Dropped() != 1 {
		t.Errorf("relay dropped %d connections for an unknown type; want 1", r.srv.Dropped())
	}
}

func TestCandidateLines(t *testing.T) {
	c := registry.Candidate{Kind: registry.KindRelay, Addr: netip.MustParseAddrPort("198.51.100.1:3478")}
	line := website.CandidateLine(0, c)
	kind, ap, err := website.ParseCandidateLine(line)
	if err != nil || kind != c.Kind || ap != c.Addr {
		t.Errorf("ParseCandidateLine(%q) = %s, %v, %v; want %s %v", line, kind, ap, err, c.Kind, c.Addr)
	}
	for _, bad := range []string{"", "candidate:1 1 tcp 1 192.0.2.1 80 typ host", "candidate:1 1 udp 1 x 80 typ host",
		"candidate:1 1 udp 1 192.0.2.1 0 typ host", "candidate:1 1 udp 1 192.0.2.1 80 typ weird"} {
		if _, _, err := website.ParseCandidateLine(bad); err == nil {
			t.Errorf("ParseCandidateLine(%q) succeeded", bad)
		}
	}
}

func FuzzParseCandidateLine(f *testing.F) {
	f.Add("candidate:1 1 udp 2130706431 192.168.1.2 4000 typ host")
	f.Add("a=candidate:1 1 UDP 1 [::1] 1 typ relay raddr 0.0.0.0 rport 0")
	f.Fuzz(func(t *testing.T, s string) {
		kind, ap, err := website.ParseCandidateLine(s)
		if err == nil && (!ap.IsValid() || kind == "") {
			t.Errorf("ParseCandidateLine(%q) = %q, %v without error", s, kind, ap)
		}
	})
}
