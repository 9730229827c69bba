package sidecar

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"sfkit-proxy/admin"
	"sfkit-proxy/config"
	"sfkit-proxy/relay"
	"sfkit-proxy/status"
	"sfkit-proxy/stun"
)

// NetReport is what netcheck found.
type NetReport struct {
	// UDP says whether any STUN server answered over UDP.
	UDP bool `json:"udp"`
	// External is this socket's address as the first server saw it.
	External string `json:"external,omitempty"`
	// NAT is the mapping behaviour (stun.NAT*), or "none" when the
	// external address is one of this host's own (a public address).
	NAT string `json:"nat"`
	// Servers are the STUN servers' answers, in the order asked.
	Servers []ServerAnswer `json:"servers"`
	// Relays are the TURN relays tried, when some are configured.
	Relays []RelayAnswer `json:"relays,omitempty"`
	// Expect is what path to expect to a peer, by the peer's kind.
	Expect map[string]string `json:"expect"`
	// Peers are the running sidecar's peers, with what to expect to each
	// and the path it has now; none when no sidecar answers.
	Peers []PeerExpect `json:"peers,omitempty"`
	// Advice is one line: what to do, if anything.
	Advice string `json:"advice"`
}

// ServerAnswer is one STUN server's answer.
type ServerAnswer struct {
	Server string `json:"server"`
	Mapped string `json:"mapped,omitempty"`
	Error  string `json:"error,omitempty"`
}

// RelayAnswer is one TURN relay's allocation attempt.
type RelayAnswer struct {
	Relay     string `json:"relay"`
	Allocated string `json:"allocated,omitempty"`
	Error     string `json:"error,omitempty"`
}

// PeerExpect is what to expect to one peer of the running sidecar.
type PeerExpect struct {
	PID    int    `json:"pid"`
	NAT    string `json:"nat"`    // what it published: none (public), endpoint-independent, endpoint-dependent or unknown
	Expect string `json:"expect"` // the path to expect
	Now    string `json:"now"`    // its state, and the path it has now
}

// NATNone is netcheck's name for no NAT at all: the address STUN sees is
// the host's own.
const NATNone = "none"

// Netcheck tells what the network lets a sidecar do here, and prints it.
func Netcheck(ctx context.Context, cfg *config.Netcheck, out io.Writer) error {
	r, err := netcheck(ctx, cfg)
	if err != nil {
		return err
	}
	if cfg.JSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	printReport(out, r)
	return nil
}

func netcheck(ctx context.Context, cfg *config.Netcheck) (NetReport, error) {
	network := "udp4"
	if cfg.UDPListen.Addr().Is6() && !cfg.UDPListen.Addr().Is4In6() {
		network = "udp6"
	}
	pc, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(cfg.UDPListen))
	if err != nil {
		return NetReport{}, fmt.Errorf("udp listen %v: %w", cfg.UDPListen, err)
	}
	defer pc.Close()
	c := stun.NewClient(pc)
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if m, err := stun.Parse(buf[:n]); err == nil {
				c.Handle(m, netip.AddrPortFrom(from.Addr().Unmap(), from.Port()))
			}
		}
	}()
	r := NetReport{NAT: stun.NATUnknown}
	// Each server in turn, until two answered: two mapped addresses tell
	// the mapping behaviour.
	// Two rounds, so that one lost answer does not make a verdict.
	var mapped []netip.AddrPort
	for round := range 2 {
		for i, s := range cfg.STUN {
			if len(mapped) == 2 {
				break
			}
			if round == 1 && (i >= len(r.Servers) || r.Servers[i].Error == "") {
				continue // answered, or not asked
			}
			a := ServerAnswer{Server: s}
			bctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			m, err := bindTo(bctx, c, network, s)
			cancel()
			if err != nil {
				a.Error = err.Error()
			} else {
				a.Mapped = m.String()
				mapped = append(mapped, m)
			}
			if round == 0 {
				r.Servers = append(r.Servers, a)
			} else {
				r.Servers[i] = a
			}
		}
		if len(mapped) == 2 || len(mapped) == 0 {
			break // a verdict, or UDP does not get out
		}
	}
	if len(mapped) > 0 {
		r.UDP, r.External = true, mapped[0].String()
		switch {
		case isLocal(mapped[0].Addr()):
			r.NAT = NATNone
		case len(mapped) == 2 && mapped[0] == mapped[1]:
			r.NAT = stun.NATEndpointIndependent
		case len(mapped) == 2:
			r.NAT = stun.NATEndpointDependent
		}
	}
	turnOK := false
	if len(cfg.Relays) > 0 {
		o, err := relayOptions(cfg.RelayFlags, slog.New(slog.DiscardHandler))
		if err != nil {
			return r, err
		}
		for _, u := range o.URLs {
			a := RelayAnswer{Relay: u.String()}
			one := o
			one.URLs = []relay.URL{u}
			al, err := relay.Allocate(ctx, one)
			if err != nil {
				a.Error = err.Error()
			} else {
				a.Allocated = al.Addr.String()
				al.Conn.Close()
				turnOK = true
			}
			r.Relays = append(r.Relays, a)
		}
	}
	r.Expect, r.Advice = expect(r, turnOK, len(cfg.Relays) > 0)
	if cfg.Admin != "" {
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := (&admin.Client{Addr: cfg.Admin}).Status(actx)
		cancel()
		if err == nil {
			r.Peers = peerExpectations(r, st.Peers)
		}
	}
	return r, nil
}

// peerExpectations is what to expect to each of peers, by what each
// published of its NAT, beside its path now.
func peerExpectations(r NetReport, peers []status.Peer) []PeerExpect {
	var out []PeerExpect
	for _, p := range peers {
		e := PeerExpect{PID: p.PID, NAT: p.NAT, Now: p.State}
		switch p.NAT {
		case NATNone:
			e.Expect = r.Expect["public"]
		case stun.NATEndpointIndependent:
			e.Expect = r.Expect["endpoint-independent NAT"]
		case stun.NATEndpointDependent:
			e.Expect = r.Expect["endpoint-dependent NAT"]
		default:
			e.NAT, e.Expect = stun.NATUnknown, "unknown: it published no NAT kind (the sfkit website carries none)"
		}
		if p.Via != "" {
			e.Now += " via " + p.Via
		} else if p.Path != "" {
			e.Now += " " + p.RemoteAddr
		}
		out = append(out, e)
	}
	return out
}

// bindTo asks STUN server s (host:port) for the mapped address.
func bindTo(ctx context.Context, c *stun.Client, network, s string) (netip.AddrPort, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return netip.AddrPort{}, err
	}
	family := "ip4"
	if network == "udp6" {
		family = "ip6"
	}
	ips, err := net.DefaultResolver.LookupNetIP(ctx, family, host)
	if err != nil || len(ips) == 0 {
		return netip.AddrPort{}, fmt.Errorf("resolve %s: %v", host, err)
	}
	ap, err := netip.ParseAddrPort(net.JoinHostPort(ips[0].Unmap().String(), port))
	if err != nil {
		return netip.AddrPort{}, err
	}
	m, err := c.Bind(ctx, ap)
	if errors.Is(err, context.DeadlineExceeded) {
		err = errors.New("no answer")
	}
	return m, err
}

// isLocal reports whether ip is one of this host's interface addresses.
func isLocal(ip netip.Addr) bool {
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Unmap() == ip {
			return true
		}
	}
	return false
}

// Peer kinds, for NetReport.Expect.
var peerKinds = []string{"public", "endpoint-independent NAT", "endpoint-dependent NAT"}

// expect says what path to expect to each kind of peer, and what to do.
func expect(r NetReport, turnOK, turnGiven bool) (map[string]string, string) {
	relayed := "a peer relay (another party that reaches both), or TURN"
	if turnOK {
		relayed = "TURN, or a peer relay"
	}
	e := map[string]string{}
	switch r.NAT {
	case NATNone:
		for _, k := range peerKinds {
			e[k] = "direct"
		}
	case stun.NATEndpointIndependent:
		e["public"], e["endpoint-independent NAT"], e["endpoint-dependent NAT"] = "direct", "direct", relayed
	case stun.NATEndpointDependent:
		e["public"], e["endpoint-independent NAT"], e["endpoint-dependent NAT"] = "direct", relayed, relayed
	default:
		for _, k := range peerKinds {
			e[k] = "unknown"
		}
	}
	var advice string
	switch {
	case !r.UDP && turnOK:
		advice = "UDP does not get out, but a TURN relay answers: peers are reached through it"
	case !r.UDP:
		advice = "do: UDP does not get out (or no STUN server answers): give a TURN relay over TCP or TLS, --relay turns:HOST:5349"
		if turnGiven {
			advice = "do: UDP does not get out and no TURN relay answers: check the relay's address and credentials, or use turns:HOST:5349"
		}
	case turnGiven && !turnOK:
		advice = "do: no TURN relay answers: check its address and credentials (direct paths and peer relays still work)"
	case r.NAT == stun.NATEndpointDependent && !turnOK:
		advice = "nothing to do if another party of the study is public or behind an endpoint-independent NAT: it relays (peer relays are on); " +
			"if every party is behind an endpoint-dependent NAT, give a TURN relay (--relay)"
	case r.NAT == stun.NATUnknown:
		advice = "do: only one STUN server answered; give two (--stun A,B) to tell the NAT's behaviour"
	default:
		advice = "nothing to do"
	}
	return e, advice
}

func printReport(w io.Writer, r NetReport) {
	udp := "yes"
	if !r.UDP {
		udp = "no (no STUN server answered)"
	}
	fmt.Fprintf(w, "UDP:      %s\n", udp)
	if r.External != "" {
		fmt.Fprintf(w, "external: %s\n", r.External)
	}
	nat := r.NAT
	switch r.NAT {
	case NATNone:
		nat = "none: a public address"
	case stun.NATEndpointIndependent:
		nat = "endpoint-independent mapping (a \"cone\" NAT: punching works with most peers)"
	case stun.NATEndpointDependent:
		nat = "endpoint-dependent mapping (a \"symmetric\" NAT: a new port per destination)"
	}
	fmt.Fprintf(w, "NAT:      %s\n", nat)
	for _, s := range r.Servers {
		if s.Error != "" {
			fmt.Fprintf(w, "  stun %s: %s\n", s.Server, s.Error)
		} else {
			fmt.Fprintf(w, "  stun %s: %s\n", s.Server, s.Mapped)
		}
	}
	for _, t := range r.Relays {
		if t.Error != "" {
			fmt.Fprintf(w, "TURN %s: no allocation: %s\n", t.Relay, t.Error)
		} else {
			fmt.Fprintf(w, "TURN %s: allocated %s\n", t.Relay, t.Allocated)
		}
	}
	fmt.Fprintln(w, "paths to expect:")
	for _, k := range peerKinds {
		who := "a peer behind an " + k
		if k == "public" {
			who = "a public peer"
		}
		fmt.Fprintf(w, "  to %s: %s\n", who, r.Expect[k])
	}
	if len(r.Peers) > 0 {
		fmt.Fprintln(w, "peers of the running sidecar:")
		for _, p := range r.Peers {
			fmt.Fprintf(w, "  party %d (NAT %s): expect %s; now %s\n", p.PID, p.NAT, p.Expect, p.Now)
		}
	}
	fmt.Fprintln(w, r.Advice)
}
