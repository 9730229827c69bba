package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"sfkit-proxy/config"
	"sfkit-proxy/gateway"
	"sfkit-proxy/status"
)

// RunClient runs `sfkit-proxy status` or `sfkit-proxy ping` (cmd): prints
// the status of a running sidecar, or pings through it, to stdout, as a
// table or as JSON.
func RunClient(ctx context.Context, cmd string, cfg *config.AdminClient, stdout io.Writer) error {
	c := &Client{Addr: cfg.Addr}
	if cmd == "ping" {
		r, err := c.Ping(ctx, cfg.PID, cfg.Count)
		if err != nil {
			return fmt.Errorf("ping party %d: %w", cfg.PID, err)
		}
		if cfg.JSON {
			return json.NewEncoder(stdout).Encode(r)
		}
		for _, ms := range r.RTTMillis {
			fmt.Fprintf(stdout, "pong from party %d via %s %s: time=%.2f ms\n", r.PID, r.Path, r.RemoteAddr, ms)
		}
		return nil
	}
	s, err := c.Status(ctx)
	if err != nil {
		return err
	}
	if cfg.JSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(s)
	}
	PrintStatus(stdout, s)
	return nil
}

// Client reads a sidecar's API at Addr (host:port).
type Client struct {
	Addr string
	HTTP *http.Client // nil means a client with a 15 s timeout
}

// do sends a request (GET, or another method with the action header, and
// body as JSON when not nil) and decodes the JSON answer into v.
func (c *Client) do(ctx context.Context, method, path string, q url.Values, body, v any) error {
	hc := c.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: 15 * time.Second}
	}
	addr := c.Addr
	if ap, err := netip.ParseAddrPort(addr); err == nil && ap.Addr().IsUnspecified() {
		// 0.0.0.0 or :: means every address: ask this machine's loopback
		// (the API answers only a Host of this machine).
		addr = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), ap.Port()).String()
	}
	u := url.URL{Scheme: "http", Host: addr, Path: path, RawQuery: q.Encode()}
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if method != http.MethodGet {
		req.Header.Set(ActionHeader, "1")
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("no sidecar API at %s (is sfkit-proxy running? set --admin-listen): %w", c.Addr, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var e struct{ Error string }
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s", e.Error)
		}
		return fmt.Errorf("sidecar API answered %s", resp.Status)
	}
	return json.Unmarshal(b, v)
}

// Status fetches the status.
func (c *Client) Status(ctx context.Context) (status.Status, error) {
	var s status.Status
	err := c.do(ctx, http.MethodGet, "/v1/status", nil, nil, &s)
	return s, err
}

// Ping asks the sidecar to ping pid count times.
func (c *Client) Ping(ctx context.Context, pid, count int) (status.PingResult, error) {
	var r status.PingResult
	err := c.do(ctx, http.MethodPost, "/v1/ping", url.Values{"pid": {strconv.Itoa(pid)}, "count": {strconv.Itoa(count)}}, nil, &r)
	return r, err
}

// AddGateway asks the sidecar for a gateway on listen ([IP:]PORT).
func (c *Client) AddGateway(ctx context.Context, proto, listen string, req GatewayRequest) (status.Gateway, error) {
	var g status.Gateway
	err := c.do(ctx, http.MethodPost, "/v1/gateways/"+url.PathEscape(proto)+"/"+url.PathEscape(listen), nil, req, &g)
	return g, err
}

// PrintStatus writes s as a table.
func PrintStatus(w io.Writer, s status.Status) {
	reg := "reachable"
	if !s.Registry.Reachable {
		reg = "UNREACHABLE: " + s.Registry.LastError
	}
	ext := s.ExternalAddr
	if ext == "" {
		ext = "unknown (" + s.STUN.LastError + ")"
	}
	fmt.Fprintf(w, "party %d of study %s at %s; socks %s\n", s.PID, s.Study, s.VirtualAddr, s.SOCKS)
	relay := "peer relay off"
	if s.PeerRelay.Enabled {
		relay = fmt.Sprintf("peer relay on, relaying %d sessions (%s so far)", s.PeerRelay.Sessions, bytesText(float64(s.PeerRelay.BytesForwarded)))
	}
	fmt.Fprintf(w, "external %s, NAT %s; registry %s; %s\n\n", ext, s.NAT, reg, relay)
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tSTATE\tREMOTE\tRTT\tCONNS\tQUIC\tWAITING\tSENT\tRECEIVED\tRATE OUT (now/avg/max)\tRATE IN (now/avg/max)\tLAST ERROR")
	for _, p := range s.Peers {
		state := p.State
		if p.Via != "" {
			state += " via " + p.Via
		}
		if p.State == "repairing" && p.StateSince != nil {
			state += fmt.Sprintf(" (%s)", time.Since(*p.StateSince).Round(time.Second))
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%.2fms\t%d\t%d\t%d\t%s\t%s\t%s\t%s\t%s\n", p.PID, state, dash(p.RemoteAddr), p.RTTMillis,
			p.OpenConns, p.QUICConns, p.WaitingConns, bytesText(float64(p.BytesSent)), bytesText(float64(p.BytesReceived)),
			rates(p.Rate.CurrentSent, p.Rate.AverageSent, p.Rate.MaxSent),
			rates(p.Rate.CurrentReceived, p.Rate.AverageReceived, p.Rate.MaxReceived), dash(p.LastError))
	}
	tw.Flush()
	if len(s.PeerRelay.Relaying) > 0 {
		fmt.Fprintln(w, "\nrelaying for the others:")
		tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "BETWEEN\tSINCE\tA→B\tB→A\tRATE A→B / B→A (avg)")
		for _, r := range s.PeerRelay.Relaying {
			fmt.Fprintf(tw, "%d and %d\t%s\t%s\t%s\t%s / %s\n", r.A, r.B, time.Since(r.Since).Round(time.Second),
				bytesText(float64(r.BytesAB)), bytesText(float64(r.BytesBA)), bytesText(r.RateAB)+"/s", bytesText(r.RateBA)+"/s")
		}
		tw.Flush()
	}
	if len(s.Gateways) > 0 {
		fmt.Fprintln(w, "\ngateways:")
		PrintGateways(w, s.Gateways)
	}
	if u := s.UDP; u.Sent+u.Served+u.Received+u.Answered > 0 || u.Associations > 0 {
		var dropped []string
		for _, k := range slices.Sorted(maps.Keys(u.Dropped)) {
			dropped = append(dropped, fmt.Sprintf("%s=%d", k, u.Dropped[k]))
		}
		fmt.Fprintf(w, "\nudp: %d associations here, %d peers' sockets; sent %d (%s), received %d (%s); served peers %d (%s), answered %d (%s); dropped %s\n",
			u.Associations, u.PeerSockets, u.Sent, bytesText(float64(u.SentBytes)), u.Received, bytesText(float64(u.ReceivedBytes)),
			u.Served, bytesText(float64(u.ServedBytes)), u.Answered, bytesText(float64(u.AnsweredBytes)), dash(strings.Join(dropped, " ")))
	}
}

// PrintGateways writes gateways as a table, then their open connections.
func PrintGateways(w io.Writer, gws []status.Gateway) {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GATEWAY	TO	SOURCE	LIMITS	CONNS	OPEN	SENT	RECEIVED	RATE OUT (now/avg/max)	RATE IN (now/avg/max)	REFUSED	LABEL")
	for _, g := range gws {
		limits := fmt.Sprintf("max %d", g.MaxConns)
		if g.ConnRate > 0 {
			limits += fmt.Sprintf(", %g/s per source", g.ConnRate)
		}
		if g.IdleTimeout != "" {
			limits += ", idle " + g.IdleTimeout
		}
		if len(g.AllowFrom) > 0 {
			limits += ", from " + strings.Join(g.AllowFrom, " ")
		}
		where := g.Proto + "/" + g.Listen
		if g.Public {
			where += " (public)"
		}
		var refused []string
		for _, k := range slices.Sorted(maps.Keys(g.Refused)) {
			refused = append(refused, fmt.Sprintf("%s=%d", k, g.Refused[k]))
		}
		fmt.Fprintf(tw, "%s	party %d port %d	%s	%s	%d	%d	%s	%s	%s	%s	%s	%s\n", where, g.PID, g.Port, g.Source, limits,
			g.Conns, g.Open, bytesText(float64(g.BytesToPeer)), bytesText(float64(g.BytesFromPeer)),
			rates(g.Rate.CurrentSent, g.Rate.AverageSent, g.Rate.MaxSent),
			rates(g.Rate.CurrentReceived, g.Rate.AverageReceived, g.Rate.MaxReceived), dash(strings.Join(refused, " ")), dash(g.Label))
	}
	tw.Flush()
	var open []string
	for _, g := range gws {
		for _, c := range g.Connections {
			open = append(open, fmt.Sprintf("%s/%s	%s	%s	%s	%s	%s	%s", g.Proto, g.Listen, c.Client, time.Since(c.Since).Round(time.Second),
				bytesText(float64(c.BytesToPeer)), bytesText(float64(c.BytesFromPeer)),
				rates(c.Rate.CurrentSent, c.Rate.AverageSent, c.Rate.MaxSent), rates(c.Rate.CurrentReceived, c.Rate.AverageReceived, c.Rate.MaxReceived)))
		}
	}
	if len(open) > 0 {
		fmt.Fprintln(w, "\nopen connections:")
		tw = tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "GATEWAY	CLIENT	FOR	SENT	RECEIVED	RATE OUT (now/avg/max)	RATE IN (now/avg/max)")
		for _, l := range open {
			fmt.Fprintln(tw, l)
		}
		tw.Flush()
	}
}

// RunGateway runs `sfkit-proxy gateway add|list|rm`.
func RunGateway(ctx context.Context, cfg *config.GatewayClient, stdout io.Writer) error {
	c := &Client{Addr: cfg.Addr}
	switch cfg.Action {
	case "list":
		var gws []status.Gateway
		if err := c.do(ctx, http.MethodGet, "/v1/gateways", nil, nil, &gws); err != nil {
			return err
		}
		if cfg.JSON {
			return json.NewEncoder(stdout).Encode(gws)
		}
		if len(gws) == 0 {
			fmt.Fprintln(stdout, "no gateways")
			return nil
		}
		PrintGateways(stdout, gws)
		return nil
	case "add":
		req := GatewayRequest{PID: cfg.PID, Port: cfg.Port, Label: cfg.Label, AllowFrom: cfg.AllowFrom, ConnRate: cfg.ConnRate, MaxConns: cfg.MaxConns}
		if cfg.IdleTimeout > 0 {
			req.IdleTimeout = cfg.IdleTimeout.String()
		}
		g, err := c.AddGateway(ctx, cfg.Proto, cfg.Listen, req)
		if err != nil {
			return fmt.Errorf("gateway add %s %s: %w", cfg.Proto, cfg.Listen, err)
		}
		if cfg.JSON {
			return json.NewEncoder(stdout).Encode(g)
		}
		fmt.Fprintf(stdout, "gateway %s/%s to party %d port %d added\n", g.Proto, g.Listen, g.PID, g.Port)
		return nil
	default: // rm
		q := url.Values{}
		if !cfg.Drain {
			q.Set("drain", "false")
		}
		var r struct {
			Removed string `json:"removed"`
		}
		path := "/v1/gateways/" + url.PathEscape(cfg.Proto) + "/" + url.PathEscape(cfg.Listen)
		if err := c.do(ctx, http.MethodDelete, path, q, nil, &r); err != nil {
			return fmt.Errorf("gateway rm %s %s: %w", cfg.Proto, cfg.Listen, err)
		}
		fmt.Fprintf(stdout, "gateway %s removed\n", r.Removed)
		return nil
	}
}

// RunProbe runs `sfkit-proxy probe open|list|rm|check`.
func RunProbe(ctx context.Context, cfg *config.ProbeClient, stdout io.Writer) error {
	if cfg.Action == "check" {
		ap, err := netip.ParseAddrPort(cfg.Listen)
		if err != nil {
			return fmt.Errorf("probe check: address %q: want IP:PORT", cfg.Listen)
		}
		if err := gateway.Check(cfg.Proto, ap, cfg.Token, cfg.Timeout); err != nil {
			return fmt.Errorf("%s/%v %w", cfg.Proto, ap, err)
		}
		fmt.Fprintf(stdout, "%s/%v reachable: it answered with the token\n", cfg.Proto, ap)
		return nil
	}
	c := &Client{Addr: cfg.Addr}
	path := "/v1/probes/" + url.PathEscape(cfg.Proto) + "/" + url.PathEscape(cfg.Listen)
	switch cfg.Action {
	case "list":
		var ps []status.Probe
		if err := c.do(ctx, http.MethodGet, "/v1/probes", nil, nil, &ps); err != nil {
			return err
		}
		if cfg.JSON {
			return json.NewEncoder(stdout).Encode(ps)
		}
		if len(ps) == 0 {
			fmt.Fprintln(stdout, "no probes")
		}
		for _, p := range ps {
			fmt.Fprintf(stdout, "%s/%s for %s: %d answered, %d ignored, closes in %s\n", p.Proto, p.Listen,
				strings.Join(p.Requester, " "), p.Answered, p.Ignored, time.Until(p.Expires).Round(time.Second))
		}
		return nil
	case "open":
		req := ProbeRequest{Requester: cfg.Requester, Token: cfg.Token}
		if cfg.TTL > 0 {
			req.TTL = cfg.TTL.String()
		}
		var p status.Probe
		if err := c.do(ctx, http.MethodPut, path, nil, req, &p); err != nil {
			return fmt.Errorf("probe open %s %s: %w", cfg.Proto, cfg.Listen, err)
		}
		if cfg.JSON {
			return json.NewEncoder(stdout).Encode(p)
		}
		fmt.Fprintf(stdout, "probe %s/%s open for %s until %s\n", p.Proto, p.Listen, strings.Join(p.Requester, " "), p.Expires.Format(time.RFC3339))
		return nil
	default: // rm
		var r struct {
			Removed string `json:"removed"`
		}
		if err := c.do(ctx, http.MethodDelete, path, nil, nil, &r); err != nil {
			return fmt.Errorf("probe rm %s %s: %w", cfg.Proto, cfg.Listen, err)
		}
		fmt.Fprintf(stdout, "probe %s closed\n", r.Removed)
		return nil
	}
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func rates(now, avg, mx float64) string {
	return bytesText(now) + "/s " + bytesText(avg) + "/s " + bytesText(mx) + "/s"
}

func bytesText(b float64) string {
	switch {
	case b >= 1e9:
		return fmt.Sprintf("%.1fGB", b/1e9)
	case b >= 1e6:
		return fmt.Sprintf("%.1fMB", b/1e6)
	case b >= 1e3:
		return fmt.Sprintf("%.1fkB", b/1e3)
	}
	return fmt.Sprintf("%.0fB", b)
}
