package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"text/tabwriter"
	"time"

	"sfkit-proxy/config"
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

// do sends a request (GET, or POST with the action header) and decodes the
// JSON answer into v.
func (c *Client) do(ctx context.Context, method, path string, q url.Values, v any) error {
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
	req, err := http.NewRequestWithContext(ctx, method, u.String(), nil)
	if err != nil {
		return err
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
	if resp.StatusCode != http.StatusOK {
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
	err := c.do(ctx, http.MethodGet, "/v1/status", nil, &s)
	return s, err
}

// Ping asks the sidecar to ping pid count times.
func (c *Client) Ping(ctx context.Context, pid, count int) (status.PingResult, error) {
	var r status.PingResult
	err := c.do(ctx, http.MethodPost, "/v1/ping", url.Values{"pid": {strconv.Itoa(pid)}, "count": {strconv.Itoa(count)}}, &r)
	return r, err
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
