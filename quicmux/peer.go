package quicmux

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/config"
	"sfkit-proxy/stun"
)

// runPeer keeps a connection to p until ctx ends.
func (m *Mux) runPeer(ctx context.Context, p *peer) {
	log := m.log.With("peer", p.pid)
	for ctx.Err() == nil {
		m.mu.Lock()
		l, inst := p.link, p.info.Instance
		if l == nil && p.gone {
			// Its entry went away while connected; now the connection has too.
			log.Info("peer left the registry")
			m.removeLocked(p)
			m.broadcastLocked()
			m.mu.Unlock()
			return
		}
		m.mu.Unlock()
		if l == nil {
			m.connect(ctx, p, log)
			continue
		}
		m.keep(ctx, p, l, inst, log)
	}
}

// keep watches a live link until it ends, is replaced, or the peer
// restarts. While the link is relayed both sides keep checking the direct
// path, and the dialer moves to it when it answers.
func (m *Mux) keep(ctx context.Context, p *peer, l *link, inst string, log *slog.Logger) {
	var directChecks <-chan time.Time
	if m.linkKind(p, l) == PathRelayed {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		directChecks = t.C
	}
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
	for {
		select {
		case now := <-live.C:
			if n := l.conn.ConnectionStats().PacketsReceived; n != lastPackets {
				lastPackets, lastHeard = n, now
			} else if now.Sub(lastHeard) >= pathDeadAfter {
				l.conn.CloseWithError(codePathDead, "path dead")
			}
			if dialer {
				m.shrink(p, now)
			}
		case <-p.poolCh:
			if settle == nil {
				settle = time.After(balanceDelay)
			}
		case <-settle:
			settle = nil
			m.balance(p)
			if dialer && m.opts.ConnsPerPeer > 1 {
				m.wg.Go(func() { m.grow(ctx, p, l, log) })
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
				log.Info("peer shut down")
				m.dropLink(p, l, err, evGone)
				m.resetFlows(p.pid, ResetPeerShutdown, nil)
				return
			}
			log.Warn("path lost; tunnelled connections wait for a new one", "err", err)
			m.dropLink(p, l, err, evLost)
			if m.opts.OnPathLost != nil {
				m.opts.OnPathLost()
			}
			return
		case <-p.infoCh:
			m.mu.Lock()
			restarted := p.info.Instance != inst || PinOf(l.conn.ConnectionState().TLS.PeerCertificates[0]) != p.info.Pin
			m.mu.Unlock()
			if restarted {
				log.Info("peer restarted; reconnecting")
				l.conn.CloseWithError(codeRestart, "peer restarted")
				m.dropLink(p, l, errors.New("peer restarted"), evGone)
				m.resetFlows(p.pid, ResetPeerRestarted, nil)
			}
			return
		case <-directChecks:
			m.sendChecks(p, false)
		case <-p.answers.ready:
			for _, r := range p.answers.take() {
				m.count.checksAnswered.Add(1)
				if directChecks == nil || m.opts.PID > p.pid || !m.isDirectTarget(p, r.From) {
					continue
				}
				m.upgrade(ctx, p, l, r.From, log)
				return
			}
		case <-p.relayAnswers.ready:
			m.count.checksAnswered.Add(uint64(len(p.relayAnswers.take())))
		}
	}
}

// upgrade moves p from a relayed link to the direct path to `to`: by QUIC
// connection migration when only the local socket changes (the link runs
// on our relay and `to` is the address it already talks to), which keeps
// every open stream; otherwise by a new direct connection, the old one
// draining until its streams end.
func (m *Mux) upgrade(ctx context.Context, p *peer, l *link, to netip.AddrPort, log *slog.Logger) {
	if l.ep.relay && !l.direct.Load() && l.remote == to {
		err := m.migrate(ctx, p, l)
		if err == nil {
			m.mu.Lock()
			m.broadcastLocked()
			m.mu.Unlock()
			log.Info("path switched", "from", PathRelayed, "to", PathDirect, "addr", to)
			// Tell the acceptor, which cannot see the switch itself.
			nctx, cancel := context.WithTimeout(ctx, m.opts.DialTimeout)
			defer cancel()
			if str, _, err := openStream(nctx, l.conn, Request{Kind: KindPathNotice}); err == nil {
				endStream(str)
			}
			return
		}
		log.Info("could not migrate to the direct path; opening a new connection", "err", err)
	}
	conn, err := m.dial(ctx, p, m.main, to)
	if err != nil {
		if ctx.Err() == nil {
			m.count.dialsFailed.Add(1)
			log.Debug("direct dial failed", "addr", to, "err", err)
		}
		return
	}
	m.count.dialsOK.Add(1)
	log.Info("direct path found; new connections use it, relayed ones finish on the relay")
	m.installConn(ctx, p, conn, m.main)
}

// migrate switches l, p's connection, from the relay socket to the main one.
func (m *Mux) migrate(ctx context.Context, p *peer, l *link) error {
	path, err := l.conn.AddPath(m.main.tr)
	if err != nil {
		return err
	}
	pctx, cancel := context.WithTimeout(ctx, m.opts.DialTimeout)
	defer cancel()
	if err := path.Probe(pctx); err != nil {
		path.Close()
		return fmt.Errorf("probe: %w", err)
	}
	if err := path.Switch(); err != nil {
		path.Close()
		return fmt.Errorf("switch: %w", err)
	}
	l.direct.Store(true)
	// The members still run on the relay: their flows move to the
	// primary, and the pool grows again on the direct path.
	m.mu.Lock()
	if p.link == l {
		m.closeMembersLocked(p, codeReplaced, "the pool moves to the direct path")
	}
	m.mu.Unlock()
	return nil
}

// Peer-reflexive addresses: how many are kept per peer, and how long one
// is checked after the last check that came from it.
const (
	maxPrflx = 8
	prflxTTL = time.Minute
)

// learn remembers an address an authenticated check of p came from: the
// newest maxPrflx of them, each until it has been silent for prflxTTL.
func (m *Mux) learn(p *peer, ap netip.AddrPort) {
	if err := m.addrPolicy().CheckCandidate(ap); err != nil {
		return
	}
	now := time.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	p.prflx[ap] = now
	for a, t := range p.prflx {
		if now.Sub(t) > prflxTTL {
			delete(p.prflx, a)
		}
	}
	for len(p.prflx) > maxPrflx {
		oldest := ap
		for a, t := range p.prflx {
			if t.Before(p.prflx[oldest]) {
				oldest = a
			}
		}
		delete(p.prflx, oldest)
	}
}

// pair is a local endpoint and a remote address.
type pair struct {
	ep *endpoint
	to netip.AddrPort
}

// connect sends connectivity checks from every local endpoint to every
// candidate of p until a connection is up. The lower pid dials: at once on a
// direct pair that answers; on a relayed pair only when no direct pair has
// answered within RelayDelay, preferring pairs through its own relay (those
// can migrate to the direct path later). The higher pid waits for the accept
// loop.
func (m *Mux) connect(ctx context.Context, p *peer, log *slog.Logger) {
	tick := time.NewTicker(m.opts.CheckInterval)
	defer tick.Stop()
	dialer := m.opts.PID < p.pid
	// Answers to an earlier round may still be held; their paths may be gone.
	p.answers.take()
	p.relayAnswers.take()
	start := time.Now()
	warned := false
	var relayed *pair
	// A pair whose dial failed waits before the next dial, 250 ms doubling
	// to 8 s: checks may answer many times a second, and every handshake
	// costs both sides (and counts against the peer's per-source limit).
	type failures struct {
		n    int
		next time.Time
	}
	failed := make(map[pair]*failures)
	try := func(pr pair) bool {
		if f := failed[pr]; f != nil && time.Now().Before(f.next) {
			return false
		}
		conn, err := m.dial(ctx, p, pr.ep, pr.to)
		if err != nil {
			if ctx.Err() == nil {
				m.count.dialsFailed.Add(1)
				log.Debug("dial peer failed", "addr", pr.to, "relay", pr.ep.relay, "err", err)
				m.setErr(p, err)
				f := failed[pr]
				if f == nil {
					f = &failures{}
					failed[pr] = f
				}
				f.next = time.Now().Add(min(250*time.Millisecond<<f.n, 8*time.Second))
				f.n = min(f.n+1, 6)
			}
			return false
		}
		m.count.dialsOK.Add(1)
		m.installConn(ctx, p, conn, pr.ep)
		return true
	}
	for {
		m.sendChecks(p, true)
		select {
		case <-ctx.Done():
			return
		case <-p.connCh:
			return
		case <-p.infoCh:
		case <-tick.C:
			if dialer && relayed != nil && time.Since(start) >= m.opts.RelayDelay {
				if try(*relayed) {
					return
				}
				relayed = nil
			}
			if !warned && time.Since(start) > 30*time.Second {
				warned = true
				// Keep trying, but gently: one round a second.
				tick.Reset(max(m.opts.CheckInterval, time.Second))
				m.mu.Lock()
				lastErr := p.lastErr
				p.path, _ = p.path.next(evSlow, "", time.Now())
				m.broadcastLocked()
				m.mu.Unlock()
				log.Warn("no path to peer yet; still trying", "after", time.Since(start).Round(time.Second), "last_err", lastErr)
			}
		case <-p.answers.ready:
			// Newest first: after a burst, what answered last is likeliest
			// to work.
			for _, r := range p.answers.take() {
				m.count.checksAnswered.Add(1)
				if !dialer || !slices.Contains(m.targets(p), r.From) {
					continue
				}
				if !m.isRelayCandidate(p, r.From) {
					if try(pair{m.main, r.From}) {
						return
					}
					continue
				}
				if relayed == nil {
					relayed = &pair{m.main, r.From}
				}
			}
		case <-p.relayAnswers.ready:
			for _, r := range p.relayAnswers.take() {
				m.count.checksAnswered.Add(1)
				if dialer && slices.Contains(m.targets(p), r.From) && (relayed == nil || !relayed.ep.relay) {
					relayed = &pair{m.relay, r.From}
				}
			}
		}
	}
}

func (m *Mux) setErr(p *peer, err error) {
	m.mu.Lock()
	p.lastErr = err.Error()
	m.mu.Unlock()
}

// sendChecks sends one check from the main socket to each of p's
// candidates, and with relay also from the relay (in the background: a
// relay may first have to install permissions).
func (m *Mux) sendChecks(p *peer, relay bool) {
	m.mu.Lock()
	key := p.key
	m.mu.Unlock()
	if key == "" {
		return
	}
	user := checkUsername(m.opts.Study, p.pid, m.opts.PID)
	targets := m.targets(p)
	send := func(ep *endpoint, out *answers, to []netip.AddrPort) {
		for _, t := range to {
			tx := stun.NewTxID()
			if err := ep.stun.Send(t, stun.CheckRequest(tx, user, key), tx, key, out.put); err != nil {
				m.log.Debug("check not sent", "peer", p.pid, "to", t, "relay", ep.relay, "err", err)
				continue
			}
			m.count.checksSent.Add(1)
		}
	}
	if !m.blockDirect.Load() {
		send(m.main, p.answers, targets)
	}
	if relay && m.relay != nil && p.relaySending.CompareAndSwap(false, true) {
		select {
		case m.relayQ <- relayChecks{p, func() { send(m.relay, p.relayAnswers, m.relayTargets(p, targets)) }}:
		default:
			p.relaySending.Store(false)
		}
	}
}

// relayTargets keeps the addresses the relay server can reach: a relay on
// a public address reaches only public ones (coturn tears an allocation
// down when a send to an unroutable peer fails), one on a private address
// no loopback or link-local ones. It also drops the server's own relayed
// addresses (p's relay candidates on our server's IP), which TURN servers
// refuse to relay to: a peer behind the same server is reached through its
// relay from our main socket instead, or through its NAT mapping toward
// our relay.
func (m *Mux) relayTargets(p *peer, targets []netip.AddrPort) []netip.AddrPort {
	own := m.opts.Relay.Addr.Addr()
	m.mu.Lock()
	relays := slices.Clone(p.info.Relays)
	m.mu.Unlock()
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

// targets are the addresses to check for p: its published candidates and
// the addresses its own checks came from lately, of our socket's family.
func (m *Mux) targets(p *peer) []netip.AddrPort {
	now := time.Now()
	m.mu.Lock()
	all := slices.Clone(p.info.Candidates)
	for a, t := range p.prflx {
		if now.Sub(t) <= prflxTTL {
			all = append(all, a)
		}
	}
	m.mu.Unlock()
	v4 := m.LocalAddr().Addr().Is4()
	all = slices.DeleteFunc(all, func(a netip.AddrPort) bool { return a.Addr().Is4() != v4 })
	slices.SortFunc(all, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return slices.Compact(all)
}

func (m *Mux) isRelayCandidate(p *peer, a netip.AddrPort) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Contains(p.info.Relays, a)
}

func (m *Mux) isDirectTarget(p *peer, a netip.AddrPort) bool {
	return slices.Contains(m.targets(p), a) && !m.isRelayCandidate(p, a)
}

func (m *Mux) dial(ctx context.Context, p *peer, ep *endpoint, to netip.AddrPort) (*quic.Conn, error) {
	m.mu.Lock()
	pin := p.info.Pin
	m.mu.Unlock()
	dctx, cancel := context.WithTimeout(ctx, m.opts.DialTimeout)
	defer cancel()
	conn, err := ep.tr.Dial(dctx, net.UDPAddrFromAddrPort(to), m.clientTLS(p.pid, pin), m.qc)
	if err != nil {
		return nil, fmt.Errorf("dial peer %d at %v: %w", p.pid, to, err)
	}
	return conn, nil
}

// linkKind says whether l runs over a relay: it was made on our relay (and
// not migrated off it), or it talks to one of p's relay candidates.
func (m *Mux) linkKind(p *peer, l *link) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.linkKindLocked(p, l)
}

func (m *Mux) linkKindLocked(p *peer, l *link) string {
	if m.viaLocked(p, l) != "" {
		return PathRelayed
	}
	return PathDirect
}

// viaLocked names the relay a link runs through; "" for a direct link.
func (m *Mux) viaLocked(p *peer, l *link) string {
	switch {
	case l.direct.Load():
		return ""
	case l.ep.relay:
		return l.ep.server
	case slices.Contains(p.info.Relays, l.remote):
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
func (m *Mux) installConn(ctx context.Context, p *peer, conn *quic.Conn, ep *endpoint) {
	l := &link{conn: conn, ep: ep, since: time.Now(), local: addrPortOf(conn.LocalAddr()), remote: addrPortOf(conn.RemoteAddr())}
	m.mu.Lock()
	old := p.link
	kind := m.linkKindLocked(p, l)
	via := m.viaLocked(p, l)
	l.tr = p.trafficLocked(kind)
	var repaired time.Duration
	p.path, repaired = p.path.next(evConnected, kind, time.Now())
	p.link, p.lastErr = l, ""
	m.closeMembersLocked(p, codeReplaced, "replaced by a newer connection")
	if old != nil {
		old.draining.Store(true)
		p.draining = append(p.draining, old)
	}
	evicted := m.evictDrainingLocked(p)
	if repaired > 0 {
		p.repairs++
		p.lastRepair = repaired
	}
	waiting := len(m.flows[p.pid])
	m.broadcastLocked()
	m.mu.Unlock()
	for _, d := range evicted {
		d.conn.CloseWithError(codeReplaced, "too many replaced connections still open")
	}
	if old != nil {
		m.wg.Go(func() { m.drain(ctx, p, old) })
	}
	if repaired > 0 {
		m.log.Info("path repaired", "peer", p.pid, "after", repaired.Round(time.Millisecond), "via", kind, "addr", l.remote, "flows", waiting)
	} else {
		m.log.Info("peer connected", "peer", p.pid, "path", kind, "addr", l.remote, "via", via,
			"rtt", conn.ConnectionStats().SmoothedRTT)
	}
	m.wg.Go(func() { m.serveStreams(ctx, p.pid, l) })
	if m.opts.PID < p.pid {
		m.wg.Go(func() { m.sayHello(ctx, p.pid, l) })
	}
	// Flows still on the old connection move to the new one.
	notify(p.poolCh)
}

// evictDrainingLocked takes the oldest of p's replaced connections off its
// list, as many as keep p within config.MaxConnsPerPeer connections (so
// that a peer that keeps replacing its connection while holding a flow on
// each cannot keep them all), and returns them, for the caller to close
// once it has let go of the lock.
func (m *Mux) evictDrainingLocked(p *peer) []*link {
	n := len(p.draining) + len(p.pool) + 1 - config.MaxConnsPerPeer
	if n <= 0 {
		return nil
	}
	evicted := slices.Clone(p.draining[:n])
	p.draining = slices.Delete(p.draining, 0, n)
	return evicted
}

// drain closes l, p's replaced connection, once it carries no tunnelled
// connection (or after a day).
func (m *Mux) drain(ctx context.Context, p *peer, l *link) {
	defer func() {
		m.mu.Lock()
		p.draining = slices.DeleteFunc(p.draining, func(x *link) bool { return x == l })
		m.mu.Unlock()
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
func (m *Mux) dropLink(p *peer, l *link, err error, ev pathEvent) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if p.link != l {
		return
	}
	p.link = nil
	m.closeMembersLocked(p, codeReplaced, "path lost")
	p.path, _ = p.path.next(ev, "", time.Now())
	p.lastErr = err.Error()
	m.broadcastLocked()
}
