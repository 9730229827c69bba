package gateway

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"sfkit-proxy/status"
)

// Probes keep temporary listeners that prove an address is reachable from
// outside, as GAP-22's probe API does: a probe on proto/addr answers a
// requester (a source in its CIDRs) with the token it was opened with, and
// nobody else with anything; it ends when removed or when its time is up.
// The other end is `sfkit-proxy probe check` (Check).
type Probes struct {
	anyHost bool
	now     func() time.Time
	wg      sync.WaitGroup

	mu     sync.Mutex // guards probes and closed
	probes map[string]*probe
	closed bool
}

// Probe limits.
const (
	MaxProbes       = 8
	DefaultProbeTTL = time.Minute
	MaxProbeTTL     = 10 * time.Minute
	maxTokenLen     = 128
)

// ProbeSpec is what a probe is asked to be.
type ProbeSpec struct {
	Proto     string // tcp or udp
	Listen    netip.AddrPort
	Requester []netip.Prefix // who gets the token; at least one
	Token     string
	TTL       time.Duration // zero: DefaultProbeTTL
}

// NewProbes returns Probes; anyHost allows them off loopback, as
// --gateway-any-host does gateways.
func NewProbes(anyHost bool) *Probes {
	return &Probes{anyHost: anyHost, now: time.Now, probes: make(map[string]*probe)}
}

type probe struct {
	spec     ProbeSpec
	key      string
	expires  time.Time
	closer   io.Closer
	answered atomic.Uint64
	ignored  atomic.Uint64
	timer    *time.Timer
}

// Open opens a probe.
func (ps *Probes) Open(spec ProbeSpec) (status.Probe, error) {
	if spec.Proto != "tcp" && spec.Proto != "udp" {
		return status.Probe{}, fmt.Errorf("%w: protocol %q: want tcp or udp", ErrBadSpec, spec.Proto)
	}
	if !spec.Listen.IsValid() || spec.Listen.Port() == 0 {
		return status.Probe{}, fmt.Errorf("%w: no listen address", ErrBadSpec)
	}
	if spec.Token == "" || len(spec.Token) > maxTokenLen || strings.ContainsFunc(spec.Token, func(r rune) bool { return r <= 0x20 || r >= 0x7f }) {
		return status.Probe{}, fmt.Errorf("%w: token: 1 to %d printable characters, no spaces", ErrBadSpec, maxTokenLen)
	}
	if len(spec.Requester) == 0 || len(spec.Requester) > 16 {
		return status.Probe{}, fmt.Errorf("%w: requester: 1 to 16 CIDRs of who may read the token", ErrBadSpec)
	}
	if spec.TTL == 0 {
		spec.TTL = DefaultProbeTTL
	}
	if spec.TTL < 0 || spec.TTL > MaxProbeTTL {
		return status.Probe{}, fmt.Errorf("%w: ttl %v: at most %v", ErrBadSpec, spec.TTL, MaxProbeTTL)
	}
	if !spec.Listen.Addr().IsLoopback() && !ps.anyHost {
		return status.Probe{}, fmt.Errorf("%w: %v is not a loopback address", ErrNoConsent, spec.Listen)
	}
	key := Key(spec.Proto, spec.Listen)
	ps.mu.Lock()
	defer ps.mu.Unlock()
	switch {
	case ps.closed:
		return status.Probe{}, ErrClosed
	case ps.probes[key] != nil:
		return status.Probe{}, fmt.Errorf("%w: %s", ErrExists, key)
	case len(ps.probes) >= MaxProbes:
		return status.Probe{}, fmt.Errorf("%w: at most %d probes", ErrTooMany, MaxProbes)
	}
	p := &probe{spec: spec, key: key, expires: ps.now().Add(spec.TTL)}
	var err error
	if spec.Proto == "tcp" {
		var ln net.Listener
		if ln, err = net.Listen("tcp", spec.Listen.String()); err == nil {
			p.closer = ln
			ps.wg.Go(func() { p.serveTCP(ln) })
		}
	} else {
		var pc *net.UDPConn
		if pc, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(spec.Listen)); err == nil {
			p.closer = pc
			ps.wg.Go(func() { p.serveUDP(pc) })
		}
	}
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return status.Probe{}, fmt.Errorf("%w: %v: another program listens there", ErrInUse, spec.Listen)
		}
		return status.Probe{}, fmt.Errorf("listen on %v: %w", spec.Listen, err)
	}
	ps.probes[key] = p
	p.timer = time.AfterFunc(spec.TTL, func() { ps.Remove(spec.Proto, spec.Listen) })
	return p.info(), nil
}

// Remove closes a probe.
func (ps *Probes) Remove(proto string, listen netip.AddrPort) error {
	key := Key(proto, listen)
	ps.mu.Lock()
	p := ps.probes[key]
	delete(ps.probes, key)
	ps.mu.Unlock()
	if p == nil {
		return fmt.Errorf("%w: %s", ErrNotFound, key)
	}
	p.timer.Stop()
	return p.closer.Close()
}

// List is every open probe, in key order.
func (ps *Probes) List() []status.Probe {
	ps.mu.Lock()
	out := make([]status.Probe, 0, len(ps.probes))
	for _, p := range ps.probes {
		out = append(out, p.info())
	}
	ps.mu.Unlock()
	slices.SortFunc(out, func(a, b status.Probe) int { return strings.Compare(a.Proto+a.Listen, b.Proto+b.Listen) })
	return out
}

// Listens reports whether a probe of proto listens on port, on any
// address: a peer's connection (or datagram) to that local port would
// reach it.
func (ps *Probes) Listens(proto string, port uint16) bool {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	for _, p := range ps.probes {
		if p.spec.Proto == proto && p.spec.Listen.Port() == port {
			return true
		}
	}
	return false
}

// Close closes every probe and waits for them. It is safe to call twice.
func (ps *Probes) Close() {
	ps.mu.Lock()
	ps.closed = true
	open := make([]*probe, 0, len(ps.probes))
	for key, p := range ps.probes {
		open = append(open, p)
		delete(ps.probes, key)
	}
	ps.mu.Unlock()
	for _, p := range open {
		p.timer.Stop()
		p.closer.Close()
	}
	ps.wg.Wait()
}

func (p *probe) info() status.Probe {
	out := status.Probe{Proto: p.spec.Proto, Listen: p.spec.Listen.String(), Expires: p.expires.UTC(),
		Answered: p.answered.Load(), Ignored: p.ignored.Load()}
	for _, r := range p.spec.Requester {
		out.Requester = append(out.Requester, r.String())
	}
	return out
}

// requester reports whether ip may read the token.
func (p *probe) requester(ip netip.Addr) bool {
	ip = ip.Unmap()
	return slices.ContainsFunc(p.spec.Requester, func(r netip.Prefix) bool { return r.Contains(ip) })
}

// serveTCP answers each requester's connection with the token and a
// newline, then closes it; anyone else's is closed with nothing.
func (p *probe) serveTCP(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return // closed
		}
		if a, ok := c.RemoteAddr().(*net.TCPAddr); ok && p.requester(a.AddrPort().Addr()) {
			p.answered.Add(1) // counted before the requester can read it
			c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			c.Write([]byte(p.spec.Token + "\n"))
		} else {
			p.ignored.Add(1)
		}
		c.Close()
	}
}

// serveUDP answers each requester's datagram with the token, at most 10
// a second (a probe is no amplifier); anyone else's gets nothing.
func (p *probe) serveUDP(pc *net.UDPConn) {
	buf := make([]byte, 1500)
	var last time.Time
	for {
		_, from, err := pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		if !p.requester(from.Addr()) || time.Since(last) < 100*time.Millisecond {
			p.ignored.Add(1)
			continue
		}
		last = time.Now()
		p.answered.Add(1) // counted before the requester can read it
		pc.WriteToUDPAddrPort([]byte(p.spec.Token+"\n"), from)
	}
}

// Check is the requester's side: it reaches proto/addr and reports
// whether the answer is token. A wrong answer, none, or no connection is
// an error saying which.
func Check(proto string, addr netip.AddrPort, token string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	c, err := net.DialTimeout(proto, addr.String(), timeout)
	if err != nil {
		return fmt.Errorf("not reachable: %w", err)
	}
	defer c.Close()
	c.SetDeadline(deadline)
	var got []byte
	if proto == "udp" {
		buf := make([]byte, maxTokenLen+2)
		for range 5 { // a datagram may be lost: ask again, a second apart
			c.SetDeadline(time.Now().Add(min(time.Second, time.Until(deadline))))
			if _, err = c.Write([]byte("probe\n")); err != nil {
				break
			}
			var n int
			if n, err = c.Read(buf); err == nil {
				got = buf[:n]
				break
			}
			if time.Now().After(deadline) {
				break
			}
		}
	} else {
		got, err = io.ReadAll(io.LimitReader(c, maxTokenLen+2))
	}
	answer := strings.TrimSuffix(string(got), "\n")
	switch {
	case err != nil && answer == "":
		return fmt.Errorf("reached, but no answer: %w (is this address a probe, and are you its requester?)", err)
	case answer == "":
		return errors.New("reached, but it closed with no token: this address is not the requester's probe")
	case subtle.ConstantTimeCompare([]byte(answer), []byte(token)) != 1:
		return fmt.Errorf("reached, but the answer is not the token (%q): another program listens there", truncate(answer, 40))
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
