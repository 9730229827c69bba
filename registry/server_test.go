package registry

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	"sfkit-proxy/config"
)

var testTokens = `# token study pid
tok-study-a-party-0 A 0
tok-study-a-party-1 A 1   # trailing comment
tok-study-b-party-0 B 0
`

func newTestServer(t *testing.T, dir string) *httptest.Server {
	return newTestServerWith(t, ServerOptions{DataDir: dir})
}

// newTestServerWith serves the test tokens with opts (Grants, MaxWait and
// Rate are set here).
func newTestServerWith(t *testing.T, opts ServerOptions) *httptest.Server {
	t.Helper()
	g, err := ParseTokens(bufio.NewScanner(strings.NewReader(testTokens)))
	if err != nil {
		t.Fatal(err)
	}
	opts.Grants, opts.MaxWait, opts.Rate = g, 5*time.Second, 1000
	s, err := NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s)
	t.Cleanup(ts.Close)
	return ts
}

func client(ts *httptest.Server, study string, pid int, tok string) *Client {
	u, _ := url.Parse(ts.URL + "/")
	return &Client{Base: u, Study: study, PID: pid, Token: func(context.Context, bool) (string, error) { return tok, nil }}
}

func entry(pid int) Entry {
	return Entry{PID: pid, Pin: fmt.Sprintf("%043d", pid), CheckKey: strings.Repeat("C", 43), Instance: "i1",
		Candidates: []Candidate{{Kind: KindSrflx, Addr: netip.MustParseAddrPort("203.0.113.5:4000")}}, AllowPorts: "8000-8100"}
}

func statusOf(err error) int {
	var se *StatusError
	if errors.As(err, &se) {
		return se.Code
	}
	return 0
}

func TestAuthorization(t *testing.T) {
	ts := newTestServer(t, "")
	ctx := context.Background()
	if err := client(ts, "A", 0, "tok-study-a-party-0").Publish(ctx, entry(0)); err != nil {
		t.Fatalf("own publish = %v", err)
	}
	tests := []struct {
		name string
		do   func() error
		want int
	}{
		{"write another party's entry", func() error {
			return client(ts, "A", 1, "tok-study-a-party-0").Publish(ctx, entry(1))
		}, 403},
		{"delete another party's entry", func() error { return client(ts, "A", 1, "tok-study-a-party-0").Delete(ctx) }, 403},
		{"read another study", func() error {
			_, err := client(ts, "A", 0, "tok-study-b-party-0").List(ctx, 0, 0)
			return err
		}, 403},
		{"unknown token", func() error {
			_, err := client(ts, "A", 0, "no-such-token-xyz").List(ctx, 0, 0)
			return err
		}, 401},
		{"no token", func() error {
			_, err := client(ts, "A", 0, "").List(ctx, 0, 0)
			return err
		}, 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := statusOf(tt.do()); got != tt.want {
				t.Errorf("status = %d; want %d", got, tt.want)
			}
		})
	}
	l, err := client(ts, "B", 0, "tok-study-b-party-0").List(ctx, 0, 0)
	if err != nil || len(l.Parties) != 0 {
		t.Errorf("study B sees %+v, %v; want nothing of study A", l, err)
	}
}

func TestBadBodies(t *testing.T) {
	ts := newTestServer(t, "")
	big := `{"pid":0,"pin":"` + strings.Repeat("A", MaxBody) + `"}`
	tests := []struct {
		name, body string
		want       int
		reason     string
	}{
		{"not json", "hello", 400, "bad json"},
		{"unknown field", `{"pid":0,"bogus":1}`, 400, "unknown field"},
		{"bad pin", `{"pid":0,"pin":"x","check_key":"` + strings.Repeat("C", 43) + `","instance":"i"}`, 400, "pin"},
		{"bad candidate", `{"pid":0,"pin":"` + strings.Repeat("A", 43) + `","check_key":"` + strings.Repeat("C", 43) + `","instance":"i","candidates":[{"kind":"host","addr":"0.0.0.0:0"}]}`, 400, "candidates[0]"},
		{"pid mismatch", `{"pid":1,"pin":"` + strings.Repeat("A", 43) + `","check_key":"` + strings.Repeat("C", 43) + `","instance":"i"}`, 400, "differs"},
		{"too big", big, 413, "body over"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest(http.MethodPut, ts.URL+"/v1/studies/A/parties/0", strings.NewReader(tt.body))
			req.Header.Set("Authorization", "Bearer tok-study-a-party-0")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var eb struct{ Error string }
			json.NewDecoder(resp.Body).Decode(&eb)
			if resp.StatusCode != tt.want || !strings.Contains(eb.Error, tt.reason) {
				t.Errorf("PUT %s = %d %q; want %d with %q", tt.name, resp.StatusCode, eb.Error, tt.want, tt.reason)
			}
		})
	}
}

func TestLongPollWakesOnChange(t *testing.T) {
	ts := newTestServer(t, "")
	ctx := context.Background()
	c0 := client(ts, "A", 0, "tok-study-a-party-0")
	c1 := client(ts, "A", 1, "tok-study-a-party-1")
	if err := c0.Publish(ctx, entry(0)); err != nil {
		t.Fatal(err)
	}
	l, err := c1.List(ctx, 0, 0)
	if err != nil || len(l.Parties) != 1 || l.Version == 0 {
		t.Fatalf("List = %+v, %v", l, err)
	}
	got := make(chan List, 1)
	go func() {
		l2, err := c1.List(ctx, l.Version, 5*time.Second)
		if err != nil {
			t.Error(err)
		}
		got <- l2
	}()
	// Publishing the same entry again is no change; a new candidate is.
	if err := c0.Publish(ctx, entry(0)); err != nil {
		t.Fatal(err)
	}
	e := entry(0)
	e.Candidates = append(e.Candidates, Candidate{Kind: KindHost, Addr: netip.MustParseAddrPort("192.168.1.2:4000")})
	if err := c0.Publish(ctx, e); err != nil {
		t.Fatal(err)
	}
	l2 := <-got
	if l2.Version != l.Version+1 || len(l2.Parties[0].Candidates) != 2 {
		t.Errorf("long poll = version %d, %+v; want version %d with 2 candidates", l2.Version, l2.Parties, l.Version+1)
	}
}

func TestLongPollAnswersAfterWait(t *testing.T) {
	ts := newTestServer(t, "")
	c := client(ts, "A", 0, "tok-study-a-party-0")
	c.Publish(context.Background(), entry(0))
	l, _ := c.List(context.Background(), 0, 0)
	l2, err := c.List(context.Background(), l.Version, 50*time.Millisecond)
	if err != nil || l2.Version != l.Version {
		t.Errorf("List after an idle wait = %+v, %v; want the same version", l2, err)
	}
}

func TestStateSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	ts := newTestServer(t, dir)
	c := client(ts, "A", 1, "tok-study-a-party-1")
	if err := c.Publish(context.Background(), entry(1)); err != nil {
		t.Fatal(err)
	}
	ts.Close()
	ts2 := newTestServer(t, dir)
	l, err := client(ts2, "A", 0, "tok-study-a-party-0").List(context.Background(), 0, 0)
	if err != nil || len(l.Parties) != 1 || l.Parties[0].PID != 1 || l.Version != 1 {
		t.Fatalf("after restart List = %+v, %v; want party 1 at version 1", l, err)
	}
	if err := client(ts2, "A", 1, "tok-study-a-party-1").Delete(context.Background()); err != nil {
		t.Fatal(err)
	}
	l, _ = client(ts2, "A", 0, "tok-study-a-party-0").List(context.Background(), 0, 0)
	if len(l.Parties) != 0 {
		t.Errorf("after delete List = %+v; want empty", l)
	}
}

func TestParseTokensErrors(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"two fields", "tok-0123456789abcdef A\n", "want 'TOKEN STUDY PID'"},
		{"short token", "short A 0\n", "too short"},
		{"bad pid", "tok-0123456789abcdef A x\n", "pid"},
		{"bad study", "tok-0123456789abcdef a/b 0\n", "study"},
		{"repeated", "tok-0123456789abcdef A 0\ntok-0123456789abcdef A 1\n", "repeated"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseTokens(bufio.NewScanner(strings.NewReader(tt.in)))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ParseTokens(%q) = %v; want error with %q", tt.in, err, tt.want)
			}
		})
	}
}

func FuzzDecodeEntry(f *testing.F) {
	b, _ := json.Marshal(entry(3))
	f.Add(b)
	f.Add([]byte(`{"pid":0}`))
	f.Add([]byte(`{"pid":0,"candidates":[{"kind":"host","addr":"[::1]:1"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := DecodeEntry(strings.NewReader(string(b)))
		if err != nil {
			return
		}
		if err := e.Validate(); err != nil {
			t.Errorf("DecodeEntry accepted an entry that Validate rejects: %v", err)
		}
	})
}

func TestClientKeepsTheBasePath(t *testing.T) {
	g, _ := ParseTokens(bufio.NewScanner(strings.NewReader(testTokens)))
	s, _ := NewServer(ServerOptions{Grants: g})
	mux := http.NewServeMux()
	mux.Handle("/api/", http.StripPrefix("/api", s))
	ts := httptest.NewServer(mux)
	defer ts.Close()
	for _, base := range []string{ts.URL + "/api", ts.URL + "/api/"} {
		u, _ := url.Parse(base)
		c := &Client{Base: u, Study: "A", PID: 0, Token: func(context.Context, bool) (string, error) { return "tok-study-a-party-0", nil }}
		if err := c.Publish(context.Background(), entry(0)); err != nil {
			t.Errorf("Publish with base %q: %v", base, err)
		}
	}
}

func TestRateLimitIsPerParty(t *testing.T) {
	g, _ := ParseTokens(bufio.NewScanner(strings.NewReader(testTokens)))
	s, _ := NewServer(ServerOptions{Grants: g, Rate: 1}) // burst 2
	ts := httptest.NewServer(s)
	defer ts.Close()
	ctx := context.Background()
	c0 := client(ts, "A", 0, "tok-study-a-party-0")
	var last error
	for range 3 {
		_, last = c0.List(ctx, 0, 0)
	}
	if statusOf(last) != http.StatusTooManyRequests {
		t.Errorf("third request in a burst of 2 = %v; want 429", last)
	}
	if _, err := client(ts, "A", 1, "tok-study-a-party-1").List(ctx, 0, 0); err != nil {
		t.Errorf("another party's request = %v; want it unaffected", err)
	}
}

// TestPinIsOwnedByOneParty: a member that publishes another party's pin is
// refused, and the holder's entry stands.
func TestPinIsOwnedByOneParty(t *testing.T) {
	ts := newTestServer(t, "")
	ctx := context.Background()
	c0 := client(ts, "A", 0, "tok-study-a-party-0")
	c1 := client(ts, "A", 1, "tok-study-a-party-1")
	if err := c1.Publish(ctx, entry(1)); err != nil {
		t.Fatal(err)
	}
	borrowed := entry(0)
	borrowed.Pin = entry(1).Pin
	err := c0.Publish(ctx, borrowed)
	if statusOf(err) != http.StatusConflict || !strings.Contains(err.Error(), "party 1") {
		t.Fatalf("publish of party 1's pin by party 0 = %v; want 409 naming party 1", err)
	}
	l, _ := c1.List(ctx, 0, 0)
	if len(l.Parties) != 1 || l.Parties[0].PID != 1 {
		t.Errorf("entries = %+v; want party 1's alone", l.Parties)
	}
	// Its own pin is fine, and so is publishing again.
	for range 2 {
		if err := c0.Publish(ctx, entry(0)); err != nil {
			t.Errorf("publish own pin = %v", err)
		}
	}
}

// TestDangerousCandidatesAreRefused: addresses that would turn peers'
// checks against their own machine or network are a 400.
func TestDangerousCandidatesAreRefused(t *testing.T) {
	ts := newTestServerWith(t, ServerOptions{Addrs: config.AddrPolicy{Virtual: netip.MustParsePrefix(config.DefaultPeersCIDR)}})
	c0 := client(ts, "A", 0, "tok-study-a-party-0")
	for _, addr := range []string{"127.0.0.1:4000", "[::1]:4000", "0.0.0.0:4000", "224.0.0.1:4000", "255.255.255.255:4000",
		"169.254.169.254:80", "[fe80::1]:4000", "[ff02::1]:4000", "10.0.0.5:4000", "198.51.100.7:0"} {
		t.Run(addr, func(t *testing.T) {
			e := entry(0)
			e.Candidates = append(e.Candidates, Candidate{Kind: KindHost, Addr: netip.MustParseAddrPort(addr)})
			if err := c0.Publish(context.Background(), e); statusOf(err) != http.StatusBadRequest || !strings.Contains(err.Error(), "candidates[1]") {
				t.Errorf("publish with candidate %s = %v; want 400 naming candidates[1]", addr, err)
			}
		})
	}
	e := entry(0)
	e.Candidates = append(e.Candidates, Candidate{Kind: KindHost, Addr: netip.MustParseAddrPort("192.168.1.20:4000")})
	if err := c0.Publish(context.Background(), e); err != nil {
		t.Errorf("publish with a LAN candidate = %v; want success", err)
	}
	// A registry on loopback (the demo) takes loopback candidates.
	lo := newTestServerWith(t, ServerOptions{Addrs: config.AddrPolicy{Loopback: true}})
	e.Candidates = []Candidate{{Kind: KindHost, Addr: netip.MustParseAddrPort("127.0.0.1:4000")}}
	if err := client(lo, "A", 0, "tok-study-a-party-0").Publish(context.Background(), e); err != nil {
		t.Errorf("loopback candidate on a loopback registry = %v; want success", err)
	}
}

// TestStaleEntriesExpire: an entry whose party stops refreshing it goes
// away after the TTL, waking long polls; a refreshed one stays.
func TestStaleEntriesExpire(t *testing.T) {
	const ttl = 600 * time.Millisecond
	ts := newTestServerWith(t, ServerOptions{EntryTTL: ttl})
	ctx := context.Background()
	c0 := client(ts, "A", 0, "tok-study-a-party-0")
	c1 := client(ts, "A", 1, "tok-study-a-party-1")
	for _, c := range []*Client{c0, c1} {
		if err := c.Publish(ctx, entry(c.PID)); err != nil {
			t.Fatal(err)
		}
	}
	l, err := c0.List(ctx, 0, 0)
	if err != nil || len(l.Parties) != 2 || l.Now.IsZero() {
		t.Fatalf("List = %+v, %v; want 2 parties and the server's time", l, err)
	}
	// Party 0 keeps refreshing (same entry) while a long poll waits; party 1
	// was killed.
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(ttl / 4):
				c0.Publish(ctx, entry(0))
			}
		}
	}()
	start := time.Now()
	l2, err := c0.List(ctx, l.Version, 5*time.Second)
	close(stop)
	<-done
	if err != nil || len(l2.Parties) != 1 || l2.Parties[0].PID != 0 || l2.Version == l.Version {
		t.Fatalf("long poll = %+v, %v; want party 0 alone at a new version", l2, err)
	}
	if waited := time.Since(start); waited < ttl/2 {
		t.Errorf("party 1 expired after %v; want about %v", waited, ttl)
	}
	// Clients judge freshness by the server's clock, too.
	old := List{Now: time.Now(), Parties: []Entry{{PID: 0, Updated: time.Now().Add(-time.Minute)}, {PID: 1, Updated: time.Now()}}}
	if f := old.Fresh(30 * time.Second); len(f) != 1 || f[0].PID != 1 {
		t.Errorf("Fresh = %+v; want party 1 alone", f)
	}
}
