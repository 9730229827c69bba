package admin

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"sfkit-proxy/status"
)

// TestAPIRefusesWebPages plays a web page against the API: a DNS-rebinding
// page (its own host name pointing at 127.0.0.1), a simple cross-site
// request to ping, another origin. None gets through; none sends traffic.
func TestAPIRefusesWebPages(t *testing.T) {
	var pings atomic.Int32
	h := NewHandler(Options{
		Status: func() status.Status { return status.Status{Study: "s"} },
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
	ts := httptest.NewServer(NewHandler(Options{Status: func() status.Status { return status.Status{} }, Debug: true}))
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

// TestAPIAnswersOnlyThisMachine plays pages of other origins, and requests
// that name another host, against the API: only localhost and loopback
// addresses pass, as Host and as Origin.
func TestAPIAnswersOnlyThisMachine(t *testing.T) {
	ts := httptest.NewServer(NewHandler(Options{Status: func() status.Status { return status.Status{} }}))
	t.Cleanup(ts.Close)
	tests := []struct {
		name, host, origin string
		want               int
	}{
		{"no origin", "", "", 200},
		{"origin localhost", "", "http://localhost", 200},
		{"origin localhost with port", "", "http://localhost:8080", 200},
		{"origin LOCALHOST", "", "https://LOCALHOST:8443", 200},
		{"origin 127.0.0.1", "", "http://127.0.0.1", 200},
		{"origin 127.1.2.3 with port", "", "http://127.1.2.3:3000", 200},
		{"origin [::1] with port", "", "http://[::1]:8080", 200},
		{"origin [::1]", "", "http://[::1]", 200},
		{"origin null", "", "null", 403},
		{"origin public IP", "", "http://203.0.113.5", 403},
		{"origin public IP with port", "", "http://203.0.113.5:1081", 403},
		{"origin private IP", "", "http://10.1.2.3", 403},
		{"origin unspecified", "", "http://0.0.0.0:1081", 403},
		{"origin IPv6", "", "http://[2001:db8::1]:1081", 403},
		{"origin mapped public IP", "", "http://[::ffff:203.0.113.5]", 403},
		{"origin localhost subdomain of attacker", "", "http://localhost.evil.com", 403},
		{"origin loopback-looking name", "", "http://127.0.0.1.evil.com", 403},
		{"origin attacker with loopback user", "", "http://127.0.0.1@evil.com", 403},
		{"origin without scheme", "", "localhost", 403},
		{"host localhost", "localhost", "", 200},
		{"host 127.0.0.1", "127.0.0.1", "", 200},
		{"host 127.0.0.2 with port", "127.0.0.2:1081", "", 200},
		{"host [::1]", "[::1]", "", 200},
		{"host public IP", "203.0.113.5:1081", "", 403},
		{"host private IP", "10.1.2.3", "", 403},
		{"host unspecified", "0.0.0.0:1081", "", 403},
		{"host IPv6", "[2001:db8::1]:1081", "", 403},
		{"host localhost subdomain of attacker", "localhost.evil.com:1081", "", 403},
		{"host loopback-looking name", "127.0.0.1.evil.com", "", 403},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if code := statusCode(t, ts.URL, tt.host, tt.origin); code != tt.want {
				t.Errorf("GET /v1/status (Host %q, Origin %q) = %d; want %d", tt.host, tt.origin, code, tt.want)
			}
		})
	}
}

// TestAPIAnswersItsOwnAddress binds the API to every address, as
// --admin-any-host 0.0.0.0:1081 does, and reaches it on one that is not
// loopback: that address is a Host it answers, and no other is.
func TestAPIAnswersItsOwnAddress(t *testing.T) {
	ip := nonLoopbackIPv4(t)
	ln, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewUnstartedServer(NewHandler(Options{Status: func() status.Status { return status.Status{} }}))
	ts.Listener.Close()
	ts.Listener = ln
	ts.Start()
	t.Cleanup(ts.Close)
	port := ln.Addr().(*net.TCPAddr).Port
	own := netip.AddrPortFrom(ip, uint16(port)).String()
	tests := []struct {
		name, host, origin string
		want               int
	}{
		{"its own address", own, "", 200},
		{"its own address without port", ip.String(), "", 200},
		{"another address", netip.AddrPortFrom(netip.MustParseAddr("203.0.113.5"), uint16(port)).String(), "", 403},
		{"the unspecified address", "0.0.0.0:" + strconv.Itoa(port), "", 403},
		{"a page of another origin", own, "http://203.0.113.5", 403},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if code := statusCode(t, "http://"+own, tt.host, tt.origin); code != tt.want {
				t.Errorf("GET /v1/status on %s (Host %q, Origin %q) = %d; want %d", own, tt.host, tt.origin, code, tt.want)
			}
		})
	}
}

// nonLoopbackIPv4 is one of this machine's IPv4 addresses that is not
// loopback; the test is skipped without one.
func nonLoopbackIPv4(t *testing.T) netip.Addr {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Skipf("no interface addresses: %v", err)
	}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() && !p.Addr().IsLoopback() {
			return p.Addr()
		}
	}
	t.Skip("no non-loopback IPv4 address to reach the API on")
	return netip.Addr{}
}

// statusCode is the answer to GET base/v1/status with the Host (if not
// empty) and the Origin (if not empty) given.
func statusCode(t *testing.T, base, host, origin string) int {
	t.Helper()
	req, _ := http.NewRequest("GET", base+"/v1/status", nil)
	if host != "" {
		req.Host = host
	}
	if origin != "" {
		req.Header.Set("Origin", origin)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}
