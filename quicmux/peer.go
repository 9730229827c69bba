package quicmux

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/config"
	"sfkit-proxy/identity"
	"sfkit-proxy/quicmux/header"
	"sfkit-proxy/stun"
)

// peer is one remote party, in the manner of magicsock's endpoint: its
// own state under its own lock, and one goroutine (run) that takes its
// events (a new registry entry, answered checks, a connection accepted,
// pool changes, the path lost) and obeys its path state (state.go): in a
// connected state it watches the connection (keep), in any other it looks
// for one (connect). Lock order: Mux.mu, then peer.mu, then the flow
// table's; nothing is dialled, written or closed while mu is held.
type peer struct {
	m      *Mux
	pid    int
	log    *slog.Logger
	cancel context.CancelFunc
	// Events for run: one token each, so a sender never blocks.
	infoCh       chan struct{} // a new registry entry
	connCh       chan struct{} // the accept loop installed a connection
	poolCh       chan struct{} // a flow was attached, or the pool changed
	answerCh     chan struct{} // one of our checks was answered
	relaySending atomic.Bool   // checks through the relay are being sent
	growing      atomic.Bool   // members are being opened
	// poolCap, when not zero, is as many connections as the peer took
	// before it refused one (its --conns-per-peer may be smaller than
	// ours): the pool grows no further until the primary changes, so
	// that refused handshakes do not eat the peer's handshake rate.
	poolCap atomic.Int32
	// answersOut are answers to the peer's checks, for sendAnswers.
	answersOut chan checkAnswer
	// dg is the connection SendDatagram uses.
	dg linkCache

	mu   sync.Mutex // guards the fields below
	info PeerInfo
	// key is the integrity key of checks with this peer ("" while its
	// check key is unusable).
	key string
	// gone: its registry entry went away while a connection was live;
	// the connection is kept until it ends.
	gone bool
	// boot is the peer's boot id from its last hello, 0 before one.
	boot uint64
	// stopped: it left the registry or Run ends; no connection is
	// installed any more.
	stopped    bool
	cands      candidates
	pool       pool
	path       pathState
	lastErr    error
	repairs    uint64        // paths repaired
	lastRepair time.Duration // how long the last repair took
	// lostWhy is why the path was last lost (stall, dead, lost), for the
	// repair that follows; repairWhy is the last repair's.
	lostWhy, repairWhy string
	traffic            map[PathKind]*traffic
	rates              rates
	// nextViaPeer: no session through a peer relay is asked for before
	// this (dialer).
	nextViaPeer time.Time
	// rankedAt is when a ranking last moved p from TURN to a peer relay
	// (zero once judged), rankWait how long the next ranking waits after
	// moves that did not hold, and rankNext when it may come
	// (rankPeerRelays).
	rankedAt, rankNext time.Time
	rankWait           time.Duration
}

// link is a QUIC connection to a peer and what it runs over.
type link struct {
	conn *quic.Conn
	ep   *endpoint // the local endpoint it was made on
	// local and remote are read once, when the link is made: quic-go's
	// Conn.LocalAddr, RemoteAddr and ConnectionState race with a path
	// switch. pin is the peer's key pin; datagrams, whether both ends take
	// datagrams (stall probes).
	local, remote netip.AddrPort
	pin           string
	datagrams     bool
	since         time.Time
	tr            *traffic     // counters of its path kind when it was made
	open          atomic.Int64 // tunnelled connections on it, to drain it gracefully
	// direct is set once the link moved from a relay to the direct path: by
	// migration on the dialer, by the dialer's notice on the acceptor.
	direct atomic.Bool
	// turn is whether it was made through a TURN relay, either side's
	// (set before it is installed).
	turn bool
	// draining is set once a newer connection replaced this one: it
	// carries the flows it has to their end (or until they move), and
	// takes no new ones.
	draining atomic.Bool
	// primary is the connection whose pool this one belongs to; nil for a
	// primary.
	primary *link
	// idleSince is when a member last carried nothing (dialer; guarded
	// by its peer's mu).
	idleSince time.Time
	// read counts the bytes read on its streams, for the stall watch;
	// echoes are the nonces of the peer's answers to its probes (stall.go).
	read   atomic.Uint64
	echoes chan uint64
	// regrow schedules the trials of larger packets on the link, and
	// trials takes their result (stall.go; its dialer's keep only).
	regrow regrow
	trials chan trialResult
}

// newLink is conn as a link made on ep.
func newLink(conn *quic.Conn, ep *endpoint, primary *link) *link {
	cs := conn.ConnectionState()
	now := time.Now()
	return &link{conn: conn, ep: ep, since: now, local: addrPortOf(conn.LocalAddr()), remote: addrPortOf(conn.RemoteAddr()),
		pin: identity.PinOf(cs.TLS.PeerCertificates[0]), datagrams: cs.SupportsDatagrams.Local && cs.SupportsDatagrams.Remote,
		primary: primary, echoes: make(chan uint64, 4), regrow: newRegrow(now), trials: make(chan trialResult, 1)}
}

func (m *Mux) newPeer(cancel context.CancelFunc, in PeerInfo) *peer {
	now := time.Now()
	p := &peer{
		m: m, pid: in.PID, log: m.log.With("peer", in.PID), cancel: cancel,
		infoCh: make(chan struct{}, 1), connCh: make(chan struct{}, 1), poolCh: make(chan struct{}, 1), answerCh: make(chan struct{}, 1),
		answersOut: make(chan checkAnswer, 8),
		path:       pathState{state: StateConnecting, since: now},
		rates:      rates{start: now, last: now},
		cands:      newCandidates(m.local.Addr().Is4()),
		pool:       pool{limit: poolLimit(m.opts.ConnsPerPeer)},
	}
	p.setInfoLocked(in)
	return p
}

// setInfoLocked takes the peer's registry entry, and derives the check key
// of the pair.
func (p *peer) setInfoLocked(in PeerInfo) {
	p.info = in
	p.cands.publish(in.Candidates, in.Relays)
	key, err := p.m.opts.CheckKey.PairKey(p.m.opts.Study, p.m.opts.PID, p.pid, in.CheckKey)
	if err != nil {
		p.m.quiet.Warn("checkkey:"+strconv.Itoa(p.pid), "peer published an unusable check key; no checks with it until it publishes a good one",
			"peer", p.pid, "err", err)
	}
	p.key = key
}

// stopLocked ends p's loop and takes every connection it has, for the
// caller to close once it has let go of the locks.
func (p *peer) stopLocked() []*link {
	p.cancel()
	p.stopped = true
	ls := p.pool.all()
	p.pool = pool{limit: p.pool.limit}
	return ls
}

// checkAnswer is an answer to one of the peer's checks.
type checkAnswer struct {
	ep  *endpoint
	pkt []byte
	to  netip.AddrPort
}

// sendAnswers writes the answers to p's checks until ctx ends.
func (p *peer) sendAnswers(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case a := <-p.answersOut:
			if _, err := a.ep.tr.WriteTo(a.pkt, net.UDPAddrFromAddrPort(a.to)); err != nil {
				p.log.Debug("check answer failed", "to", a.to, "err", err)
			}
		}
	}
}

// run keeps a connection to p until ctx ends.
func (p *peer) run(ctx context.Context) {
	for ctx.Err() == nil {
		p.mu.Lock()
		st, l, inst := p.path.state, p.pool.primary, p.info.Instance
		gone := p.gone
		p.mu.Unlock()
		switch {
		case st.Connected() && l != nil:
			p.keep(ctx, l, inst)
		case gone:
			// Its entry went away while connected; now the connection has too.
			if p.m.forget(p) {
				p.log.Info("peer left the registry")
				return
			}
		default:
			p.connect(ctx)
		}
	}
}

// keep watches a live link until it ends, is replaced, or the peer
// restarts. While the link is relayed both sides keep checking the direct
// path, and the dialer moves to it when it answers.
func (p *peer) keep(ctx context.Context, l *link, inst string) {
	m := p.m
	var directChecks <-chan time.Time
	if p.kindOf(l) != PathDirect {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		directChecks = t.C
	}
	since := time.Now()
	// A path that carries nothing for pathDeadAfter is dead: both sides
	// send a keepalive every 2 s. Noticing it here takes seconds, not the
	// idle timeout.
	live := time.NewTicker(time.Second)
	defer live.Stop()
	lastPackets, lastHeard := l.conn.ConnectionStats().PacketsReceived, time.Now()
	// The pool (pool.go): after a burst of changes settles, flows are
	// spread again and the dialer opens what the flows need.
	dialer := m.opts.PID < p.pid
	var settle <-chan time.Time
	// The stall watch (stall.go), per connection of the pool.
	watches := make(map[*link]*stallWatch)
	probes := make(chan probeResult, config.MaxConnsPerPeer)
	// Trials of larger packets (stall.go), by the dialer, unless packets
	// are fixed; their schedule is the link's, across calls of keep.
	rg := &l.regrow
	regrowOn := dialer && m.opts.MaxPacketSize == 0 && l.ep.session == nil
	// On TURN, the dialer looks for a nearer peer relay (rankPeerRelays),
	// within rankCtx: what it finds after this returns is not installed.
	var rank *time.Timer
	var rankC <-chan time.Time
	ranked := make(chan bool, 1)
	rankCtx, rankCancel := context.WithCancel(ctx)
	defer func() { rankCancel() }()
	// stopRank ends a ranking under way, before a move of keep's own.
	stopRank := func() {
		rankCancel()
		rankCtx, rankCancel = context.WithCancel(ctx)
	}
	if dialer && !m.opts.NoPeerRelay && p.kindOf(l) == PathRelayed {
		rank = time.NewTimer(p.rankDelay())
		defer rank.Stop()
		rankC = rank.C
	}
	for {
		select {
		case r := <-l.trials:
			rg.done(time.Now())
			if r.err != nil || r.got < r.size+packetGain {
				p.log.Debug("no larger packets on the path", "packet_size", r.size, "trial", r.got, "err", r.err, "next_in", rg.wait)
				continue
			}
			stopRank() // a ranking would replace what this installs
			if p.raisePackets(ctx, l, r) {
				return
			}
		case r := <-probes:
			w := watches[r.l]
			if w != nil {
				w.probing = false
			}
			if w == nil || r.echoed || r.l.conn.Context().Err() != nil {
				continue
			}
			err := fmt.Errorf("%w: no progress for %v, and no full-size probe (%d bytes) answered: the path's MTU may have shrunk",
				errPathStalled, time.Since(w.since).Round(time.Second), r.size)
			p.log.Warn("path stalled: no progress, and full-size packets unanswered; reconnecting", "err", err, "addr", l.remote,
				"packet_size", r.size)
			m.count.pathStalls.Add(1)
			p.dropLink(l, err, evLost) // and closes the members, r.l among them
			m.closeLater(codeStalled, "path stalled", l.conn)
			if m.opts.OnPathLost != nil {
				m.opts.OnPathLost()
			}
			return
		case now := <-live.C:
			p.watchStalls(ctx, now, watches, probes)
			if regrowOn {
				if size := packetSize(l.conn); rg.due(now, size) {
					m.wg.Go(func() { l.trials <- p.packetTrial(ctx, l, size) })
				}
			}
			if n := l.conn.ConnectionStats().PacketsReceived; n != lastPackets {
				lastPackets, lastHeard = n, now
			} else if now.Sub(lastHeard) >= m.tune.pathDeadAfter {
				// The close itself may wait on the dead path: the repair
				// begins first.
				err := fmt.Errorf("%w: nothing heard for %v", errPathDead, now.Sub(lastHeard).Round(time.Second))
				p.log.Warn("path lost; tunnelled connections wait for a new one", "err", err)
				p.dropLink(l, err, evLost)
				m.closeLater(codePathDead, "path dead", l.conn)
				if m.opts.OnPathLost != nil {
					m.opts.OnPathLost()
				}
				return
			}
			if dialer {
				p.shrink(now)
			}
		case <-p.poolCh:
			if settle == nil {
				settle = time.After(m.tune.balanceDelay)
			}
		case <-settle:
			settle = nil
			p.balance()
			if dialer && m.opts.ConnsPerPeer > 1 {
				m.wg.Go(func() { p.grow(ctx, l) })
			}
		case <-ctx.Done():
			return
		case <-p.connCh:
			return
		case <-l.conn.Context().Done():
			err := context.Cause(l.conn.Context())
			var app *quic.ApplicationError
			if errors.As(err, &app) && app.Remote && app.ErrorCode == codeShutdown {
				// It stopped on purpose: nothing will resume.
				p.log.Info("peer shut down")
				p.dropLink(l, err, evGone)
				m.resetFlows(p.pid, ResetPeerShutdown, nil)
				return
			}
			p.log.Warn("path lost; tunnelled connections wait for a new one", "err", err)
			p.dropLink(l, err, evLost)
			if m.opts.OnPathLost != nil {
				m.opts.OnPathLost()
			}
			return
		case <-p.infoCh:
			p.mu.Lock()
			restarted := p.info.Instance != inst || l.pin != p.info.Pin
			p.mu.Unlock()
			if restarted {
				p.log.Info("peer restarted; reconnecting")
				p.dropLink(l, errors.New("peer restarted"), evGone)
				m.closeLater(codeRestart, "peer restarted", l.conn)
				m.resetFlows(p.pid, ResetPeerRestarted, nil)
			}
			return
		case <-rankC:
			rctx := rankCtx
			m.wg.Go(func() { ranked <- p.rankPeerRelays(ctx, rctx, l) })
		case moved := <-ranked:
			if moved {
				return
			}
			rank.Reset(rankEvery)
		case <-directChecks:
			p.sendChecks(false)
		case <-p.answerCh:
			if directChecks == nil || !dialer {
				continue
			}
			p.mu.Lock()
			pk, ok := p.cands.best(time.Now(), since, false)
			p.mu.Unlock()
			if ok {
				stopRank()
				p.upgrade(ctx, l, pk.to)
				return
			}
		}
	}
}

// upgrade moves p from a relayed link to the direct path to `to`: by QUIC
// connection migration when only the local socket changes (the link runs
// on our relay and `to` is the address it already talks to), which keeps
// every open stream; otherwise by a new direct connection, the old one
// draining until its streams end.
func (p *peer) upgrade(ctx context.Context, l *link, to netip.AddrPort) {
	m := p.m
	if l.ep.relay && !l.direct.Load() && l.remote == to {
		err := p.migrate(ctx, l)
		if err == nil {
			p.log.Info("path switched", "from", PathRelayed, "to", PathDirect, "addr", to)
			// Tell the acceptor, which cannot see the switch itself.
			nctx, cancel := context.WithTimeout(ctx, m.opts.HandshakeTimeout)
			defer cancel()
			if str, _, err := openStream(nctx, l.conn, header.Request{Kind: header.KindPathNotice}); err == nil {
				endStream(str)
			}
			return
		}
		p.log.Info("could not migrate to the direct path; opening a new connection", "err", err)
	}
	conn, err := p.dial(ctx, m.main, to)
	if err != nil {
		if ctx.Err() == nil {
			p.mu.Lock()
			p.cands.failed(to, viaMain, time.Now())
			p.mu.Unlock()
			p.log.Debug("direct dial failed", "addr", to, "err", err)
		}
		return
	}
	p.log.Info("direct path found; open connections move to it")
	p.installConn(ctx, conn, m.main)
}

// raisePackets replaces l, p's link, by a new connection on its path,
// which a trial found to carry larger packets than l (r), and reports
// whether it did.
func (p *peer) raisePackets(ctx context.Context, l *link, r trialResult) bool {
	m := p.m
	ep := l.ep
	if l.direct.Load() {
		ep = m.main
	}
	conn, err := p.dial(ctx, ep, l.remote)
	if err != nil {
		p.log.Debug("no new connection for larger packets", "err", err)
		return false
	}
	p.log.Info("path carries larger packets again; moving to a new connection", "packet_size", r.size, "found", r.got, "addr", l.remote)
	m.count.packetRaises.Add(1)
	p.installConn(ctx, conn, ep)
	return true
}

// migrate switches l, p's connection, from the relay socket to the main one.
func (p *peer) migrate(ctx context.Context, l *link) error {
	path, err := l.conn.AddPath(p.m.main.tr)
	if err != nil {
		return err
	}
	pctx, cancel := context.WithTimeout(ctx, p.m.opts.HandshakeTimeout)
	defer cancel()
	if err := path.Probe(pctx); err != nil {
		path.Close()
		return fmt.Errorf("probe: %w", err)
	}
	if err := path.Switch(); err != nil {
		path.Close()
		return fmt.Errorf("switch: %w", err)
	}
	p.switched(l)
	return nil
}

// switched records that l moved from a relay to the direct path. On a
// primary, the members still run on the relay: they close, their flows
// move to the primary, and the pool grows again on the direct path.
func (p *peer) switched(l *link) {
	l.direct.Store(true)
	var closing []*link
	p.mu.Lock()
	if p.pool.primary == l {
		closing = p.pool.takeMembers()
		p.path, _ = p.path.next(evUpgraded, PathDirect, time.Now())
	}
	p.mu.Unlock()
	p.m.closeLater(codeReplaced, "the pool moves to the direct path", conns(closing)...)
	p.m.changed.broadcast()
}

// learn remembers an address an authenticated check of p came from.
func (p *peer) learn(ap netip.AddrPort) {
	if err := p.m.addrPolicy().CheckCandidate(ap); err != nil {
		return
	}
	p.mu.Lock()
	p.cands.learn(ap, time.Now())
	p.mu.Unlock()
}

// answered is the callback of our checks sent over v.
func (p *peer) answered(v via) func(stun.Result) {
	return func(r stun.Result) {
		p.m.count.checksAnswered.Add(1)
		p.mu.Lock()
		p.cands.answered(r.From, v, time.Now())
		p.mu.Unlock()
		notify(p.answerCh)
	}
}

// connect sends connectivity checks from every local endpoint to every
// candidate of p until a connection is up. The lower pid dials the best
// pair that answered (candidates.best): at once on a direct pair; on a
// relayed pair only when no direct pair has worked within RelayDelay. The
// higher pid waits for the accept loop.
func (p *peer) connect(ctx context.Context) {
	m := p.m
	tick := time.NewTicker(m.opts.CheckInterval)
	defer tick.Stop()
	dialer := m.opts.PID < p.pid
	start := time.Now() // answers from before are of paths that may be gone
	warned := false
	var lastRound time.Time
	for {
		// A round goes out on the tick, on news of the peer, and on an
		// answer (to try what the answer taught at once), but never
		// sooner than half a check interval after the last: a member that
		// answers every check at once would otherwise have a round sent,
		// to every address it published, per answer, a flood aimed
		// wherever it likes.
		if now := time.Now(); now.Sub(lastRound) >= m.opts.CheckInterval/2 {
			lastRound = now
			p.sendChecks(true)
		}
		select {
		case <-ctx.Done():
			return
		case <-p.connCh:
			return
		case <-p.infoCh:
		case <-p.answerCh:
		case <-tick.C:
			if !warned && time.Since(start) > 30*time.Second {
				warned = true
				// Keep trying, but gently: one round a second.
				tick.Reset(max(m.opts.CheckInterval, time.Second))
				p.mu.Lock()
				lastErr := p.lastErr
				p.path, _ = p.path.next(evSlow, PathNone, time.Now())
				p.mu.Unlock()
				m.changed.broadcast()
				p.log.Warn("no path to peer yet; still trying", "after", time.Since(start).Round(time.Second), "last_err", lastErr)
			}
		}
		if dialer && p.dialBest(ctx, start) {
			return
		}
		if dialer && p.peerRelayDue(start) && p.dialViaPeers(ctx) {
			return
		}
	}
}

// dialBest dials the best pairs that answered since start, one after
// another while they fail, and reports whether a connection is up.
func (p *peer) dialBest(ctx context.Context, start time.Time) bool {
	m := p.m
	for range 2 * maxAnswers {
		now := time.Now()
		p.mu.Lock()
		pk, ok := p.cands.best(now, start, now.Sub(start) >= m.opts.RelayDelay)
		p.mu.Unlock()
		if !ok || ctx.Err() != nil {
			return false
		}
		ep := m.main
		if pk.via == viaRelay {
			ep = m.relay
		}
		conn, err := p.dial(ctx, ep, pk.to)
		if err != nil && ctx.Err() == nil && handshakeTimedOut(err) {
			// The pair answered a check a moment ago: small packets pass.
			err = fmt.Errorf("%w (connectivity checks are answered, but no QUIC handshake completes: "+
				"packets of 1,200 bytes do not pass; a path MTU below 1,228, QUIC's minimum, is the likely cause)", err)
		}
		p.mu.Lock()
		if err != nil {
			p.cands.failed(pk.to, pk.via, time.Now())
			if ctx.Err() == nil {
				p.lastErr = err
			}
		} else {
			p.cands.succeeded(pk.to, pk.via)
		}
		p.mu.Unlock()
		if err != nil {
			p.log.Debug("dial peer failed", "addr", pk.to, "relay", ep.relay, "err", err)
			continue
		}
		p.installConn(ctx, conn, ep)
		return true
	}
	return false
}

// peerRelayDue reports whether the dialer's search for a path that began
// at start may try peer relays now: after RelayDelay when neither side has
// a TURN relay, else once TURN has had its chance too (two handshake
// timeouts more). Direct paths, then TURN, come first.
func (p *peer) peerRelayDue(start time.Time) bool {
	m := p.m
	if m.opts.NoPeerRelay {
		return false
	}
	p.mu.Lock()
	turn := m.relayUp() || len(p.cands.relays()) > 0
	p.mu.Unlock()
	wait := m.opts.RelayDelay
	if turn {
		wait += 2 * m.opts.HandshakeTimeout
	}
	return time.Since(start) >= wait
}

// handshakeTimedOut reports whether a dial failed for want of an answer
// to its handshake (not a refusal, not a bad key).
func handshakeTimedOut(err error) bool {
	var hto *quic.HandshakeTimeoutError
	var idle *quic.IdleTimeoutError
	return errors.As(err, &hto) || errors.As(err, &idle) || errors.Is(err, context.DeadlineExceeded)
}

// maxAnswers bounds the pairs one round dials: checks go to at most
// MaxCandidates published and maxPrflx learned addresses, from two
// endpoints.
const maxAnswers = 64

// sendChecks sends one check from the main socket to each of p's
// candidates, and with relay also from the relay (in the background: a
// relay may first have to install permissions).
func (p *peer) sendChecks(relay bool) {
	m := p.m
	p.mu.Lock()
	key := p.key
	targets := p.cands.targets(time.Now())
	relays := p.cands.relays()
	p.mu.Unlock()
	if key == "" {
		return
	}
	user := checkUsername(m.opts.Study, p.pid, m.opts.PID)
	send := func(ep *endpoint, v via, to []netip.AddrPort) {
		for _, t := range to {
			tx := stun.NewTxID()
			if err := ep.stun.Send(t, stun.CheckRequest(tx, user, key), tx, key, p.answered(v)); err != nil {
				p.log.Debug("check not sent", "to", t, "relay", ep.relay, "err", err)
				continue
			}
			m.count.checksSent.Add(1)
		}
	}
	send(m.main, viaMain, targets)
	if relay && m.relayUp() && p.relaySending.CompareAndSwap(false, true) {
		select {
		case m.relayQ <- relayChecks{p, func() { send(m.relay, viaRelay, relayTargets(m.relay.relayed().Addr(), relays, targets)) }}:
		default:
			p.relaySending.Store(false)
		}
	}
}

// relayTargets keeps the addresses a relay server on own can reach: a
// relay on a public address reaches only public ones (coturn tears an
// allocation down when a send to an unroutable peer fails), one on a
// private address no loopback or link-local ones. It also drops the
// server's own relayed addresses (the peer's relays on our server's IP),
// which TURN servers refuse to relay to: a peer behind the same server is
// reached through its relay from our main socket instead, or through its
// NAT mapping toward our relay.
func relayTargets(own netip.Addr, relays, targets []netip.AddrPort) []netip.AddrPort {
	return slices.DeleteFunc(slices.Clone(targets), func(a netip.AddrPort) bool {
		ip := a.Addr()
		switch {
		case ip == own && slices.Contains(relays, a):
			return true
		case own.IsLoopback():
			return false
		case ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsUnspecified() || ip.IsMulticast():
			return true
		case own.IsPrivate():
			return false
		}
		return ip.IsPrivate()
	})
}

// relayChecks is one peer's round of checks through the relay.
type relayChecks struct {
	p    *peer
	send func()
}

func (p *peer) dial(ctx context.Context, ep *endpoint, to netip.AddrPort) (*quic.Conn, error) {
	p.mu.Lock()
	pin := p.info.Pin
	p.mu.Unlock()
	dctx, cancel := context.WithTimeout(ctx, p.m.opts.HandshakeTimeout)
	defer cancel()
	conn, err := ep.tr.Dial(dctx, net.UDPAddrFromAddrPort(to), p.m.clientTLS(p.pid, pin), p.m.qc)
	if err != nil {
		if ctx.Err() == nil {
			p.m.count.dialsFailed.Add(1)
		}
		return nil, fmt.Errorf("dial peer %d at %v: %w", p.pid, to, err)
	}
	p.m.count.dialsOK.Add(1)
	return conn, nil
}

// kindOf says whether l runs over a relay: it was made on our relay (and
// not migrated off it), or it talks to one of p's relay candidates.
func (p *peer) kindOf(l *link) PathKind {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.kindLocked(l)
}

func (p *peer) kindLocked(l *link) PathKind {
	if l.ep.session != nil {
		return PathPeerRelayed
	}
	if p.viaLocked(l) != "" {
		return PathRelayed
	}
	return PathDirect
}

// viaLocked names the relay a link runs through; "" for a direct link.
func (p *peer) viaLocked(l *link) string {
	switch {
	case l.direct.Load():
		return ""
	case l.ep.session != nil:
		return l.ep.session.where()
	case l.ep.relay:
		return l.ep.server
	case p.cands.isRelay(l.remote):
		return "peer's relay " + l.remote.String()
	}
	return ""
}

// addrOf is ap as a net.Addr.
func addrOf(ap netip.AddrPort) net.Addr { return net.UDPAddrFromAddrPort(ap) }

func addrPortOf(a net.Addr) netip.AddrPort {
	if ua, ok := a.(*net.UDPAddr); ok {
		ap := ua.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// installConn makes conn p's link, and starts serving the streams the peer
// opens on it. An older link drains: it serves its open streams to the end
// and then closes.
func (p *peer) installConn(ctx context.Context, conn *quic.Conn, ep *endpoint) {
	m := p.m
	l := newLink(conn, ep, nil)
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		m.closeLater(codeShutdown, "peer left the registry", conn)
		return
	}
	kind := p.kindLocked(l)
	via := p.viaLocked(l)
	l.tr, l.turn = p.trafficLocked(kind), kind == PathRelayed
	var repaired time.Duration
	p.path, repaired = p.path.next(evConnected, kind, time.Now())
	old, closing := p.pool.replace(l)
	p.poolCap.Store(0)
	p.lastErr = nil
	if repaired > 0 {
		p.repairs++
		p.lastRepair = repaired
		p.repairWhy = p.lostWhy
	}
	p.mu.Unlock()
	m.closeLater(codeReplaced, "replaced by a newer connection", conns(closing)...)
	m.changed.broadcast()
	if old != nil {
		m.wg.Go(func() { p.drain(ctx, old) })
	}
	if repaired > 0 {
		p.log.Info("path repaired", "after", repaired.Round(time.Millisecond), "via", kind, "addr", l.remote, "flows", m.flows.of(p.pid).count(),
			"reason", p.repairWhy)
	} else {
		p.log.Info("peer connected", "path", kind, "addr", l.remote, "via", via, "rtt", conn.ConnectionStats().SmoothedRTT)
	}
	m.wg.Go(func() { m.serveStreams(ctx, p.pid, l) })
	m.wg.Go(func() { m.serveDatagrams(ctx, p.pid, l) })
	if m.opts.PID < p.pid {
		m.wg.Go(func() { m.sayHello(ctx, p, l) })
	}
	// Flows still on the old connection move to the new one.
	p.poolChanged()
}

// drain closes l, p's replaced connection, once it carries no tunnelled
// connection (or after a day).
func (p *peer) drain(ctx context.Context, l *link) {
	defer func() {
		p.mu.Lock()
		p.pool.draining = slices.DeleteFunc(p.pool.draining, func(x *link) bool { return x == l })
		p.mu.Unlock()
	}()
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	deadline := time.Now().Add(24 * time.Hour)
	for l.open.Load() > 0 && time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return // Run closes everything
		case <-l.conn.Context().Done():
			return
		case <-t.C:
		}
	}
	l.conn.CloseWithError(codeReplaced, "replaced by a newer connection")
}

// dropLink forgets l, p's connection, after ev (evLost: a repair begins;
// evGone: the peer stopped or restarted).
func (p *peer) dropLink(l *link, err error, ev pathEvent) {
	p.mu.Lock()
	if p.pool.primary != l {
		p.mu.Unlock()
		return
	}
	p.pool.primary = nil
	closing := p.pool.takeMembers()
	p.path, _ = p.path.next(ev, PathNone, time.Now())
	p.lastErr = err
	var app *quic.ApplicationError
	switch {
	case errors.Is(err, errPathStalled), errors.As(err, &app) && app.Remote && app.ErrorCode == codeStalled:
		p.lostWhy = "stall"
	case errors.Is(err, errPathDead):
		p.lostWhy = "dead"
	default:
		p.lostWhy = "lost"
	}
	p.mu.Unlock()
	p.m.closeLater(codeReplaced, "path lost", conns(closing)...)
	p.m.changed.broadcast()
}

// hello records the boot id the peer sent on l, a new connection: a new
// one means the peer restarted, and the flows of its old instance (those
// opened before l) cannot be resumed.
func (p *peer) hello(boot uint64, l *link) {
	p.mu.Lock()
	restarted := p.boot != 0 && p.boot != boot
	p.boot = boot
	p.mu.Unlock()
	if restarted {
		p.m.resetFlows(p.pid, ResetPeerRestarted, l)
	}
}

// sayHello tells the peer on a new connection who we are, and learns who
// it is.
func (m *Mux) sayHello(ctx context.Context, p *peer, l *link) {
	hctx, cancel := context.WithTimeout(ctx, m.opts.HandshakeTimeout)
	defer cancel()
	str, reply, err := openStream(hctx, l.conn, header.Request{Kind: header.KindHello, Flow: m.boot})
	if err != nil {
		p.log.Debug("hello failed", "err", err)
		return
	}
	endStream(str)
	p.hello(reply.Rcvd, l)
}
