package admin

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"sfkit-proxy/gateway"
	"sfkit-proxy/status"
)

// Gateways is what the API needs of the sidecar's gateways
// (*gateway.Manager).
type Gateways interface {
	Add(gateway.Spec) (status.Gateway, error)
	Remove(proto string, listen netip.AddrPort, drain bool) error
	Get(proto string, listen netip.AddrPort) (status.Gateway, error)
	List() []status.Gateway
}

// GatewayRequest is the body of POST /v1/gateways/{proto}/{addr}.
type GatewayRequest struct {
	PID         int      `json:"pid"`
	Port        uint16   `json:"port"`
	Label       string   `json:"label,omitempty"`
	AllowFrom   []string `json:"allow_from,omitempty"`
	ConnRate    float64  `json:"conn_rate,omitempty"`
	MaxConns    int      `json:"max_conns,omitempty"`
	IdleTimeout string   `json:"idle_timeout,omitempty"` // a Go duration: "10m"
}

// gatewayRoutes serves /v1/gateways: list, add, get and remove. Adding and
// removing need the action header, as ping does.
func gatewayRoutes(mux *http.ServeMux, gws Gateways) {
	mux.HandleFunc("GET /v1/gateways", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, gws.List())
	})
	mux.HandleFunc("GET /v1/gateways/{proto}/{addr}", func(w http.ResponseWriter, r *http.Request) {
		proto, ap, ok := pathTarget(w, r)
		if !ok {
			return
		}
		g, err := gws.Get(proto, ap)
		if err != nil {
			gatewayError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, g)
	})
	mux.HandleFunc("POST /v1/gateways/{proto}/{addr}", func(w http.ResponseWriter, r *http.Request) {
		if !actionAllowed(w, r) {
			return
		}
		proto, ap, ok := pathTarget(w, r)
		if !ok {
			return
		}
		var req GatewayRequest
		dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "body: " + err.Error() + `: want {"pid": N, "port": P} and optional label, allow_from, conn_rate, max_conns, idle_timeout`})
			return
		}
		spec := gateway.Spec{Proto: proto, Listen: ap, PID: req.PID, Port: req.Port, Label: req.Label, Source: "api",
			ConnRate: req.ConnRate, MaxConns: req.MaxConns}
		for _, s := range req.AllowFrom {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": "allow_from " + s + ": want a CIDR such as 203.0.113.0/24"})
				return
			}
			spec.AllowFrom = append(spec.AllowFrom, p.Masked())
		}
		if req.IdleTimeout != "" {
			d, err := time.ParseDuration(req.IdleTimeout)
			if err != nil || d < 0 {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": "idle_timeout " + req.IdleTimeout + ": want a duration such as 10m"})
				return
			}
			spec.IdleTimeout = d
		}
		g, err := gws.Add(spec)
		if err != nil {
			gatewayError(w, err)
			return
		}
		writeJSON(w, http.StatusCreated, g)
	})
	mux.HandleFunc("DELETE /v1/gateways/{proto}/{addr}", func(w http.ResponseWriter, r *http.Request) {
		if !actionAllowed(w, r) {
			return
		}
		proto, ap, ok := pathTarget(w, r)
		if !ok {
			return
		}
		drain := r.URL.Query().Get("drain") != "false"
		if err := gws.Remove(proto, ap, drain); err != nil {
			gatewayError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"removed": gateway.Key(proto, ap), "drain": drain})
	})
}

// ProbeRequest is the body of PUT /v1/probes/{proto}/{addr}.
type ProbeRequest struct {
	Requester string `json:"requester"` // an IP or a CIDR: who may read the token
	Token     string `json:"token"`
	TTL       string `json:"ttl,omitempty"` // a Go duration, at most 10m; default 1m
}

// probeRoutes serves /v1/probes: open, list, close.
func probeRoutes(mux *http.ServeMux, ps *gateway.Probes) {
	mux.HandleFunc("GET /v1/probes", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, ps.List())
	})
	mux.HandleFunc("PUT /v1/probes/{proto}/{addr}", func(w http.ResponseWriter, r *http.Request) {
		if !actionAllowed(w, r) {
			return
		}
		proto, ap, ok := pathTarget(w, r)
		if !ok {
			return
		}
		var req ProbeRequest
		dec := json.NewDecoder(io.LimitReader(r.Body, 16<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "body: " + err.Error() + `: want {"requester": "IP or CIDR", "token": "…"} and optional ttl`})
			return
		}
		spec := gateway.ProbeSpec{Proto: proto, Listen: ap, Token: req.Token}
		if p, err := parsePrefixOrAddr(req.Requester); err == nil {
			spec.Requester = []netip.Prefix{p}
		} else {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "requester " + strconv.Quote(req.Requester) + ": want an IP or a CIDR"})
			return
		}
		if req.TTL != "" {
			var err error
			if spec.TTL, err = time.ParseDuration(req.TTL); err != nil {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": "ttl " + strconv.Quote(req.TTL) + ": want a duration such as 2m"})
				return
			}
		}
		p, err := ps.Open(spec)
		if err != nil {
			gatewayError(w, err)
			return
		}
		writeJSON(w, http.StatusCreated, p)
	})
	mux.HandleFunc("DELETE /v1/probes/{proto}/{addr}", func(w http.ResponseWriter, r *http.Request) {
		if !actionAllowed(w, r) {
			return
		}
		proto, ap, ok := pathTarget(w, r)
		if !ok {
			return
		}
		if err := ps.Remove(proto, ap); err != nil {
			gatewayError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"removed": gateway.Key(proto, ap)})
	})
}

func parsePrefixOrAddr(s string) (netip.Prefix, error) {
	if a, err := netip.ParseAddr(s); err == nil {
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	return p.Masked(), err
}

// pathTarget reads a gateway's or a probe's {proto}/{addr} from the path,
// answering 400 when addr is not [IP:]PORT.
func pathTarget(w http.ResponseWriter, r *http.Request) (string, netip.AddrPort, bool) {
	ap, err := gateway.ParseAddr(r.PathValue("addr"))
	if err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
		return "", netip.AddrPort{}, false
	}
	return r.PathValue("proto"), ap, true
}

// actionAllowed refuses a request that changes the sidecar without the
// action header.
func actionAllowed(w http.ResponseWriter, r *http.Request) bool {
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil && !ap.Addr().Unmap().IsLoopback() {
		// With --admin-any-host others may read the status; only this
		// machine may act (ping, add or remove gateways and probes).
		writeJSON(w, http.StatusForbidden, map[string]string{"error": "actions are taken only from this machine (a loopback address), even with --admin-any-host"})
		return false
	}
	if r.Header.Get(ActionHeader) == "" {
		writeJSON(w, http.StatusForbidden, map[string]string{"error": "missing " + ActionHeader + " header: actions are refused without it (sfkit-proxy sets it)"})
		return false
	}
	return true
}

// gatewayError answers err from the gateways with its status code.
func gatewayError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	switch {
	case errors.Is(err, gateway.ErrBadSpec):
		code = http.StatusBadRequest
	case errors.Is(err, gateway.ErrNoConsent):
		code = http.StatusForbidden
	case errors.Is(err, gateway.ErrNotFound):
		code = http.StatusNotFound
	case errors.Is(err, gateway.ErrExists), errors.Is(err, gateway.ErrInUse), errors.Is(err, gateway.ErrTooMany):
		code = http.StatusConflict
	case errors.Is(err, gateway.ErrClosed):
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, map[string]string{"error": err.Error()})
}
