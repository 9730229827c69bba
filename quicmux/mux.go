// Package quicmux owns the one UDP socket of a sidecar through a
// quic.Transport. It separates STUN from QUIC on that socket, runs the
// connectivity checks that punch through NATs, keeps mutually
// authenticated QUIC connections to every peer, and carries each tunnelled
// TCP connection (a flow, package flow) as one QUIC stream.
//
// What owns what:
//   - Mux (mux.go): the endpoints, the peer map, the flow table, the
//     counters. Its lock guards only the peer map and its lifecycle.
//   - endpoint (endpoint.go): a socket (the main one, or a relay
//     allocation) with its QUIC transport, listener and STUN client; it
//     hands each connectivity check to its peer, and each accepted
//     connection to its peer.
//   - peer (peer.go): one party's state under its own lock, and one
//     goroutine that takes its events and obeys its path state, a typed
//     state machine whose transitions are a pure function (state.go).
//   - candidates (candidates.go): a peer's address table, with a pure
//     choice of the pair to dial.
//   - pool (pool.go): a peer's QUIC connections, and a pure balancing
//     function that returns the moves.
//   - the flow table (flows.go): every flow by peer, and expiring tombs.
//   - streams (stream.go): the stream protocol's two ends (header.go is its
//     wire format).
//
// Lock order: Mux.mu, then peer.mu, then the flow table's locks; the
// change signal, the counters and the quiet log are leaves. Nothing is
// dialled, written or closed while a lock is held: what to do is collected
// under the lock and done after it.
package quicmux

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/config"
	"sfkit-proxy/flow"
	"sfkit-proxy/identity"
	"sfkit-proxy/quietlog"
	"sfkit-proxy/status"
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
	codeStalled  quic.ApplicationErrorCode = 0x106 // the path carries no full-size packet (stall.go)

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
	// NAT is the mapping behaviour the peer published (stun.NAT*, or
	// "none" for a public address), for status; "" when unknown.
	NAT string
}

// Relay is a relayed allocation (a TURN allocation) to reach peers through
// when no direct path works.
type Relay struct {
	// Conn sends and receives through the relay; the Mux it is given to
	// closes it. A relay that re-allocates keeps one Conn across its
	// allocations (relay.Renewing) and tells SetRelayAddr.
	Conn net.PacketConn
	// Addr is the relayed address peers send to (published as a
	// candidate); invalid while none is allocated.
	Addr netip.AddrPort
	// Server names the relay, for logs and status.
	Server string
}

// Options configure a Mux. Zero values are documented per field.
type Options struct {
	// Logger; nil discards.
	Logger *slog.Logger
	Study  string
	PID    int
	// Identity is this party's key and certificate (required).
	Identity *identity.Identity
	// CheckKey authenticates connectivity checks with each peer (required;
	// its public half is what we publish as check_key).
	CheckKey *identity.CheckKey
	// Virtual is the virtual range (--peers-cidr); a peer's candidate inside
	// it is ignored. Zero checks none.
	Virtual netip.Prefix
	// MaxStreams is how many tunnelled connections a peer may hold open to
	// us at once; zero means 4096. Past it a Dial fails at once.
	MaxStreams int
	// ResumeTimeout is how long a tunnelled connection waits for a path to
	// come back before it is reset; zero means flow.DefaultResumeTimeout.
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
	// descriptor. Zero means 2048. Past it new ones are refused at once.
	MaxFlows int
	// FlowMemory bounds the memory the buffers of one peer's flows share
	// beyond each flow's own flow.FreeBytes each way (see flow.Budget):
	// data received and not yet read, and data sent and not yet
	// acknowledged. Zero means 32 MiB. Past it the peer's flows slow down
	// (their writers wait, their streams are not read), they do not fail.
	FlowMemory int
	// LocalHost is where accepted streams are dialled; zero means 127.0.0.1.
	LocalHost netip.Addr
	// CheckInterval is the period of connectivity checks; zero means 200 ms.
	CheckInterval time.Duration
	// HandshakeTimeout bounds one QUIC handshake (and a request's answer on
	// a new stream); zero means 5 s.
	HandshakeTimeout time.Duration
	// RelayDelay is how long direct checks get before a relayed path is
	// taken; zero means 3 s.
	RelayDelay time.Duration
	// ConnsPerPeer bounds the QUIC connections to one peer (see pool.go):
	// zero means config.DefaultConnsPerPeer, 1 carries every flow on one.
	ConnsPerPeer int
	// MaxPacketSize, when not zero, fixes QUIC packets at this many bytes
	// of UDP payload (1200 to 1452) instead of discovering the path's MTU.
	MaxPacketSize int
	// NoPeerRelay turns peer relays off (peerrelay.go): this party neither
	// relays for others nor is reached through one.
	NoPeerRelay bool
	// PeerRelayRate bounds the bytes per second this party relays for
	// others, shared equally among the peers with sessions; zero means
	// config.DefaultPeerRelayRate.
	PeerRelayRate int
	// Datagram, if set, takes the peers' datagrams of the kinds from
	// DatagramKindMin to DatagramKindMax (UDP carried through the tunnel):
	// b is the whole datagram, its kind first. It is called on the
	// connection's receive loop and must not block.
	Datagram func(pid int, b []byte)
}

// populate fills in the documented defaults: the one place they live.
func (o *Options) populate() error {
	if o.Identity == nil || o.CheckKey == nil {
		return errors.New("quicmux: Identity and CheckKey are required")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.AllowPort == nil {
		o.AllowPort = func(int, uint16) bool { return false }
	}
	if o.OwnPort == nil {
		o.OwnPort = func(uint16) bool { return false }
	}
	if o.WaitPort == nil {
		o.WaitPort = func(int, uint16) bool { return false }
	}
	if o.LocalWait == 0 {
		o.LocalWait = 5 * time.Minute
	}
	if o.MaxWaiting == 0 {
		o.MaxWaiting = 1024
	}
	if o.MaxFlows == 0 {
		o.MaxFlows = 2048
	}
	if o.FlowMemory == 0 {
		o.FlowMemory = 32 << 20
	}
	if !o.LocalHost.IsValid() {
		o.LocalHost = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	if o.CheckInterval == 0 {
		o.CheckInterval = 200 * time.Millisecond
	}
	if o.HandshakeTimeout == 0 {
		o.HandshakeTimeout = 5 * time.Second
	}
	if o.RelayDelay == 0 {
		o.RelayDelay = 3 * time.Second
	}
	if o.MaxStreams == 0 {
		o.MaxStreams = 4096
	}
	if o.ResumeTimeout == 0 {
		o.ResumeTimeout = flow.DefaultResumeTimeout
	}
	if o.PeerRelayRate == 0 {
		o.PeerRelayRate = config.DefaultPeerRelayRate
	}
	if o.ConnsPerPeer == 0 {
		o.ConnsPerPeer = config.DefaultConnsPerPeer
	}
	o.ConnsPerPeer = min(max(o.ConnsPerPeer, 1), config.MaxConnsPerPeer)
	return nil
}

// tuning are timings that are not options: tests shorten them through
// newMux, the test-only way in.
type tuning struct {
	// pathDeadAfter is how long a connection may go without a packet
	// before its path counts as dead.
	pathDeadAfter time.Duration
	// poolIdle is how long a pool member may carry nothing before the
	// dialer closes it.
	poolIdle time.Duration
	// balanceDelay lets a burst of pool changes settle before flows move.
	balanceDelay time.Duration
}

func defaultTuning() tuning {
	return tuning{pathDeadAfter: 5 * time.Second, poolIdle: 30 * time.Second, balanceDelay: 100 * time.Millisecond}
}

// Mux is a sidecar's UDP socket, QUIC transport and peer connections.
type Mux struct {
	opts   Options
	tune   tuning
	log    *slog.Logger
	local  netip.AddrPort // the main socket's address
	socket status.Socket  // what the kernel gave the main socket
	main   *endpoint
	relay  *endpoint // nil without a relay
	qc     *quic.Config
	// qcRelayed is qc for connections through a peer relay: packets fixed
	// at QUIC's minimum.
	qcRelayed *quic.Config
	prelay    peerRelays
	// rawGSO is whether raw hops send with UDP GSO (the main socket has it,
	// and QUIC_GO_DISABLE_GSO does not turn it off, as for quic-go); noGSO
	// is set once the socket refused such a send anyway (rawhop.go).
	rawGSO bool
	noGSO  atomic.Bool
	quiet  *quietlog.Log // warnings that strangers can provoke
	guard  *handshakeGuard
	boot   uint64 // this run's id, told to peers in hellos

	updates chan []PeerInfo  // latest registry view, for Run
	relayQ  chan relayChecks // rounds of checks for relaySender
	changed signal           // any peer's connections changed
	flows   flowTable
	count   counters
	fbufs   flow.Buffers // what received flow data waits in

	mu      sync.Mutex // guards peers, running; quit is closed under it
	peers   map[int]*peer
	running bool
	quit    chan struct{}  // closed when Run ends
	wg      sync.WaitGroup // stream handlers and per-connection goroutines

	closing   chan struct{} // closed by Close
	closeOnce sync.Once
	done      chan struct{} // closed once the endpoints are closed
	endOnce   sync.Once
	endErr    error
}

// signal is a broadcast: every waiter wakes when it fires.
type signal struct {
	mu sync.Mutex // guards ch
	ch chan struct{}
}

// wait returns a channel that is closed at the next broadcast.
func (s *signal) wait() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ch == nil {
		s.ch = make(chan struct{})
	}
	return s.ch
}

func (s *signal) broadcast() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ch != nil {
		close(s.ch)
		s.ch = nil
	}
}

// Receive windows: what a peer may send on one QUIC stream, and on one
// connection (all its streams), before it is read. With a pool's limit of
// connections they bound what QUIC holds for one peer (the README's
// per-peer budget). A stream's fills 300 Mbit/s over 50 ms (a pool of
// connections adds up); a connection's is eight streams', so that streams
// whose programs do not read hold up the others on their connection only
// when there are more than eight.
const (
	streamWindow = 2 << 20
	connWindow   = 8 * streamWindow
)

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
		MaxStreamReceiveWindow:         streamWindow,
		InitialConnectionReceiveWindow: 2 << 20,
		MaxConnectionReceiveWindow:     connWindow,
		// Probes of stalled paths (stall.go) are datagrams. Packets start
		// at QUIC's minimum, and path MTU discovery raises them as far as
		// the path allows: a new connection works on a path whose MTU
		// shrank to 1280, where quic-go's default start (1280 bytes of
		// UDP) would not.
		EnableDatagrams:   true,
		InitialPacketSize: 1200,
	}
}

// Listen opens a UDP socket on addr and runs a Mux on it (see New).
func Listen(addr netip.AddrPort, relay *Relay, opts Options) (*Mux, error) {
	network := "udp4"
	if addr.Addr().Is6() && !addr.Addr().Is4In6() {
		network = "udp6"
	}
	pc, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(addr))
	if err != nil {
		if relay != nil {
			relay.Conn.Close()
		}
		return nil, fmt.Errorf("udp listen %v: %w", addr, err)
	}
	return New(pc, relay, opts)
}

// New runs a Mux on pc, the main socket, and on relay (nil for none). The
// Mux owns both from here on: it closes them when it fails, and when Run
// ends or Close is called.
func New(pc net.PacketConn, relay *Relay, opts Options) (*Mux, error) {
	return newMux(pc, relay, opts, defaultTuning())
}

func newMux(pc net.PacketConn, relay *Relay, opts Options, tune tuning) (m *Mux, err error) {
	defer func() {
		if err != nil {
			pc.Close()
			if relay != nil {
				relay.Conn.Close()
			}
		}
	}()
	if err := opts.populate(); err != nil {
		return nil, err
	}
	log := opts.Logger.With("component", "quicmux")
	quiet := quietlog.New(log, time.Minute)
	m = &Mux{
		opts:    opts,
		tune:    tune,
		log:     log,
		local:   addrPortOf(pc.LocalAddr()),
		quiet:   quiet,
		guard:   newHandshakeGuard(quiet),
		updates: make(chan []PeerInfo, 1),
		relayQ:  make(chan relayChecks, 64),
		peers:   make(map[int]*peer),
		qc:      QUICConfig(opts.HandshakeTimeout),
		boot:    newBoot(),
		quit:    make(chan struct{}),
		closing: make(chan struct{}),
		done:    make(chan struct{}),
	}
	m.qc.MaxIncomingStreams = int64(opts.MaxStreams)
	if opts.MaxPacketSize != 0 {
		m.qc.InitialPacketSize = uint16(min(max(opts.MaxPacketSize, 1200), 1452))
		m.qc.DisablePathMTUDiscovery = true
	}
	m.flows.memory = opts.FlowMemory
	qr := *m.qc
	qr.InitialPacketSize, qr.DisablePathMTUDiscovery = 1200, true
	m.qcRelayed = &qr
	m.prelay.init(opts.PeerRelayRate)
	if m.main, err = m.newEndpoint(pc, false, ""); err != nil {
		return nil, err
	}
	m.socket = socketInfo(pc) // quic-go has set its buffers
	off, perr := strconv.ParseBool(os.Getenv("QUIC_GO_DISABLE_GSO"))
	m.rawGSO = m.socket.GSO && (perr != nil || !off)
	if relay != nil {
		if m.relay, err = m.newEndpoint(relay.Conn, true, relay.Server); err != nil {
			m.main.ln.Close()
			m.main.tr.Close()
			return nil, err
		}
		if relay.Addr.IsValid() {
			m.relay.addr.Store(&relay.Addr)
		}
	}
	return m, nil
}

// LocalAddr is the socket's local address.
func (m *Mux) LocalAddr() netip.AddrPort { return m.local }

// Network is "udp4" or "udp6".
func (m *Mux) Network() string {
	if m.local.Addr().Is4() {
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
	local := m.local
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

// Run serves until ctx ends or Close is called: it reads STUN off the
// sockets, accepts peers' connections and keeps connections to every peer.
// It closes the sockets when it returns. A Mux runs once.
func (m *Mux) Run(ctx context.Context) error {
	m.mu.Lock()
	again := m.running
	m.running = true
	m.mu.Unlock()
	if again {
		return errors.New("quicmux: Run called twice")
	}
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
			m.reshare(now)
		case <-ctx.Done():
			break loop
		case <-m.closing:
			err = net.ErrClosed
			break loop
		case err = <-errc:
			break loop
		case infos := <-m.updates:
			m.reconcile(ctx, infos, &bg)
		}
	}
	cancel()
	// The peers go first, then their connections, then the flows that
	// nothing will resume, then the sockets.
	var closing []*link
	m.mu.Lock()
	close(m.quit) // under mu: see goUnlessQuit
	for pid, p := range m.peers {
		p.mu.Lock()
		closing = append(closing, p.stopLocked()...)
		p.mu.Unlock()
		delete(m.peers, pid)
	}
	m.mu.Unlock()
	var wg sync.WaitGroup
	for _, l := range closing {
		wg.Go(func() { l.conn.CloseWithError(codeShutdown, "shutdown") })
	}
	wg.Wait()
	for _, e := range m.flows.all() {
		e.abandon(ResetShutdown)
	}
	for _, ep := range eps {
		ep.ln.Close()
	}
	bg.Wait()
	m.wg.Wait()
	cerr := m.end()
	switch {
	case errors.Is(err, net.ErrClosed):
		return net.ErrClosed
	case err != nil && !errors.Is(err, context.Canceled):
		return errors.Join(err, cerr)
	}
	return context.Cause(ctx)
}

// end closes the endpoints, once.
func (m *Mux) end() error {
	m.endOnce.Do(func() {
		for _, ep := range m.endpoints() {
			m.endErr = errors.Join(m.endErr, ep.close())
		}
		close(m.done)
	})
	return m.endErr
}

// Close stops the Mux: Run, if it runs, ends its peers, their connections
// and flows and returns net.ErrClosed; the sockets are closed either way,
// and Close returns once they are. It is safe to call more than once.
func (m *Mux) Close() error {
	m.closeOnce.Do(func() { close(m.closing) })
	m.mu.Lock()
	running := m.running
	m.mu.Unlock()
	if !running {
		return m.end()
	}
	<-m.done
	return nil
}

// reconcile starts, updates and stops peers to match infos.
func (m *Mux) reconcile(ctx context.Context, infos []PeerInfo, bg *sync.WaitGroup) {
	seen := make(map[int]bool)
	var closing []*link
	m.mu.Lock()
	for _, in := range infos {
		if in.PID == m.opts.PID || in.PID < 0 {
			continue
		}
		seen[in.PID] = true
		in = m.screen(in)
		p := m.peers[in.PID]
		if p == nil {
			pctx, pcancel := context.WithCancel(ctx)
			p = m.newPeer(pcancel, in)
			m.peers[in.PID] = p
			m.log.Info("peer registered", "peer", in.PID, "candidates", in.Candidates)
			bg.Go(func() { p.run(pctx) })
			bg.Go(func() { p.sendAnswers(pctx) })
			continue
		}
		p.mu.Lock()
		p.gone = false
		if !samePeerInfo(p.info, in) {
			p.setInfoLocked(in)
			notify(p.infoCh)
		}
		p.mu.Unlock()
	}
	for pid, p := range m.peers {
		if seen[pid] {
			continue
		}
		p.mu.Lock()
		switch {
		case p.gone:
		case p.pool.primary != nil && p.pool.primary.conn.Context().Err() == nil:
			// An entry expires when its party cannot reach the registry,
			// which says nothing of the path between us: a live
			// connection is kept until it ends by itself.
			m.log.Info("peer left the registry; keeping its live connection until it ends", "peer", pid)
			p.gone = true
			notify(p.infoCh)
		default:
			m.log.Info("peer left the registry", "peer", pid)
			closing = append(closing, p.stopLocked()...)
			delete(m.peers, pid)
		}
		p.mu.Unlock()
	}
	m.mu.Unlock()
	m.closeLater(codeShutdown, "peer left the registry", conns(closing)...)
	m.changed.broadcast()
}

// forget removes p, whose entry went away, once it has no connection; it
// reports whether it did.
func (m *Mux) forget(p *peer) bool {
	m.mu.Lock()
	p.mu.Lock()
	ok := p.gone && p.pool.primary == nil
	var closing []*link
	if ok {
		closing = p.stopLocked()
		if m.peers[p.pid] == p {
			delete(m.peers, p.pid)
		}
	}
	p.mu.Unlock()
	m.mu.Unlock()
	m.closeLater(codeShutdown, "peer left the registry", conns(closing)...)
	m.changed.broadcast()
	return ok
}

// peer is party pid's state, nil when it is not registered.
func (m *Mux) peer(pid int) *peer {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.peers[pid]
}

// closeLater closes conns with code in the background: a close waits for
// the connection to finish, and whoever asks may hold up others.
func (m *Mux) closeLater(code quic.ApplicationErrorCode, why string, conns ...*quic.Conn) {
	if len(conns) == 0 {
		return
	}
	closeAll := func() {
		for _, c := range conns {
			c.CloseWithError(code, why)
		}
	}
	if !m.goUnlessQuit(closeAll) {
		go closeAll() // Run is closing everything: nobody waits for these
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
				m.quiet.Warn("candidate:"+strconv.Itoa(in.PID)+":"+a.String(), "ignoring a candidate the peer published", "peer", in.PID, "err", err)
				continue
			}
			out = append(out, a)
		}
		return out
	}
	in.Candidates, in.Relays = keep(in.Candidates), keep(in.Relays)
	if len(in.Candidates) > config.MaxCandidates {
		m.quiet.Warn("candidates:"+strconv.Itoa(in.PID), "peer published too many candidates; using the first ones", "peer", in.PID,
			"published", len(in.Candidates), "max", config.MaxCandidates)
		in.Candidates = in.Candidates[:config.MaxCandidates]
	}
	return in
}

// addrPolicy is which peer addresses we send to: loopback ones only when
// our own socket is on loopback (every party on this machine).
func (m *Mux) addrPolicy() config.AddrPolicy {
	return config.AddrPolicy{Loopback: m.local.Addr().IsLoopback(), Virtual: m.opts.Virtual}
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

// relaySender sends the checks through the relay one round at a time: a
// relay may first have to install a permission for each address, and
// one TURN client takes its transactions best one after another.
func (m *Mux) relaySender(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case rc := <-m.relayQ:
			rc.send()
			rc.p.relaySending.Store(false)
		}
	}
}

// checkUsername names a check from one party to another in one study.
func checkUsername(study string, to, from int) string {
	return study + ":" + strconv.Itoa(to) + ":" + strconv.Itoa(from)
}

func (m *Mux) baseTLS() *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{m.opts.Identity.Cert},
		NextProtos:   []string{ALPN},
		MinVersion:   tls.VersionTLS13,
	}
}
