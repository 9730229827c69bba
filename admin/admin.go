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

	"sfkit-proxy/gateway"
	"sfkit-proxy/status"
)

// Options configure the API. Status and Ping are required.
type Options struct {
	// Logger; nil discards.
	Logger *slog.Logger
	Status func() status.Status
	// Ping measures one round trip through the tunnel to pid.
	Ping func(ctx context.Context, pid int) (rtt time.Duration, path, addr string, err error)
	// Ready returns nil once the sidecar is registered and STUN is done.
	Ready func() error
	// Debug serves Go profiles under /debug/pprof/.
	Debug bool
	// Gateways, when set, are served under /v1/gateways.
	Gateways Gateways
	// Probes, when set, are served under /v1/probes.
	Probes *gateway.Probes
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
		if !actionAllowed(w, r) {
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
		res := status.PingResult{PID: pid}
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
	if opts.Gateways != nil {
		gatewayRoutes(mux, opts.Gateways)
	}
	if opts.Probes != nil {
		probeRoutes(mux, opts.Probes)
	}
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
