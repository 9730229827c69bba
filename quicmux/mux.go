// Package quicmux owns the one UDP socket of a sidecar through a
// quic.Transport. It separates STUN from QUIC on that socket, runs the
// connectivity checks that punch through NATs, keeps one mutually
// authenticated QUIC connection per peer, and carries each tunnelled TCP
// connection as one QUIC stream.
package quicmux

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/config"
	"sfkit-proxy/flow"
	"sfkit-proxy/stun"
)

// ALPN is the protocol name peers negotiate.
const ALPN = "sfkit-proxy/1"

// Application error codes on connections and streams.
const (
	codeShutdown quic.ApplicationErrorCode = 0x100
	codeReplaced quic.ApplicationErrorCode = 0x101
	codeRestart  quic.ApplicationErrorCode = 0x102
	codeRejected quic.ApplicationErrorCode = 0x103
	codePathDead quic.ApplicationErrorCode = 0x104 // nothing heard for pathDeadAfter
	codeIdle     quic.ApplicationErrorCode = 0x105 // a pool member carried nothing for a while

	// pathDeadAfter is how long a connection may go without a packet before
	// its path counts as dead.
	pathDeadAfter = 5 * time.Second

	codeStreamAbort quic.StreamErrorCode = 0x1
)

// PeerInfo is what the registry says about a peer.
type PeerInfo struct {
	PID        int
	Pin        string
	CheckKey   string
	Instance   string
	Candidates []netip.AddrPort
	// Relays are the candidates that are relayed addresses.
	Relays []netip.AddrPort
}

// Relay is a relayed allocation (a TURN allocation) to reach peers through
// when no direct path works.
type Relay struct {
	// Conn sends and receives through the relay; Run closes it.
	Conn net.PacketConn
	// Addr is the relayed address peers send to (published as a candidate).
	Addr netip.AddrPort
	// Server names the relay, for logs and status.
	Server string
}

// endpoint is a local socket peers are reached through: the main UDP socket
// or a relay allocation, each with its QUIC transport, listener and STUN
// transactions.
type endpoint struct {
	relay  bool
	server string // the relay's name
	conn   net.PacketConn
	tr     *quic.Transport
	ln     *quic.Listener
	stun   *stun.Client
}

// Options configure a Mux. Zero values are documented per field.
type Options struct {
	// Logger; nil discards.
	Logger *slog.Logger
	Study  string
	PID    int
	// Identity is this party's key and certificate (required).
	Identity *Identity
	// CheckKey authenticates connectivity checks with each peer (required;
	// its public half is what we publish as check_key).
	CheckKey *CheckKey
	// Virtual is the virtual range (--peers-cidr); a peer's candidate inside
	// it is ignored. Zero checks none.
	Virtual netip.Prefix
	// MaxStreams is how many tunnelled connections a peer may hold open to
	// us at once; zero means 4096. Past it a Dial fails at once.
	MaxStreams int
	// ResumeTimeout is how long a tunnelled connection waits for a path to
	// come back before it is reset; zero means 10 minutes.
	ResumeTimeout time.Duration
	// OnPathLost, if set, is called when a connection to a peer dies: the
	// NAT mapping may have changed, and is worth asking STUN about now.
	OnPathLost func()
	// AllowPort says which local ports peer pid may reach (an MPC
	// program's port is for one peer only); nil allows none.
	AllowPort func(pid int, port uint16) bool
	// OwnPort says which local ports this sidecar itself listens on (SOCKS,
	// the management API, forwards): never reachable by peers, whatever
	// AllowPort says, so that no peer can speak through this party's
	// tunnels or API as this party. nil means none.
	OwnPort func(port uint16) bool
	// WaitPort says which allowed ports wait for a local listener: a
	// connection to one that finds nothing listening keeps dialling, up to
	// LocalWait, before it is refused (so the order in which the parties'
	// programs start does not matter); nil waits for none.
	WaitPort func(pid int, port uint16) bool
	// LocalWait bounds that wait; zero means 5 minutes.
	LocalWait time.Duration
	// MaxWaiting bounds a peer's connections waiting for a local listener
	// at once; zero means 1024. Past it they are refused at once.
	MaxWaiting int
	// MaxFlows bounds the tunnelled connections a peer may have opened
	// here at once, attached to a stream or waiting for a resume, and
	// those waiting for a local listener: each holds a local file
	// descriptor. Zero means 4096. Past it new ones are refused at once.
	MaxFlows int
	// LocalHost is where accepted streams are dialled; zero means 127.0.0.1.
	LocalHost netip.Addr
	// CheckInterval is the period of connectivity checks; zero means 200 ms.
	CheckInterval time.Duration
	// DialTimeout bounds one QUIC handshake; zero means 5 s.
	DialTimeout time.Duration
	// Relay, if set, is a relayed allocation used when no direct path works.
	Relay *Relay
	// RelayDelay is how long direct checks get before a relayed path is
	// taken; zero means 3 s.
	RelayDelay time.Duration
	// ConnsPerPeer bounds the QUIC connections to one peer (see pool.go):
	// zero means config.DefaultConnsPerPeer, 1 carries every flow on one.
	ConnsPerPeer int
	// poolIdle is how long a pool member may carry nothing; zero means
	// defaultPoolIdle (tests shorten it).
	poolIdle time.Duration
}

// Mux is a sidecar's UDP socket, QUIC transport and peer connections.
type Mux struct {
	opts  Options
	log   *slog.Logger
	pc    *net.UDPConn
	main  *endpoint
	relay *endpoint // nil without a relay
	qc    *quic.Config

	updates chan []PeerInfo  // latest registry view, for Run
	relayQ  chan relayChecks // rounds of checks for relaySender

	mu      sync.Mutex // guards peers, changed
	peers   map[int]*peer
	changed chan struct{} // closed and replaced when any peer's state changes

	quiet *quietLog // warnings that strangers can provoke
	guard *handshakeGuard

	boot uint64        // this run's id, told to peers in hellos
	quit chan struct{} // closed when Run ends
	// flows are the live flows, by peer; guarded by mu.
	flows map[int]map[flowKey]*flowEntry
	// tombs remember the ended flows each peer opened, for its late
	// resumes; guarded by mu.
	tombs map[int]*graveyard

	wg    sync.WaitGroup // stream handlers and per-connection goroutines
	count counters
	fbufs flow.Buffers // what received flow data waits in
	// blockDirect drops direct connectivity checks both ways, as a firewall
	// that blocks UDP would; for tests of the relayed path.
	blockDirect atomic.Bool
}

// peer is the state of one remote party. Fields after cancel are guarded by
// Mux.mu.
type peer struct {
	pid          int
	infoCh       chan struct{} // a new info arrived
	connCh       chan struct{} // the accept loop installed a connection
	answers      *answers      // answers to checks from the main socket
	relayAnswers *answers      // answers to checks from the relay
	cancel       context.CancelFunc
	relaySending atomic.Bool   // checks through the relay are being sent
	poolCh       chan struct{} // a flow was attached, or the pool changed
	growing      atomic.Bool   // members are being opened

	info PeerInfo
	// key is the integrity key of checks with this peer ("" while its
	// check key is unusable).
	key string
	// gone: its registry entry went away while a connection was live;
	// the connection is kept until it ends.
	gone bool
	// boot is the peer's boot id from its last hello, 0 before one.
	boot uint64
	// waiting counts its connections waiting for a local listener.
	waiting int
	prflx   map[netip.AddrPort]time.Time // learned from its checks: when last heard
	link    *link                        // the connection in use (the pool's primary), nil when none
	pool    []*link                      // the primary's members (pool.go)
	// draining are replaced primaries still carrying flows, oldest first:
	// with link and pool, never more than config.MaxConnsPerPeer.
	draining []*link
	// inFlows counts the flows the peer opened here, attached or not: each
	// holds a local connection (a file descriptor) until it ends.
	inFlows int
	path    pathState
	lastErr string
	// repairs counts paths repaired; lastRepair is how long the last took.
	repairs    uint64
	lastRepair time.Duration
	traffic    map[string]*traffic // by path kind
	rates      rates
}

// link is a QUIC connection to a peer and what it runs over.
type link struct {
	conn *quic.Conn
	ep   *endpoint // the local endpoint it was made on
	// local and remote are read once, when the link is made: quic-go's
	// Conn.LocalAddr and RemoteAddr race with a path switch.
	local, remote netip.AddrPort
	since         time.Time
	tr            *traffic     // counters of its path kind when it was made
	open          atomic.Int64 // tunnelled connections on it, to drain it gracefully
	// direct is set once the link moved from a relay to the direct path: by
	// migration on the dialer, by the dialer's notice on the acceptor.
	direct atomic.Bool
	// draining is set once a newer connection replaced this one: it
	// carries the flows it has to their end (or until they move), and
	// takes no new ones.
	draining atomic.Bool
	// primary is the connection whose pool this one belongs to; nil for a
	// primary.
	primary *link
	// idleSince is when a member last carried nothing (dialer; guarded
	// by Mux.mu).
	idleSince time.Time
}

// QUICConfig is the QUIC configuration of peer connections (exported for
// benchmarks that compare with raw quic-go).
func QUICConfig(handshakeTimeout time.Duration) *quic.Config {
	return &quic.Config{
		HandshakeIdleTimeout: handshakeTimeout,
		// A dead path is noticed within seconds; the tunnelled connections
		// then wait, detached, for the next connection (package flow).
		MaxIdleTimeout:                 10 * time.Second,
		KeepAlivePeriod:                2 * time.Second,
		MaxIncomingStreams:             4096,
		InitialStreamReceiveWindow:     1 << 20,
		MaxStreamReceiveWindow:         16 << 20,
		InitialConnectionReceiveWindow: 2 << 20,
		MaxConnectionReceiveWindow:     64 << 20,
	}
}

// Listen opens the UDP socket on addr and the QUIC transport on it.
func Listen(addr netip.AddrPort, opts Options) (*Mux, error) {
	if opts.Identity == nil || opts.CheckKey == nil {
		return nil, errors.New("quicmux: Identity and CheckKey are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.AllowPort == nil {
		opts.AllowPort = func(int, uint16) bool { return false }
	}
	if opts.OwnPort == nil {
		opts.OwnPort = func(uint16) bool { return false }
	}
	if opts.WaitPort == nil {
		opts.WaitPort = func(int, uint16) bool { return false }
	}
	if opts.LocalWait == 0 {
		opts.LocalWait = 5 * time.Minute
	}
	if opts.MaxWaiting == 0 {
		opts.MaxWaiting = 1024
	}
	if opts.MaxFlows == 0 {
		opts.MaxFlows = 4096
	}
	if !opts.LocalHost.IsValid() {
		opts.LocalHost = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	if opts.CheckInterval == 0 {
		opts.CheckInterval = 200 * time.Millisecond
	}
	if opts.DialTimeout == 0 {
		opts.DialTimeout = 5 * time.Second
	}
	if opts.RelayDelay == 0 {
		opts.RelayDelay = 3 * time.Second
	}
	if opts.MaxStreams == 0 {
		opts.MaxStreams = 4096
	}
	if opts.ResumeTimeout == 0 {
		opts.ResumeTimeout = 10 * time.Minute
	}
	if opts.ConnsPerPeer == 0 {
		opts.ConnsPerPeer = config.DefaultConnsPerPeer
	}
	opts.ConnsPerPeer = min(max(opts.ConnsPerPeer, 1), config.MaxConnsPerPeer)
	if opts.poolIdle == 0 {
		opts.poolIdle = defaultPoolIdle
	}
	network := "udp4"
	if addr.Addr().Is6() && !addr.Addr().Is4In6() {
		network = "udp6"
	}
	pc, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(addr))
	if err != nil {
		if opts.Relay != nil {
			opts.Relay.Conn.Close()
		}
		return nil, fmt.Errorf("udp listen %v: %w", addr, err)
	}
	log := opts.Logger.With("component", "quicmux")
	quiet := newQuietLog(log, time.Minute)
	m := &Mux{
		opts:    opts,
		log:     log,
		quiet:   quiet,
		guard:   newHandshakeGuard(quiet),
		pc:      pc,
		updates: make(chan []PeerInfo, 1),
		relayQ:  make(chan relayChecks, 64),
		peers:   make(map[int]*peer),
		changed: make(chan struct{}),
		qc:      QUICConfig(opts.DialTimeout),
		boot:    newBoot(),
		quit:    make(chan struct{}),
		flows:   make(map[int]map[flowKey]*flowEntry),
		tombs:   make(map[int]*graveyard),
	}
	m.qc.MaxIncomingStreams = int64(opts.MaxStreams)
	if m.main, err = m.newEndpoint(pc, false, ""); err != nil {
		pc.Close()
		if opts.Relay != nil {
			opts.Relay.Conn.Close()
		}
		return nil, err
	}
	if opts.Relay != nil {
		if m.relay, err = m.newEndpoint(opts.Relay.Conn, true, opts.Relay.Server); err != nil {
			m.main.close()
			pc.Close()
			return nil, err
		}
	}
	return m, nil
}

// newEndpoint runs a QUIC transport and listener on conn.
func (m *Mux) newEndpoint(conn net.PacketConn, relay bool, server string) (*endpoint, error) {
	ep := &endpoint{relay: relay, server: server, conn: conn, tr: &quic.Transport{Conn: conn,
		VerifySourceAddress: m.guard.verifySource, ConnContext: m.guard.admit}}
	ep.stun = stun.NewClient(ep.tr)
	// Turn on the non-QUIC packet queue before anything is sent, so that no
	// early STUN answer is dropped.
	done, cancel := context.WithCancel(context.Background())
	cancel()
	ep.tr.ReadNonQUICPacket(done, nil)
	var err error
	if ep.ln, err = ep.tr.Listen(m.serverTLS(), m.qc); err != nil {
		ep.tr.Close()
		return nil, fmt.Errorf("quic listen: %w", err)
	}
	return ep, nil
}

func (ep *endpoint) close() error {
	return errors.Join(ep.ln.Close(), ep.tr.Close(), ep.conn.Close())
}

// LocalAddr is the socket's local address.
func (m *Mux) LocalAddr() netip.AddrPort {
	ap := m.pc.LocalAddr().(*net.UDPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Network is "udp4" or "udp6".
func (m *Mux) Network() string {
	if m.LocalAddr().Addr().Is4() {
		return "udp4"
	}
	return "udp6"
}

// STUN is the client for STUN transactions on the shared socket.
func (m *Mux) STUN() *stun.Client { return m.main.stun }

func (m *Mux) endpoints() []*endpoint {
	if m.relay != nil {
		return []*endpoint{m.main, m.relay}
	}
	return []*endpoint{m.main}
}

// HostCandidates lists the addresses of local interfaces where the socket
// can be reached: the bound address, or every usable interface address of
// the socket's family when bound to the wildcard.
func (m *Mux) HostCandidates() []netip.AddrPort {
	local := m.LocalAddr()
	if !local.Addr().IsUnspecified() {
		return []netip.AddrPort{local}
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		m.log.Warn("cannot list interface addresses", "err", err)
	}
	var out, loop []netip.AddrPort
	for _, a := range addrs {
		pfx, err := netip.ParsePrefix(a.String())
		if err != nil {
			continue
		}
		ip := pfx.Addr().Unmap()
		if ip.Is4() != local.Addr().Is4() || ip.IsLinkLocalUnicast() || ip.IsMulticast() {
			continue
		}
		if ip.IsLoopback() {
			loop = append(loop, netip.AddrPortFrom(ip, local.Port()))
			continue
		}
		out = append(out, netip.AddrPortFrom(ip, local.Port()))
	}
	if len(out) == 0 {
		return loop
	}
	return out
}

// SetPeers hands Run the registry's current view of the other parties.
// Only the latest view counts; it never blocks.
func (m *Mux) SetPeers(infos []PeerInfo) {
	for {
		select {
		case m.updates <- infos:
			return
		default:
		}
		select {
		case <-m.updates:
		default:
		}
	}
}

// Run serves until ctx ends: it reads STUN off the socket, accepts peers'
// connections and keeps one connection to every peer. It closes the socket
// when it returns.
func (m *Mux) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	var bg sync.WaitGroup
	eps := m.endpoints()
	errc := make(chan error, 2*len(eps)+1)
	for _, ep := range eps {
		bg.Go(func() { errc <- m.readLoop(ctx, ep) })
		bg.Go(func() { errc <- m.acceptLoop(ctx, ep) })
	}
	if m.relay != nil {
		bg.Go(func() { errc <- m.relaySender(ctx) })
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var err error
loop:
	for {
		select {
		case now := <-tick.C:
			m.sample(now)
		case <-ctx.Done():
			break loop
		case err = <-errc:
			break loop
		case infos := <-m.updates:
			m.reconcile(ctx, infos, &bg)
		}
	}
	cancel()
	var draining []*link // closed once mu is let go of
	m.mu.Lock()
	close(m.quit) // under mu: see goUnlessQuit
	for _, p := range m.peers {
		p.cancel()
		if p.link != nil {
			p.link.conn.CloseWithError(codeShutdown, "shutdown")
		}
		m.closeMembersLocked(p, codeShutdown, "shutdown")
		draining = append(draining, p.draining...)
		p.draining = nil
	}
	var flows []*flowEntry
	for _, pf := range m.flows {
		for _, e := range pf {
			flows = append(flows, e)
		}
	}
	m.mu.Unlock()
	for _, d := range draining {
		d.conn.CloseWithError(codeShutdown, "shutdown")
	}
	// Nothing will resume them: their local connections are reset.
	for _, e := range flows {
		e.abandon(ResetShutdown)
	}
	for _, ep := range eps {
		ep.ln.Close()
	}
	bg.Wait()
	m.wg.Wait()
	var cerr error
	for _, ep := range eps {
		cerr = errors.Join(cerr, ep.close())
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		return errors.Join(err, cerr)
	}
	return ctx.Err()
}

// reconcile starts, updates and stops peer goroutines to match infos.
func (m *Mux) reconcile(ctx context.Context, infos []PeerInfo, bg *sync.WaitGroup) {
	seen := make(map[int]bool)
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, in := range infos {
		if in.PID == m.opts.PID || in.PID < 0 {
			continue
		}
		seen[in.PID] = true
		in = m.screen(in)
		p := m.peers[in.PID]
		if p == nil {
			pctx, pcancel := context.WithCancel(ctx)
			p = &peer{
				pid: in.PID, info: in, path: pathState{state: StateConnecting, since: time.Now()}, cancel: pcancel,
				rates:  rates{start: time.Now(), last: time.Now()},
				infoCh: make(chan struct{}, 1), connCh: make(chan struct{}, 1), poolCh: make(chan struct{}, 1),
				answers: newAnswers(), relayAnswers: newAnswers(), prflx: make(map[netip.AddrPort]time.Time),
			}
			m.setKeyLocked(p)
			m.peers[in.PID] = p
			m.log.Info("peer registered", "peer", in.PID, "candidates", in.Candidates)
			bg.Go(func() { m.runPeer(pctx, p) })
			continue
		}
		p.gone = false
		if !samePeerInfo(p.info, in) {
			p.info = in
			m.setKeyLocked(p)
			notify(p.infoCh)
		}
	}
	for pid, p := range m.peers {
		if seen[pid] || p.gone {
			continue
		}
		if p.link != nil && p.link.conn.Context().Err() == nil {
			// An entry expires when its party cannot reach the registry,
			// which says nothing of the path between us: a live
			// connection is kept until it ends by itself.
			m.log.Info("peer left the registry; keeping its live connection until it ends", "peer", pid)
			p.gone = true
			notify(p.infoCh)
			continue
		}
		m.log.Info("peer left the registry", "peer", pid)
		m.removeLocked(p)
	}
	m.broadcastLocked()
}

// removeLocked stops p and forgets it.
func (m *Mux) removeLocked(p *peer) {
	p.cancel()
	if p.link != nil {
		p.link.conn.CloseWithError(codeShutdown, "peer left the registry")
	}
	m.closeMembersLocked(p, codeShutdown, "peer left the registry")
	for _, d := range p.draining {
		m.wg.Go(func() { d.conn.CloseWithError(codeShutdown, "peer left the registry") })
	}
	p.draining = nil
	if m.peers[p.pid] == p {
		delete(m.peers, p.pid)
	}
}

// screen drops the candidates of in that no peer should send to (see
// config.AddrPolicy), saying so, and keeps at most config.MaxCandidates.
func (m *Mux) screen(in PeerInfo) PeerInfo {
	pol := m.addrPolicy()
	keep := func(as []netip.AddrPort) []netip.AddrPort {
		var out []netip.AddrPort
		for _, a := range as {
			if err := pol.CheckCandidate(a); err != nil {
				m.quiet.warn("candidate:"+strconv.Itoa(in.PID)+":"+a.String(), "ignoring a candidate the peer published", "peer", in.PID, "err", err)
				continue
			}
			out = append(out, a)
		}
		return out
	}
	in.Candidates, in.Relays = keep(in.Candidates), keep(in.Relays)
	if len(in.Candidates) > config.MaxCandidates {
		m.quiet.warn("candidates:"+strconv.Itoa(in.PID), "peer published too many candidates; using the first ones", "peer", in.PID,
			"published", len(in.Candidates), "max", config.MaxCandidates)
		in.Candidates = in.Candidates[:config.MaxCandidates]
	}
	return in
}

// addrPolicy is which peer addresses we send to: loopback ones only when
// our own socket is on loopback (every party on this machine).
func (m *Mux) addrPolicy() config.AddrPolicy {
	return config.AddrPolicy{Loopback: m.LocalAddr().Addr().IsLoopback(), Virtual: m.opts.Virtual}
}

// setKeyLocked derives the check key of the pair p and us.
func (m *Mux) setKeyLocked(p *peer) {
	key, err := m.opts.CheckKey.pairKey(m.opts.Study, m.opts.PID, p.pid, p.info.CheckKey)
	if err != nil {
		m.quiet.warn("checkkey:"+strconv.Itoa(p.pid), "peer published an unusable check key; no checks with it until it publishes a good one",
			"peer", p.pid, "err", err)
	}
	p.key = key
}

func samePeerInfo(a, b PeerInfo) bool {
	return a.Pin == b.Pin && a.CheckKey == b.CheckKey && a.Instance == b.Instance &&
		slices.Equal(a.Candidates, b.Candidates) && slices.Equal(a.Relays, b.Relays)
}

func notify(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

func (m *Mux) broadcastLocked() {
	close(m.changed)
	m.changed = make(chan struct{})
}

// readLoop takes every non-QUIC packet off an endpoint: STUN responses go
// to its STUN client, binding requests are peers' connectivity checks.
func (m *Mux) readLoop(ctx context.Context, ep *endpoint) error {
	buf := make([]byte, 1500)
	for {
		n, addr, err := ep.tr.ReadNonQUICPacket(ctx, buf)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("read stun: %w", err)
		}
		ua, ok := addr.(*net.UDPAddr)
		if !ok {
			continue
		}
		from := ua.AddrPort()
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		msg, err := stun.Parse(buf[:n])
		if err != nil {
			m.log.Debug("ignoring non-quic packet", "from", from, "err", err)
			continue
		}
		if !ep.relay && m.blockDirect.Load() {
			continue
		}
		if !msg.Request {
			ep.stun.Handle(msg, from)
			continue
		}
		m.answerCheck(ep, msg, from)
	}
}

// checkUsername names a check from one party to another in one study.
func checkUsername(study string, to, from int) string {
	return study + ":" + strconv.Itoa(to) + ":" + strconv.Itoa(from)
}

// answerCheck answers a peer's connectivity check if it carries our study,
// our pid and integrity with the key of the pair it claims to come from;
// anything else is ignored. Only such a check teaches us an address.
func (m *Mux) answerCheck(ep *endpoint, msg *stun.Message, from netip.AddrPort) {
	study, rest, ok1 := strings.Cut(msg.Username, ":")
	to, fromPID, ok2 := strings.Cut(rest, ":")
	pid, err := strconv.Atoi(fromPID)
	if !ok1 || !ok2 || err != nil || study != m.opts.Study || to != strconv.Itoa(m.opts.PID) {
		m.log.Debug("ignoring stranger's binding request", "from", from)
		return
	}
	m.mu.Lock()
	p := m.peers[pid]
	key := ""
	if p != nil {
		key = p.key
	}
	m.mu.Unlock()
	if key == "" {
		m.log.Debug("ignoring check from a party we cannot check", "from", from, "peer", pid)
		return
	}
	resp := stun.Answer(msg, from, key)
	if resp == nil {
		m.log.Debug("ignoring check with bad integrity", "from", from, "peer", pid)
		return
	}
	if _, err := ep.tr.WriteTo(resp, net.UDPAddrFromAddrPort(from)); err != nil {
		m.log.Debug("check answer failed", "to", from, "err", err)
	}
	if !ep.relay {
		m.learn(p, from)
	}
}

// acceptLoop accepts connections from peers with a lower pid; the TLS
// handshake has already checked their pin.
func (m *Mux) acceptLoop(ctx context.Context, ep *endpoint) error {
	for {
		conn, err := ep.ln.Accept(ctx)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, quic.ErrServerClosed) {
				return ctx.Err()
			}
			return fmt.Errorf("accept: %w", err)
		}
		cs := conn.ConnectionState().TLS
		p, member, err := m.claimed(cs.ServerName, PinOf(cs.PeerCertificates[0]))
		if err != nil {
			m.count.acceptsRejected.Add(1)
			conn.CloseWithError(codeRejected, "unknown peer")
			continue
		}
		m.count.acceptsOK.Add(1)
		if member {
			m.mu.Lock()
			primary := p.link
			m.mu.Unlock()
			m.installMember(ctx, p, primary, conn, ep)
			continue
		}
		m.installConn(ctx, p, conn, ep)
		notify(p.connCh)
	}
}

// handshakeName is the TLS server name a dialer sends: who dials whom.
// The acceptor checks the pin of the party it names, so a member can claim
// only itself.
func handshakeName(from, to int) string {
	return "p" + strconv.Itoa(from) + ".to.p" + strconv.Itoa(to) + ".sfkit-proxy"
}

// parseHandshakeName reads a handshakeName, with memberName after it for a
// pool member; anything else is not ok.
func parseHandshakeName(s string) (from, to int, member, ok bool) {
	s, member = strings.CutSuffix(s, memberName)
	rest, ok1 := strings.CutSuffix(s, ".sfkit-proxy")
	a, b, ok2 := strings.Cut(rest, ".to.")
	num := func(s string) int {
		n, err := strconv.Atoi(strings.TrimPrefix(s, "p"))
		if err != nil || n < 0 || "p"+strconv.Itoa(n) != s {
			return -1
		}
		return n
	}
	from, to = num(a), num(b)
	return from, to, member, ok1 && ok2 && from >= 0 && to >= 0
}

// claimed finds the peer that a handshake's server name claims dialled us,
// and checks that it dials (a lower pid) and holds that peer's pinned key.
// A member is refused when the peer has no connection for it to join, or
// already has config.MaxConnsPerPeer.
func (m *Mux) claimed(serverName, pin string) (p *peer, member bool, err error) {
	from, to, member, ok := parseHandshakeName(serverName)
	if !ok || to != m.opts.PID {
		return nil, false, fmt.Errorf("handshake names no party dialling party %d (server name %q)", m.opts.PID, serverName)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	p = m.peers[from]
	switch {
	case p == nil:
		return nil, false, fmt.Errorf("party %d is not in the registry", from)
	case from >= m.opts.PID:
		return nil, false, fmt.Errorf("party %d dialled, but the lower party id dials", from)
	case p.info.Pin != pin:
		return nil, false, fmt.Errorf("party %d presented key %s, but pinned is %s", from, pin, p.info.Pin)
	case member && p.link == nil:
		return nil, false, fmt.Errorf("party %d opened a pool connection with no connection to pool with", from)
	case member && len(p.pool) >= config.MaxConnsPerPeer-1:
		return nil, false, fmt.Errorf("party %d opened more than %d connections", from, config.MaxConnsPerPeer)
	}
	return p, member, nil
}

func (m *Mux) baseTLS() *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{m.opts.Identity.Cert},
		NextProtos:   []string{ALPN},
		MinVersion:   tls.VersionTLS13,
	}
}

func (m *Mux) serverTLS() *tls.Config {
	c := m.baseTLS()
	c.ClientAuth = tls.RequireAnyClientCert
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("peer sent no certificate")
		}
		pin := PinOf(cs.PeerCertificates[0])
		if _, _, err := m.claimed(cs.ServerName, pin); err != nil {
			m.count.acceptsRejected.Add(1)
			m.quiet.warn("reject:"+pin, "rejected handshake", "pin", pin, "err", err)
			return err
		}
		return nil
	}
	return c
}

func (m *Mux) clientTLS(pid int, pin string) *tls.Config {
	c := m.baseTLS()
	c.ServerName = handshakeName(m.opts.PID, pid)
	// Chain verification is replaced by the pin check below; TLS 1.3 still
	// proves that the peer holds the pinned key.
	c.InsecureSkipVerify = true
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("peer sent no certificate")
		}
		if got := PinOf(cs.PeerCertificates[0]); got != pin {
			return fmt.Errorf("party %d presented key %s, but pinned is %s", pid, got, pin)
		}
		return nil
	}
	return c
}
