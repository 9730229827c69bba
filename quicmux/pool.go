package quicmux

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/config"
)

// The pool. A peer's connection (the primary: it carries hellos, path
// notices and the liveness watch) may have members: more QUIC connections
// on the same path, same sockets and same remote address (QUIC tells them
// apart by connection ID), each with the same pinned mutual TLS. Each has
// its own congestion controller, so that N bulk flows get N windows, as N
// TCP connections would; on a lossy path one window is one flow's share.
//
// Only the dialer (the lower pid) opens and closes members: it keeps as
// many connections as the peer has flows, both directions counted, up to
// ConnsPerPeer (config.MaxConnsPerPeer at most; an acceptor refuses more),
// and closes a member that has carried nothing for poolIdle (30 s). Each side spreads the flows it opened over the connections:
// a new flow goes to the one carrying fewest of them, and when the pool
// changes, flows move (a resume, package flow: nothing is lost) until the
// counts differ by at most one. A member dies with its primary: the path
// is the same.

// Pool timings.
const (
	// defaultPoolIdle is how long a member may carry nothing before the
	// dialer closes it.
	defaultPoolIdle = 30 * time.Second
	// balanceDelay lets a burst of pool changes settle before flows move.
	balanceDelay = 100 * time.Millisecond
)

// memberName marks a handshake as a pool member's.
const memberName = ".pool"

// linksLocked are p's live connections, the primary first.
func (m *Mux) linksLocked(p *peer) []*link {
	if p.link == nil {
		return nil
	}
	ls := []*link{p.link}
	for _, l := range p.pool {
		if l.conn.Context().Err() == nil {
			ls = append(ls, l)
		}
	}
	return ls
}

// pickLocked is the connection to p carrying fewest of the flows we
// opened; nil when there is none.
func (m *Mux) pickLocked(p *peer) *link {
	ls := m.linksLocked(p)
	if len(ls) < 2 {
		return p.link
	}
	return fewest(ls, m.mineLocked(p, ls))
}

// fewest is the connection of ls (the first on a tie) with the fewest
// flows in on.
func fewest(ls []*link, on map[*link][]flowMove) *link {
	best := ls[0]
	for _, l := range ls[1:] {
		if len(on[l]) < len(on[best]) {
			best = l
		}
	}
	return best
}

// mineLocked lists, per connection of ls, the flows to p we opened that
// run on it.
func (m *Mux) mineLocked(p *peer, ls []*link) map[*link][]flowMove {
	n := make(map[*link][]flowMove, len(ls))
	for _, l := range ls {
		n[l] = nil
	}
	for k, e := range m.flows[p.pid] {
		if !k.mine {
			continue
		}
		on := e.on.Load()
		if _, ok := n[on]; ok {
			n[on] = append(n[on], flowMove{k, e, nil})
		} else if !e.resuming.Load() {
			n[nil] = append(n[nil], flowMove{k, e, nil}) // on a connection no longer in the pool
		}
	}
	return n
}

// flowMove is a flow of ours that moves to another connection.
type flowMove struct {
	key flowKey
	e   *flowEntry
	to  *link
}

// balance moves the flows we opened to p so that its connections carry
// as many each, give or take one: those left on a connection that is no
// longer in the pool first.
func (m *Mux) balance(p *peer) {
	m.mu.Lock()
	ls := m.linksLocked(p)
	if len(ls) == 0 {
		m.mu.Unlock()
		return
	}
	on := m.mineLocked(p, ls)
	var moves []flowMove
	for _, f := range on[nil] {
		f.to = fewest(ls, on)
		on[f.to] = append(on[f.to], f)
		moves = append(moves, f)
	}
	for range len(m.flows[p.pid]) {
		hi := ls[0]
		for _, l := range ls[1:] {
			if len(on[l]) > len(on[hi]) {
				hi = l
			}
		}
		lo := fewest(ls, on)
		if len(on[hi])-len(on[lo]) < 2 {
			break
		}
		f := on[hi][len(on[hi])-1]
		on[hi] = on[hi][:len(on[hi])-1]
		f.to = lo
		on[lo] = append(on[lo], f)
		moves = append(moves, f)
	}
	for _, f := range moves {
		f.e.want.Store(f.to)
		f.e.on.Store(f.to)
	}
	m.mu.Unlock()
	for _, f := range moves {
		m.wg.Go(func() { m.resume(f.key, f.e) })
	}
}

// grow opens members until p has a connection per flow, up to
// ConnsPerPeer (dialer only).
func (m *Mux) grow(ctx context.Context, p *peer, primary *link, log *slog.Logger) {
	if !p.growing.CompareAndSwap(false, true) {
		return
	}
	defer p.growing.Store(false)
	for range config.MaxConnsPerPeer {
		m.mu.Lock()
		flows := len(m.flows[p.pid])
		want := min(m.opts.ConnsPerPeer, max(flows, 1)) - len(m.linksLocked(p))
		pin, current := p.info.Pin, p.link == primary
		m.mu.Unlock()
		if want <= 0 || !current || ctx.Err() != nil {
			return
		}
		ep := primary.ep
		if primary.direct.Load() {
			ep = m.main // it migrated off our relay
		}
		var wg sync.WaitGroup
		var failed atomic.Bool
		for range want {
			wg.Go(func() {
				dctx, cancel := context.WithTimeout(ctx, m.opts.DialTimeout)
				defer cancel()
				tc := m.clientTLS(p.pid, pin)
				tc.ServerName = handshakeName(m.opts.PID, p.pid) + memberName
				start := time.Now()
				conn, err := ep.tr.Dial(dctx, addrOf(primary.remote), tc, m.qc)
				if err != nil {
					log.Debug("pool connection not opened", "err", err)
					failed.Store(true)
					return
				}
				log.Debug("pool connection opened", "handshake", time.Since(start).Round(time.Microsecond))
				if !m.installMember(ctx, p, primary, conn, ep) {
					failed.Store(true)
				}
			})
		}
		wg.Wait()
		if failed.Load() {
			return // the next flow tries again
		}
	}
}

// installMember adds conn to p's pool, if primary is still p's connection.
func (m *Mux) installMember(ctx context.Context, p *peer, primary *link, conn *quic.Conn, ep *endpoint) bool {
	l := &link{conn: conn, ep: ep, since: time.Now(), local: addrPortOf(conn.LocalAddr()),
		remote: addrPortOf(conn.RemoteAddr()), primary: primary}
	m.mu.Lock()
	if primary == nil || p.link != primary || len(p.pool) >= config.MaxConnsPerPeer-1 {
		m.mu.Unlock()
		conn.CloseWithError(codeRejected, "not a member of the current pool")
		return false
	}
	l.direct.Store(primary.direct.Load())
	l.tr = p.trafficLocked(m.linkKindLocked(p, l))
	p.pool = append(p.pool, l)
	evicted := m.evictDrainingLocked(p)
	m.count.poolOpened.Add(1)
	m.broadcastLocked()
	m.mu.Unlock()
	for _, d := range evicted {
		d.conn.CloseWithError(codeReplaced, "too many replaced connections still open")
	}
	m.wg.Go(func() { m.serveStreams(ctx, p.pid, l) })
	m.wg.Go(func() {
		select {
		case <-conn.Context().Done():
		case <-ctx.Done():
		}
		m.mu.Lock()
		p.pool = slices.DeleteFunc(p.pool, func(x *link) bool { return x == l })
		m.broadcastLocked()
		m.mu.Unlock()
		notify(p.poolCh)
	})
	notify(p.poolCh)
	return true
}

// closeMembersLocked closes p's members with code (their primary was
// lost, replaced, or is shutting down); their flows move to whatever
// connection comes next.
func (m *Mux) closeMembersLocked(p *peer, code quic.ApplicationErrorCode, why string) {
	for _, l := range p.pool {
		l.conn.CloseWithError(code, why)
	}
	p.pool = nil
}

// shrink closes the members that carried nothing for poolIdle (dialer
// only).
func (m *Mux) shrink(p *peer, now time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, l := range p.pool {
		switch {
		case l.open.Load() > 0:
			l.idleSince = time.Time{}
		case l.idleSince.IsZero():
			l.idleSince = now
		case now.Sub(l.idleSince) >= m.opts.poolIdle:
			l.conn.CloseWithError(codeIdle, "idle pool connection")
		}
	}
}

// poolChanged tells pid's peer loop that a flow was attached or the pool
// changed.
func (m *Mux) poolChanged(pid int) {
	m.mu.Lock()
	p := m.peers[pid]
	m.mu.Unlock()
	if p != nil {
		notify(p.poolCh)
	}
}
