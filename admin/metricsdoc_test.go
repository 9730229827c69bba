package admin

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"sfkit-proxy/internal/docs"
	"sfkit-proxy/status"
)

// TestMetricsAreDocumented fails when the sidecar emits a metric that
// docs/operations.md's table does not list, when the table lists one it
// does not emit, or when an example alert rule uses one it does not emit.
// The status has every part that makes a series: a peer with traffic and a
// packet size, a relayed session, a SOCKS outcome, a reset reason and a
// gateway.
func TestMetricsAreDocumented(t *testing.T) {
	full := status.Status{
		Peers: []status.Peer{{PID: 1, State: "direct", PacketSize: 1452,
			Traffic: []status.PathTraffic{{Path: "direct", Conns: 1, BytesSent: 1, BytesReceived: 1}}}},
		Counters: status.Counters{SOCKS: map[string]uint64{"peer/ok": 1}, FlowsReset: map[string]uint64{"resume_timeout": 1}},
		PeerRelay: status.PeerRelay{Enabled: true, Sessions: 1,
			Relaying: []status.RelaySession{{A: 0, B: 2, BytesAB: 1, BytesBA: 1}}},
		Gateways: []status.Gateway{{Proto: "tcp", Listen: "127.0.0.1:9000", PID: 1, Port: 8000, Conns: 1, Refused: map[string]uint64{"rate": 1}}},
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collector{status: func() status.Status { return full }})
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var emitted []string
	for _, f := range families {
		emitted = append(emitted, f.GetName())
	}
	md, err := os.ReadFile("../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	row := regexp.MustCompile("(?m)^\\| `(sfkit_proxy_[a-z_]+)` \\|")
	var listed []string
	for _, m := range row.FindAllStringSubmatch(string(md), -1) {
		listed = append(listed, m[1])
	}
	for _, name := range emitted {
		if !slices.Contains(listed, name) {
			t.Errorf("the sidecar emits %s, which docs/operations.md's metrics table does not list: add a row", name)
		}
	}
	for _, name := range listed {
		if !slices.Contains(emitted, name) {
			t.Errorf("docs/operations.md's metrics table lists %s, which the sidecar does not emit", name)
		}
	}
	if !strings.Contains(string(md), "| `go_*`, `process_*` |") {
		t.Error("docs/operations.md's metrics table does not mention the go_* and process_* families")
	}
	blocks, err := docs.Parse(md)
	if err != nil {
		t.Fatal(err)
	}
	var rules int
	for _, b := range blocks {
		if b.Lang != "yaml" || !strings.Contains(b.Text, "alert:") {
			continue
		}
		for _, name := range regexp.MustCompile(`sfkit_proxy_[a-z_]+`).FindAllString(b.Text, -1) {
			rules++
			if !slices.Contains(emitted, name) {
				t.Errorf("an example alert rule in docs/operations.md uses %s, which the sidecar does not emit", name)
			}
		}
	}
	if rules == 0 {
		t.Error("docs/operations.md has no example alert rules using sfkit_proxy_ metrics")
	}
}
