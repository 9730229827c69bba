// Package gateway keeps the sidecar's gateways: local TCP listeners whose
// connections are carried to a port of a peer, and UDP sockets whose
// clients' datagrams are, added and removed while the sidecar runs (the
// management API's /v1/gateways, `sfkit-proxy gateway`), besides those the
// flags make (--forward, --mpc-forward).
//
// A UDP gateway keeps one association through the tunnel per client
// address (package dgram); its limits count associations as a TCP
// gateway's count connections, and an association that carried nothing
// either way for the idle timeout (DefaultUDPIdle when none is given)
// ends. Removing a UDP gateway ends its associations at once: there is
// nothing to drain.
//
// A gateway off loopback is public: anyone who reaches the address can use
// the tunnel behind it. It needs the sidecar's consent (--gateway-any-host),
// and it has limits of its own, after frp's and GAP-22's: the sources it
// accepts (CIDRs), new connections per second from one source, connections
// at once, and an idle timeout. The party behind it still decides, through
// its own port policy, what may reach it.
package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/time/rate"

	"sfkit-proxy/splice"
	"sfkit-proxy/status"
)

// Spec is what a gateway is asked to be.
type Spec struct {
	Proto  string         // "tcp" or "udp"
	Listen netip.AddrPort // where it listens
	PID    int            // the peer
	Port   uint16         // the peer's local port
	Label  string         // free text, for people
	Source string         // "flag" or "api"
	// Limits; zero values take Defaults (public gateways) or none.
	AllowFrom   []netip.Prefix // sources accepted; empty: any
	ConnRate    float64        // new connections (UDP: associations) per second from one source
	MaxConns    int            // connections (UDP: associations) open at once
	IdleTimeout time.Duration  // a connection with no byte either way this long is cut
}

// Limits of a public gateway when its spec gives none. Loopback gateways
// and the flags' carry programs (an MPC job's connections sit idle for
// hours between rounds): they get only DefaultLocalMaxConns.
const (
	DefaultConnRate    = 10
	DefaultMaxConns    = 256
	DefaultIdleTimeout = 30 * time.Minute
	// DefaultLocalMaxConns bounds a loopback or flag gateway's open
	// connections (the peer's budget bounds them too).
	DefaultLocalMaxConns = 1024
	// DefaultUDPIdle ends a UDP gateway's association that carried
	// nothing this long, when the gateway has no idle timeout of its own.
	DefaultUDPIdle = 2 * time.Minute
	// MaxGateways bounds the gateways of one sidecar, and with it the
	// gateway label's cardinality in metrics.
	MaxGateways = 64
	// maxSources bounds the per-source limiters of one gateway.
	maxSources = 4096
)

// Options configure a Manager.
type Options struct {
	Logger *slog.Logger
	// DialPeer opens a tunnelled connection to port at party pid.
	DialPeer func(ctx context.Context, pid int, port uint16) (splice.Conn, error)
	// PeerAllows reports whether party pid publishes port as reachable;
	// nil allows all.
	PeerAllows func(pid int, port uint16) bool
	// Self is this party's id: a gateway to itself is refused.
	Self int
	// AnyHost allows gateways off loopback (--gateway-any-host).
	AnyHost bool
	// ConnectTimeout bounds the tunnel dial of each connection.
	ConnectTimeout time.Duration
	// UDP opens an association through the tunnel whose answers go to
	// recv (dgram.Carrier's Open); nil refuses UDP gateways.
	UDP func(recv func(pid int, port uint16, data []byte)) (UDPAssoc, error)
}

// UDPAssoc is a UDP association through the tunnel (dgram.Assoc).
type UDPAssoc interface {
	Send(pid int, port uint16, data []byte) error
	Close()
}

// Errors of Add and Remove, for the API's status codes.
var (
	ErrBadSpec   = errors.New("bad gateway")
	ErrNoConsent = errors.New("a gateway off loopback needs --gateway-any-host")
	ErrExists    = errors.New("a gateway already listens there")
	ErrNotFound  = errors.New("no such gateway")
	ErrInUse     = errors.New("address in use")
	ErrTooMany   = errors.New("too many gateways")
	ErrClosed    = errors.New("gateways closed")
)

// Manager keeps the gateways. Close ends them all.
type Manager struct {
	opts Options
	log  *slog.Logger
	done chan struct{} // closed by Close
	wg   sync.WaitGroup

	mu       sync.Mutex // guards gws, runtime, draining and closed
	gws      map[string]*gw
	runtime  int              // gateways in gws added at runtime (not from flags)
	draining map[*gw]struct{} // removed with drain, until their connections end
	closed   bool
}

// New returns a Manager with no gateways.
func New(opts Options) *Manager {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.ConnectTimeout <= 0 {
		opts.ConnectTimeout = time.Minute
	}
	return &Manager{opts: opts, log: opts.Logger.With("component", "gateway"), done: make(chan struct{}), gws: make(map[string]*gw),
		draining: make(map[*gw]struct{})}
}

// Key names a gateway: "tcp/127.0.0.1:9000".
func Key(proto string, listen netip.AddrPort) string { return proto + "/" + listen.String() }

// ParseAddr reads a gateway address, [IP:]PORT; the IP is 127.0.0.1 when
// left out.
func ParseAddr(s string) (netip.AddrPort, error) {
	if p, err := strconv.ParseUint(s, 10, 16); err == nil {
		if p == 0 {
			return netip.AddrPort{}, fmt.Errorf("%w: port 0: give the port to listen on", ErrBadSpec)
		}
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(p)), nil
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil || ap.Port() == 0 {
		return netip.AddrPort{}, fmt.Errorf("%w: address %q: want [IP:]PORT, such as 9000 or 203.0.113.5:8443", ErrBadSpec, s)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

// Add starts a gateway as spec says, and returns what it is.
func (m *Manager) Add(spec Spec) (status.Gateway, error) {
	if spec.Proto != "tcp" && spec.Proto != "udp" {
		return status.Gateway{}, fmt.Errorf("%w: protocol %q: want tcp or udp", ErrBadSpec, spec.Proto)
	}
	if spec.Proto == "udp" && m.opts.UDP == nil {
		return status.Gateway{}, fmt.Errorf("%w: this sidecar carries no UDP", ErrBadSpec)
	}
	if !spec.Listen.IsValid() || spec.Listen.Port() == 0 {
		return status.Gateway{}, fmt.Errorf("%w: no listen address", ErrBadSpec)
	}
	if spec.PID < 0 || spec.PID == m.opts.Self {
		return status.Gateway{}, fmt.Errorf("%w: party %d: want another party of the study", ErrBadSpec, spec.PID)
	}
	if spec.Port == 0 {
		return status.Gateway{}, fmt.Errorf("%w: port 0: give the peer's port", ErrBadSpec)
	}
	if len(spec.Label) > 64 || strings.ContainsFunc(spec.Label, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return status.Gateway{}, fmt.Errorf("%w: label: at most 64 printable characters", ErrBadSpec)
	}
	if spec.ConnRate < 0 || spec.MaxConns < 0 || spec.IdleTimeout < 0 || len(spec.AllowFrom) > 256 {
		return status.Gateway{}, fmt.Errorf("%w: limits must not be negative, and allow_from lists at most 256 prefixes", ErrBadSpec)
	}
	if spec.IdleTimeout > 0 && spec.IdleTimeout < 100*time.Millisecond {
		return status.Gateway{}, fmt.Errorf("%w: idle timeout %v: at least 100ms, or none", ErrBadSpec, spec.IdleTimeout)
	}
	public := !spec.Listen.Addr().IsLoopback()
	// A flag's gateway (--forward) has its own consent, --forward-any-host,
	// checked with the flags; and none of the public limits' defaults: a
	// program's connections through it may idle for hours.
	fromFlag := spec.Source == "flag"
	if public && !m.opts.AnyHost && !fromFlag {
		return status.Gateway{}, fmt.Errorf("%w: %v is not a loopback address (anyone who reaches it could use the tunnel to party %d)", ErrNoConsent, spec.Listen, spec.PID)
	}
	if m.opts.PeerAllows != nil && !m.opts.PeerAllows(spec.PID, spec.Port) {
		return status.Gateway{}, fmt.Errorf("%w: party %d does not allow port %d (its --allow-ports)", ErrBadSpec, spec.PID, spec.Port)
	}
	if public && !fromFlag {
		spec.ConnRate = cmpOr(spec.ConnRate, DefaultConnRate)
		spec.IdleTimeout = cmpOr(spec.IdleTimeout, DefaultIdleTimeout)
		spec.MaxConns = cmpOr(spec.MaxConns, DefaultMaxConns)
	}
	spec.MaxConns = cmpOr(spec.MaxConns, DefaultLocalMaxConns)
	if spec.Source == "" {
		spec.Source = "api"
	}
	key := Key(spec.Proto, spec.Listen)
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.closed:
		return status.Gateway{}, ErrClosed
	case m.gws[key] != nil:
		return status.Gateway{}, fmt.Errorf("%w: %s", ErrExists, key)
	case !fromFlag && m.runtime >= MaxGateways: // the flags' are bounded by the config
		return status.Gateway{}, fmt.Errorf("%w: at most %d", ErrTooMany, MaxGateways)
	}
	g := &gw{spec: spec, key: key, public: public, stopped: make(chan struct{}), conns: make(map[*net.TCPConn]splice.Conn),
		meters:  make(map[*net.TCPConn]*connMeter),
		clients: make(map[netip.AddrPort]*udpClient), sources: make(map[netip.Addr]*rate.Limiter), meter: meter{start: time.Now(), last: time.Now()}}
	var err error
	if spec.Proto == "udp" {
		g.pc, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(spec.Listen))
	} else {
		g.ln, err = net.Listen("tcp", spec.Listen.String())
	}
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return status.Gateway{}, fmt.Errorf("%w: %v: another program listens there", ErrInUse, spec.Listen)
		}
		return status.Gateway{}, fmt.Errorf("listen on %v: %w", spec.Listen, err)
	}
	m.gws[key] = g
	if !fromFlag {
		m.runtime++
	}
	if g.pc != nil {
		m.wg.Go(func() { m.serveUDP(g) })
	} else {
		m.wg.Go(func() { m.serve(g) })
	}
	m.log.Info("gateway added", "gateway", key, "peer", spec.PID, "port", spec.Port, "public", public, "source", spec.Source, "label", spec.Label)
	return g.info(), nil
}

func cmpOr[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// Remove stops the gateway at once for new connections; with drain, open
// ones finish, else they are reset.
func (m *Manager) Remove(proto string, listen netip.AddrPort, drain bool) error {
	key := Key(proto, listen)
	m.mu.Lock()
	g := m.gws[key]
	delete(m.gws, key)
	if g != nil && g.spec.Source != "flag" {
		m.runtime--
	}
	if g != nil && drain && g.ln != nil && g.open.Load() > 0 {
		m.draining[g] = struct{}{} // Close still cuts what is left
	}
	m.mu.Unlock()
	if g == nil {
		return fmt.Errorf("%w: %s", ErrNotFound, key)
	}
	g.stop(drain)
	m.log.Info("gateway removed", "gateway", key, "drain", drain, "open", g.open.Load())
	return nil
}

// Listens reports whether a gateway of proto listens on port, on any
// address: a peer's connection (or datagram) to that local port would
// reach it.
func (m *Manager) Listens(proto string, port uint16) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, g := range m.gws {
		if g.spec.Proto == proto && g.spec.Listen.Port() == port {
			return true
		}
	}
	return false
}

// Get is one gateway's status.
func (m *Manager) Get(proto string, listen netip.AddrPort) (status.Gateway, error) {
	key := Key(proto, listen)
	m.mu.Lock()
	g := m.gws[key]
	m.mu.Unlock()
	if g == nil {
		return status.Gateway{}, fmt.Errorf("%w: %s", ErrNotFound, key)
	}
	return g.info(), nil
}

// List is every gateway's status, in key order.
func (m *Manager) List() []status.Gateway {
	m.mu.Lock()
	gs := make([]*gw, 0, len(m.gws))
	for _, g := range m.gws {
		gs = append(gs, g)
	}
	m.mu.Unlock()
	slices.SortFunc(gs, func(a, b *gw) int { return strings.Compare(a.key, b.key) })
	out := make([]status.Gateway, 0, len(gs))
	for _, g := range gs {
		out = append(out, g.info())
	}
	return out
}

// UpdateStatus fills the status's gateways.
func (m *Manager) UpdateStatus(s *status.Status) { s.Gateways = m.List() }

// Sample takes the 1 s rate sample of every gateway, and ends UDP
// associations idle past their timeout.
func (m *Manager) Sample(now time.Time) {
	m.mu.Lock()
	gs := slices.Collect(maps.Values(m.gws))
	m.mu.Unlock()
	for _, g := range gs {
		g.mu.Lock()
		g.meter.sample(now, g.toPeer.Load(), g.fromPeer.Load())
		for _, cm := range g.meters {
			cm.meter.sample(now, cm.to.Load(), cm.from.Load())
		}
		for _, cl := range g.clients {
			cl.meter.sample(now, cl.to.Load(), cl.from.Load())
		}
		g.mu.Unlock()
		if g.pc != nil {
			g.expireUDP(now)
		}
	}
}

// Run samples the gateways' rates every second until ctx ends, then
// closes them all (Close).
func (m *Manager) Run(ctx context.Context) error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case now := <-t.C:
			m.Sample(now)
		case <-ctx.Done():
			m.Close()
			return ctx.Err()
		case <-m.done:
			return ErrClosed
		}
	}
}

// Close stops every gateway, resets their connections, and waits for them.
// It is safe to call twice.
func (m *Manager) Close() {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		m.wg.Wait()
		return
	}
	m.closed = true
	close(m.done)
	gs := make([]*gw, 0, len(m.gws)+len(m.draining))
	for key, g := range m.gws {
		gs = append(gs, g)
		delete(m.gws, key)
	}
	for g := range m.draining {
		gs = append(gs, g)
	}
	m.mu.Unlock()
	for _, g := range gs {
		g.stop(false)
	}
	m.wg.Wait()
}

// gw is one gateway.
type gw struct {
	spec    Spec
	key     string
	public  bool
	ln      net.Listener  // a TCP gateway's
	pc      *net.UDPConn  // a UDP gateway's
	stopped chan struct{} // closed by stop

	total, open, toPeer, fromPeer atomic.Uint64
	refused                       [numReasons]atomic.Uint64

	mu      sync.Mutex                    // guards conns, meters, clients, sources, overflow, meter, drained, and each connMeter's meter
	conns   map[*net.TCPConn]splice.Conn  // each client's tunnel, nil until dialed
	meters  map[*net.TCPConn]*connMeter   // each open connection's counts
	clients map[netip.AddrPort]*udpClient // a UDP gateway's associations
	sources map[netip.Addr]*rate.Limiter
	// overflow is shared by sources not yet known while sources is full.
	overflow *rate.Limiter
	meter    meter
	drained  bool
}

// Refusal reasons, as status and metrics name them.
const (
	reasonSource   = iota // not in allow_from
	reasonRate            // over conn_rate from its source
	reasonMaxConns        // max_conns open
	reasonTunnel          // the tunnel dial failed (or the peer refused)
	numReasons
	// reasonStopped: accepted as the gateway was removed (not counted).
	reasonStopped = numReasons
)

var reasonNames = [numReasons]string{"source", "rate", "max_conns", "tunnel"}

func (g *gw) stop(drain bool) {
	g.mu.Lock()
	select {
	case <-g.stopped:
	default:
		close(g.stopped)
	}
	g.drained = drain
	cut := map[*net.TCPConn]splice.Conn{}
	if !drain {
		maps.Copy(cut, g.conns)
	}
	clients := g.clients
	g.clients = map[netip.AddrPort]*udpClient{}
	g.mu.Unlock()
	if g.ln != nil {
		g.ln.Close()
	} else {
		g.pc.Close()
	}
	for _, cl := range clients { // UDP: nothing to drain
		cl.assoc.Close()
		g.open.Add(^uint64(0))
	}
	for c, tunnel := range cut { // both sides: either may be the one a copy waits on
		c.SetLinger(0)
		c.Close()
		if tunnel != nil {
			tunnel.Reset()
		}
	}
}

func (m *Manager) serve(g *gw) {
	for {
		c, err := g.ln.Accept()
		if err != nil {
			select {
			case <-g.stopped:
				return
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			m.log.Warn("gateway accept failed; retrying", "gateway", g.key, "err", err)
			select {
			case <-time.After(100 * time.Millisecond):
			case <-g.stopped:
				return
			}
			continue
		}
		tc := c.(*net.TCPConn)
		if why, ok := g.admit(tc); !ok {
			if why == reasonStopped {
				tc.SetLinger(0)
				tc.Close()
				return
			}
			g.refused[why].Add(1)
			m.log.Debug("gateway refused a connection", "gateway", g.key, "from", tc.RemoteAddr(), "reason", reasonNames[why])
			tc.SetLinger(0)
			tc.Close()
			continue
		}
		m.wg.Go(func() { m.carry(g, tc) })
	}
}

// admit applies the gateway's limits to a new connection and, when it
// passes, counts it open.
func (g *gw) admit(c *net.TCPConn) (reason int, ok bool) {
	src := netip.AddrPort{}
	if a, isTCP := c.RemoteAddr().(*net.TCPAddr); isTCP {
		src = a.AddrPort()
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-g.stopped: // accepted as it was removed: stop did not see it
		return reasonStopped, false
	default:
	}
	if why, ok := g.allowLocked(src.Addr().Unmap(), len(g.conns)); !ok {
		return why, false
	}
	g.conns[c] = nil
	g.meters[c] = newConnMeter(src)
	g.total.Add(1)
	g.open.Add(1)
	return 0, true
}

// allowLocked applies the gateway's limits to a new connection or
// association from ip, with open of them open now.
func (g *gw) allowLocked(ip netip.Addr, open int) (reason int, ok bool) {
	if len(g.spec.AllowFrom) > 0 && !slices.ContainsFunc(g.spec.AllowFrom, func(p netip.Prefix) bool { return p.Contains(ip) }) {
		return reasonSource, false
	}
	if g.spec.ConnRate > 0 {
		lim := g.sources[ip]
		if lim == nil {
			if len(g.sources) >= maxSources {
				for a, l := range g.sources {
					if l.Tokens() >= float64(l.Burst()) {
						delete(g.sources, a)
					}
				}
			}
			burst := max(1, int(2*g.spec.ConnRate))
			if len(g.sources) < maxSources {
				lim = rate.NewLimiter(rate.Limit(g.spec.ConnRate), burst)
				g.sources[ip] = lim
			} else {
				if g.overflow == nil {
					g.overflow = rate.NewLimiter(rate.Limit(g.spec.ConnRate), burst)
				}
				lim = g.overflow
			}
		}
		if !lim.Allow() {
			return reasonRate, false
		}
	}
	if open >= g.spec.MaxConns {
		return reasonMaxConns, false
	}
	return 0, true
}

// carry dials the tunnel for c and splices the two, counting bytes and
// cutting c when it idles past the gateway's idle timeout.
func (m *Manager) carry(g *gw, c *net.TCPConn) {
	defer func() {
		g.mu.Lock()
		delete(g.conns, c)
		delete(g.meters, c)
		g.mu.Unlock()
		if g.open.Add(^uint64(0)) == 0 {
			m.mu.Lock()
			delete(m.draining, g) // a removed gateway's last connection
			m.mu.Unlock()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), m.opts.ConnectTimeout)
	m.wg.Go(func() { // ends the dial when the gateway is cut or closed; ends with it
		select {
		case <-m.done:
		case <-g.stopped:
			g.mu.Lock()
			drain := g.drained
			g.mu.Unlock()
			if drain {
				select {
				case <-ctx.Done():
					return
				case <-m.done:
				}
			}
		case <-ctx.Done():
			return
		}
		cancel()
	})
	target, err := m.opts.DialPeer(ctx, g.spec.PID, g.spec.Port)
	cancel()
	if err != nil {
		g.refused[reasonTunnel].Add(1)
		m.log.Info("gateway: tunnel dial failed", "gateway", g.key, "peer", g.spec.PID, "port", g.spec.Port, "err", err)
		c.SetLinger(0)
		c.Close()
		return
	}
	g.mu.Lock()
	_, open := g.conns[c]
	if open {
		g.conns[c] = target
	}
	cm := g.meters[c]
	g.mu.Unlock()
	if !open { // cut while dialing
		target.Reset()
		return
	}
	cc := &counted{Conn: target, g: g, cm: cm}
	cc.touch()
	if g.spec.IdleTimeout > 0 {
		stop := make(chan struct{})
		defer close(stop)
		m.wg.Go(func() { cc.watchIdle(c, g.spec.IdleTimeout, stop) })
	}
	splice.Splice(c, cc)
}

// counted is the tunnel side of a gateway connection: it counts bytes each
// way and when the last one moved.
type counted struct {
	splice.Conn
	g    *gw
	cm   *connMeter
	last atomic.Int64 // unix nanoseconds of the last byte either way
}

func (c *counted) touch() { c.last.Store(time.Now().UnixNano()) }

// sent counts n bytes toward the peer; received, n from it.
func (c *counted) sent(n int) {
	if n > 0 {
		c.g.toPeer.Add(uint64(n))
		c.cm.to.Add(uint64(n))
		c.touch()
	}
}

func (c *counted) received(n int) {
	if n > 0 {
		c.g.fromPeer.Add(uint64(n))
		c.cm.from.Add(uint64(n))
		c.touch()
	}
}

// Read is a read from the peer.
func (c *counted) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.received(n)
	return n, err
}

// Write is a write to the peer.
func (c *counted) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.sent(n)
	return n, err
}

// ReadFrom carries r (the client) to the peer, counting as it goes,
// through the tunnel's own ReadFrom when it has one (a flow reads straight
// into its send buffer).
func (c *counted) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(countReader{r, c})
	}
	return io.Copy(struct{ io.Writer }{c}, r)
}

// WriteTo carries the peer's bytes to w (the client), counting as it goes,
// through the tunnel's own WriteTo when it has one.
func (c *counted) WriteTo(w io.Writer) (int64, error) {
	if wt, ok := c.Conn.(io.WriterTo); ok {
		return wt.WriteTo(countWriter{w, c})
	}
	return io.Copy(w, struct{ io.Reader }{c})
}

// countReader counts what the client sends toward the peer.
type countReader struct {
	r io.Reader
	c *counted
}

func (r countReader) Read(b []byte) (int, error) {
	n, err := r.r.Read(b)
	r.c.sent(n)
	return n, err
}

// countWriter counts what the peer sends to the client.
type countWriter struct {
	w io.Writer
	c *counted
}

func (w countWriter) Write(b []byte) (int, error) {
	n, err := w.w.Write(b)
	w.c.received(n)
	return n, err
}

// watchIdle resets client and tunnel once no byte has moved for timeout.
func (c *counted) watchIdle(client *net.TCPConn, timeout time.Duration, stop <-chan struct{}) {
	t := time.NewTicker(max(min(timeout/4, 10*time.Second), 100*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			if time.Since(time.Unix(0, c.last.Load())) >= timeout {
				client.SetLinger(0)
				client.Close()
				c.Conn.Reset()
				return
			}
		}
	}
}

func (g *gw) info() status.Gateway {
	s := g.spec
	out := status.Gateway{Proto: s.Proto, Listen: s.Listen.String(), PID: s.PID, Port: s.Port, Label: s.Label, Source: s.Source,
		Public: g.public, ConnRate: s.ConnRate, MaxConns: s.MaxConns, IdleTimeout: s.IdleTimeout.String(),
		Conns: g.total.Load(), Open: g.open.Load(), BytesToPeer: g.toPeer.Load(), BytesFromPeer: g.fromPeer.Load(),
		Refused: map[string]uint64{}}
	if s.IdleTimeout == 0 {
		out.IdleTimeout = ""
	}
	for _, p := range s.AllowFrom {
		out.AllowFrom = append(out.AllowFrom, p.String())
	}
	for i, n := range reasonNames {
		if v := g.refused[i].Load(); v > 0 {
			out.Refused[n] = v
		}
	}
	now := time.Now()
	g.mu.Lock()
	out.Rate = g.meter.rates(now, out.BytesToPeer, out.BytesFromPeer)
	cms := slices.Collect(maps.Values(g.meters))
	for _, cl := range g.clients {
		cms = append(cms, cl.connMeter)
	}
	slices.SortFunc(cms, func(a, b *connMeter) int { return a.meter.start.Compare(b.meter.start) })
	for _, cm := range cms[:min(len(cms), MaxListedConns)] {
		to, from := cm.to.Load(), cm.from.Load()
		out.Connections = append(out.Connections, status.GatewayConn{Client: cm.client.String(), Since: cm.meter.start,
			BytesToPeer: to, BytesFromPeer: from, Rate: cm.meter.rates(now, to, from)})
	}
	g.mu.Unlock()
	return out
}

// MaxListedConns bounds the connections a gateway's status lists (the
// oldest first); its counts cover them all.
const MaxListedConns = 64

// connMeter is one connection's (or UDP client's) counts and rates.
type connMeter struct {
	client   netip.AddrPort
	to, from atomic.Uint64 // bytes toward the peer, and back
	meter    meter         // guarded by its gateway's mu
}

func newConnMeter(client netip.AddrPort) *connMeter {
	now := time.Now()
	return &connMeter{client: client, meter: meter{start: now, last: now}}
}

// ReasonNames are the refusal reasons, for metrics.
func ReasonNames() []string { return reasonNames[:] }

// meter keeps a gateway's rates: samples a second apart, their maximum, and
// the average since it began.
type meter struct {
	start, last   time.Time
	lastTo, lastF uint64
	window        [3][2]float64
	n             int
	maxTo, maxF   float64
}

func (r *meter) sample(now time.Time, to, from uint64) {
	dt := now.Sub(r.last).Seconds()
	if dt <= 0 {
		return
	}
	s, v := float64(to-r.lastTo)/dt, float64(from-r.lastF)/dt
	r.window[r.n%len(r.window)] = [2]float64{s, v}
	r.n++
	r.maxTo, r.maxF = max(r.maxTo, s), max(r.maxF, v)
	r.last, r.lastTo, r.lastF = now, to, from
}

func (r *meter) rates(now time.Time, to, from uint64) status.Rates {
	var cur [2]float64
	k := min(r.n, len(r.window))
	for i := range k {
		cur[0] += r.window[i][0] / float64(k)
		cur[1] += r.window[i][1] / float64(k)
	}
	out := status.Rates{CurrentSent: cur[0], CurrentReceived: cur[1], MaxSent: r.maxTo, MaxReceived: r.maxF}
	if el := now.Sub(r.start).Seconds(); el > 0 {
		out.AverageSent, out.AverageReceived = float64(to)/el, float64(from)/el
	}
	return out
}
