package admin

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestAPIRefusesWebPages plays a web page against the API: a DNS-rebinding
// page (its own host name pointing at 127.0.0.1), a simple cross-site
// request to ping, another origin. None gets through; none sends traffic.
func TestAPIRefusesWebPages(t *testing.T) {
	var pings atomic.Int32
	h := NewHandler(Options{
		Status: func() Status { return Status{Study: "s"} },
		Ping: func(context.Context, int) (time.Duration, string, string, error) {
			pings.Add(1)
			return time.Millisecond, "direct", "192.0.2.1:1", nil
		},
	})
	ts := httptest.NewServer(h)
	t.Cleanup(ts.Close)
	tests := []struct {
		name, method, path, host string
		header                   map[string]string
		want                     int
	}{
		{"status by IP", "GET", "/v1/status", "", nil, 200},
		{"status as localhost", "GET", "/v1/status", "localhost:1081", nil, 200},
		{"status as [::1]", "GET", "/v1/status", "[::1]:1081", nil, 200},
		{"rebinding page reads status", "GET", "/v1/status", "attacker.example:1081", nil, 403},
		{"rebinding page reads metrics", "GET", "/metrics", "attacker.example", nil, 403},
		{"cross-site GET ping", "GET", "/v1/ping?pid=1", "", nil, 405},
		{"cross-site form POST ping", "POST", "/v1/ping?pid=1", "", map[string]string{"Content-Type": "application/x-www-form-urlencoded"}, 403},
		{"other origin with the header", "POST", "/v1/ping?pid=1", "", map[string]string{ActionHeader: "1", "Origin": "https://attacker.example"}, 403},
		{"pprof is off", "GET", "/debug/pprof/", "", nil, 404},
		{"ping with the header", "POST", "/v1/ping?pid=1&count=1", "", map[string]string{ActionHeader: "1"}, 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := pings.Load()
			req, _ := http.NewRequest(tt.method, ts.URL+tt.path, strings.NewReader(""))
			if tt.host != "" {
				req.Host = tt.host
			}
			for k, v := range tt.header {
				req.Header.Set(k, v)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.want {
				t.Errorf("%s %s (Host %q) = %d; want %d", tt.method, tt.path, tt.host, resp.StatusCode, tt.want)
			}
			if sent := pings.Load() - before; tt.want != 200 && sent != 0 {
				t.Errorf("%d pings sent by a refused request", sent)
			}
		})
	}
}

func TestProfilesOnlyWhenAskedFor(t *testing.T) {
	ts := httptest.NewServer(NewHandler(Options{Status: func() Status { return Status{} }, Debug: true}))
	t.Cleanup(ts.Close)
	for _, tt := range []struct {
		method string
		want   int
	}{{"GET", 200}, {"POST", 405}} {
		req, _ := http.NewRequest(tt.method, ts.URL+"/debug/pprof/", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tt.want {
			t.Errorf("%s /debug/pprof/ with --admin-debug = %d; want %d", tt.method, resp.StatusCode, tt.want)
		}
	}
}
