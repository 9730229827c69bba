package main

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"sfkit-proxy/admin"
	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/status"
)

func peerOf(s status.Status, pid int) (status.Peer, bool) {
	for _, p := range s.Peers {
		if p.PID == pid {
			return p, true
		}
	}
	return status.Peer{}, false
}

func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse as Prometheus text: %v", err)
	}
	return mfs
}

// value returns the value of the metric in family name whose labels include want.
func value(mfs map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	mf := mfs[name]
	if mf == nil {
		return 0, false
	}
next:
	for _, m := range mf.Metric {
		have := map[string]string{}
		for _, l := range m.Label {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		}
	}
	return 0, false
}

func TestStatusMetricsAndPing(t *testing.T) {
	l := newLab(t)
	const size = 8 << 20
	port, sum := fileServer(t, size)
	p0, _ := l.party(0)
	_, stop1 := l.party(1)
	api := &admin.Client{Addr: p0.Admin.String()}
	ctx := context.Background()

	if _, got, err := fetchVia(t, p0.SOCKS, fmt.Sprintf("http://10.0.0.1:%d/", port)); err != nil || got != sum {
		t.Fatalf("fetch: %v", err)
	}
	var s status.Status
	testkit.Eventually(t, "party 0 reports the transfer from party 1 and its rate", func() bool {
		var err error
		if s, err = api.Status(ctx); err != nil {
			t.Fatal(err)
		}
		p, ok := peerOf(s, 1)
		return ok && p.State == "direct" && p.BytesReceived >= size && p.Rate.MaxReceived > 0 && p.OpenConns == 0
	})
	p, _ := peerOf(s, 1)
	if p.RemoteAddr == "" || p.Rate.AverageReceived <= 0 || s.ExternalAddr == "" || !s.Registry.Reachable || !s.STUN.Done {
		t.Errorf("status = %+v; want a remote address, an average rate, an external address, registry and STUN ok", s)
	}
	if s.Counters.SOCKS["peer/ok"] < 1 || s.Counters.DialsOK+s.Counters.AcceptsOK < 1 {
		t.Errorf("counters = %+v; want a successful peer request and a handshake", s.Counters)
	}
	// A request for a port party 1 does not allow is counted as such.
	l.party(2, "--allow-ports", "1")
	if _, _, err := fetchVia(t, p0.SOCKS, "http://10.0.0.2:2/"); err == nil {
		t.Fatal("fetch from a disallowed port succeeded")
	}

	mfs := scrape(t, p0.Admin.String())
	checks := []struct {
		name   string
		labels map[string]string
		min    float64
	}{
		{"sfkit_proxy_peer_bytes_total", map[string]string{"peer": "1", "path": "direct", "direction": "received"}, size},
		{"sfkit_proxy_peer_connections_total", map[string]string{"peer": "1", "path": "direct"}, 1},
		{"sfkit_proxy_peer_state", map[string]string{"peer": "1", "state": "direct"}, 1},
		{"sfkit_proxy_socks_requests_total", map[string]string{"target": "peer", "outcome": "ok"}, 1},
		{"sfkit_proxy_socks_requests_total", map[string]string{"target": "peer", "outcome": "not_allowed"}, 1},
		{"sfkit_proxy_holepunch_checks_total", map[string]string{"outcome": "answered"}, 1},
		{"sfkit_proxy_stun_refreshes_total", map[string]string{"outcome": "ok"}, 1},
		{"sfkit_proxy_registry_up", nil, 1},
		{"sfkit_proxy_peer_packet_size_bytes", map[string]string{"peer": "1"}, 1200},
		{"go_goroutines", nil, 1},
	}
	for _, c := range checks {
		if v, ok := value(mfs, c.name, c.labels); !ok || v < c.min {
			t.Errorf("%s%v = %v (present %v); want at least %v", c.name, c.labels, v, ok, c.min)
		}
	}

	var out bytes.Buffer
	if err := run(ctx, []string{"ping", "1", "--count", "2", "--admin-listen", p0.Admin.String()}, &out, &out); err != nil {
		t.Fatalf("ping: %v", err)
	}
	if n := strings.Count(out.String(), "pong from party 1 via direct"); n != 2 {
		t.Errorf("ping output = %q; want 2 pongs via direct", out.String())
	}
	out.Reset()
	if err := run(ctx, []string{"status", "--admin-listen", p0.Admin.String()}, &out, &out); err != nil {
		t.Fatalf("status: %v", err)
	}
	for _, want := range []string{"party 0 of study lab", "PEER", "direct"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status table lacks %q:\n%s", want, out.String())
		}
	}

	// Party 1 goes away, then comes back.
	stop1()
	testkit.Eventually(t, "party 1 is no longer reported direct", func() bool {
		s, _ := api.Status(ctx)
		p, ok := peerOf(s, 1)
		return !ok || p.State != "direct"
	})
	l.party(1)
	testkit.Eventually(t, "party 1 is direct again", func() bool {
		s, _ := api.Status(ctx)
		p, ok := peerOf(s, 1)
		return ok && p.State == "direct"
	})
	if resp, err := http.Get("http://" + p0.Admin.String() + "/readyz"); err != nil || resp.StatusCode != 200 {
		t.Errorf("/readyz = %v, %v; want 200", resp, err)
	}
}
