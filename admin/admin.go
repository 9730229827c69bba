// Package admin is the sidecar's local management API: status as JSON,
// Prometheus metrics, health and readiness, and a ping through the tunnel;
// and the client that `sfkit-proxy status` and `sfkit-proxy ping` use.
package admin

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Status is what GET /v1/status returns.
type Status struct {
	Study        string         `json:"study"`
	PID          int            `json:"pid"`
	VirtualAddr  string         `json:"virtual_addr"`
	SOCKS        string         `json:"socks"`
	ExternalAddr string         `json:"external_addr,omitempty"`
	NAT          string         `json:"nat"`
	Registry     RegistryStatus `json:"registry"`
	STUN         STUNStatus     `json:"stun"`
	Peers        []Peer         `json:"peers"`
	Counters     Counters       `json:"counters"`
}

// RegistryStatus says whether the registry is reachable.
type RegistryStatus struct {
	URL       string `json:"url"`
	Reachable bool   `json:"reachable"`
	Published bool   `json:"published"`
	LastError string `json:"last_error,omitempty"`
}

// STUNStatus says what STUN learned and how often it worked.
type STUNStatus struct {
	Done           bool   `json:"done"`
	LastError      string `json:"last_error,omitempty"`
	Refreshes      uint64 `json:"refreshes"`
	Failures       uint64 `json:"failures"`
	MappingChanges uint64 `json:"mapping_changes"`
}

// Peer is one other party as this sidecar sees it. Rates are bytes per
// second: current (the last few seconds), average (since the first
// connection) and the largest one-second sample.
type Peer struct {
	PID            int        `json:"pid"`
	State          string     `json:"state"`
	Path           string     `json:"path,omitempty"`
	Via            string     `json:"via,omitempty"` // the relay, when relayed
	RemoteAddr     string     `json:"remote_addr,omitempty"`
	RTTMillis      float64    `json:"rtt_ms"`
	ConnectedSince *time.Time `json:"connected_since,omitempty"`
	OpenConns      int64      `json:"open_conns"`
	QUICConns      int        `json:"quic_conns"` // the pool that carries them
	// WaitingConns are the peer's connections waiting here for a local
	// program to listen on their port.
	WaitingConns  int           `json:"waiting_conns"`
	BytesSent     uint64        `json:"bytes_sent"`
	BytesReceived uint64        `json:"bytes_received"`
	Rate          Rates         `json:"rate"`
	LastError     string        `json:"last_error,omitempty"`
	Traffic       []PathTraffic `json:"traffic,omitempty"`
	// StateSince is when the state began: for repairing, when the path died.
	StateSince *time.Time `json:"state_since,omitempty"`
	// Repairs counts paths repaired; LastRepairSeconds is how long the last took.
	Repairs           uint64  `json:"repairs"`
	LastRepairSeconds float64 `json:"last_repair_seconds,omitempty"`
}

// Rates in bytes per second.
type Rates struct {
	CurrentSent     float64 `json:"current_sent"`
	CurrentReceived float64 `json:"current_received"`
	AverageSent     float64 `json:"average_sent"`
	AverageReceived float64 `json:"average_received"`
	MaxSent         float64 `json:"max_sent"`
	MaxReceived     float64 `json:"max_received"`
}

// PathTraffic is a peer's traffic over one kind of path.
type PathTraffic struct {
	Path          string `json:"path"`
	Conns         uint64 `json:"conns"`
	BytesSent     uint64 `json:"bytes_sent"`
	BytesReceived uint64 `json:"bytes_received"`
}

// Counters are event counts since start.
type Counters struct {
	DialsOK         uint64 `json:"dials_ok"`
	DialsFailed     uint64 `json:"dials_failed"`
	AcceptsOK       uint64 `json:"accepts_ok"`
	AcceptsRejected uint64 `json:"accepts_rejected"`
	ChecksSent      uint64 `json:"checks_sent"`
	ChecksAnswered  uint64 `json:"checks_answered"`
	// SOCKS counts CONNECT requests by "target/outcome", e.g. "peer/ok",
	// "direct/refused".
	SOCKS map[string]uint64 `json:"socks"`
	// FlowsResumed counts tunnelled connections carried on over a new
	// connection; FlowsReset counts resets by reason.
	FlowsResumed uint64            `json:"flows_resumed"`
	FlowsReset   map[string]uint64 `json:"flows_reset"`
	// FlowsMoved counts tunnelled connections moved between the QUIC
	// connections of a peer's pool; PoolConnsOpened counts the pool's
	// connections opened (dialer) or accepted.
	FlowsMoved      uint64 `json:"flows_moved"`
	PoolConnsOpened uint64 `json:"pool_conns_opened"`
}

// PingResult is what POST /v1/ping returns.
type PingResult struct {
	PID        int       `json:"pid"`
	Path       string    `json:"path"`
	RemoteAddr string    `json:"remote_addr"`
	RTTMillis  []float64 `json:"rtt_ms"`
}

// Options configure the API. Status and Ping are required.
type Options struct {
	// Logger; nil discards.
	Logger *slog.Logger
	Status func() Status
	// Ping measures one round trip through the tunnel to pid.
	Ping func(ctx context.Context, pid int) (rtt time.Duration, path, addr string, err error)
	// Ready returns nil once the sidecar is registered and STUN is done.
	Ready func() error
	// Debug serves Go profiles under /debug/pprof/.
	Debug bool
}

// ActionHeader must be set, to any value, on requests that make the sidecar
// send traffic (POST /v1/ping). A web page cannot set it on a simple
// cross-site request, and the API answers no CORS preflight.
const ActionHeader = "X-Sfkit-Proxy"

// NewHandler returns the API's handler, with a Prometheus registry of its own.
func NewHandler(opts Options) http.Handler {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collector{status: opts.Status},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, opts.Status())
	})
	mux.HandleFunc("POST /v1/ping", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get(ActionHeader) == "" {
			writeJSON(w, http.StatusForbidden, map[string]string{"error": "missing " + ActionHeader + " header: actions are refused without it (sfkit-proxy ping sets it)"})
			return
		}
		pid, err := strconv.Atoi(r.URL.Query().Get("pid"))
		if err != nil || pid < 0 {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "pid must be a party id, 0 or more"})
			return
		}
		count := 3
		if c := r.URL.Query().Get("count"); c != "" {
			if count, err = strconv.Atoi(c); err != nil || count < 1 || count > 100 {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": "count must be 1 to 100"})
				return
			}
		}
		ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		defer cancel()
		res := PingResult{PID: pid}
		for range count {
			rtt, path, addr, err := opts.Ping(ctx, pid)
			if err != nil {
				writeJSON(w, http.StatusBadGateway, map[string]string{"error": err.Error()})
				return
			}
			res.Path, res.RemoteAddr = path, addr
			res.RTTMillis = append(res.RTTMillis, float64(rtt.Microseconds())/1000)
		}
		writeJSON(w, http.StatusOK, res)
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(opts.Logger.Handler(), slog.LevelWarn)}))
	if opts.Debug {
		// Profiles, for performance work, only when asked for (--admin-debug).
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	}
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if opts.Ready != nil {
			if err := opts.Ready(); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		w.Write([]byte("ready\n"))
	})
	return localOnly(mux)
}

// localOnly answers only requests that name this machine and come from no
// other site's page. Host must be localhost, a loopback address, or the
// address the connection arrived on (the API's own, when --admin-any-host
// binds it elsewhere): a page that rebinds its own DNS name to 127.0.0.1
// sends its name, and gets nothing. An Origin, when sent, must be localhost
// or a loopback address: a page served from anywhere else, or a sandboxed
// one ("null"), gets nothing either.
func localOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		local, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
		if !localHost(r.Host, local) {
			writeJSON(w, http.StatusForbidden, map[string]string{"error": "host " + strconv.Quote(r.Host) + " not allowed: use localhost, 127.0.0.1 or the address the request was sent to"})
			return
		}
		if o := r.Header.Get("Origin"); o != "" {
			u, err := url.Parse(o)
			if err != nil || !localHost(u.Host, nil) {
				writeJSON(w, http.StatusForbidden, map[string]string{"error": "cross-origin requests are refused"})
				return
			}
		}
		h.ServeHTTP(w, r)
	})
}

// localHost reports whether host (a Host header, or an Origin's host; with
// or without a port, IPv6 in brackets) names this machine: localhost, a
// loopback address, or local, the address the request arrived on (nil for
// none).
func localHost(host string, local net.Addr) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	} else if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		host = host[1 : len(host)-1]
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return false
	}
	ip = ip.Unmap().WithZone("")
	if ip.IsLoopback() {
		return true
	}
	if ta, ok := local.(*net.TCPAddr); ok {
		if la, ok := netip.AddrFromSlice(ta.IP); ok {
			return ip == la.Unmap()
		}
	}
	return false
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
