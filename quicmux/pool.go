package quicmux

import (
	"context"
	"errors"
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
// ConnsPerPeer (config.MaxConnsPerPeer at most; an acceptor refuses more
// than its own ConnsPerPeer and two replaced ones, see pool.limit),
// and closes a member that has carried nothing for a while (30 s). Each
// side spreads the flows it opened over the connections: a new flow goes
// to the one carrying fewest of them, and when the pool changes, flows
// move (a resume, package flow: nothing is lost) until the counts differ
// by at most one (spread, a pure function). A member dies with its
// primary: the path is the same.

// memberName marks a handshake as a pool member's.
const memberName = ".pool"

// pool is a peer's QUIC connections. Guarded by its peer's mu.
type pool struct {
	// limit bounds the connections, draining ones included: what QUIC may
	// hold for the peer is limit connection windows.
	limit   int
	primary *link   // the connection in use; nil when none
	members []*link // the primary's members
	// draining are replaced primaries still carrying flows, oldest first:
	// with primary and members, never more than limit.
	draining []*link
}

// poolLimit is the most connections a pool holds: ConnsPerPeer, and two
// replaced ones while their flows move.
func poolLimit(connsPerPeer int) int { return min(connsPerPeer+2, config.MaxConnsPerPeer) }

// live are the pool's live connections, the primary first.
func (pl *pool) live() []*link {
	if pl.primary == nil {
		return nil
	}
	ls := []*link{pl.primary}
	for _, l := range pl.members {
		if l.conn.Context().Err() == nil {
			ls = append(ls, l)
		}
	}
	return ls
}

// takeMembers forgets the members and returns them, for the caller to
// close once it has let go of the lock.
func (pl *pool) takeMembers() []*link {
	ms := pl.members
	pl.members = nil
	return ms
}

// replace makes l the primary; the old primary drains. It returns the
// connections to close: the old members, and the oldest draining ones
// past its limit (a peer that keeps replacing its connection
// while holding a flow on each cannot keep them all).
func (pl *pool) replace(l *link) (old *link, closing []*link) {
	old = pl.primary
	pl.primary = l
	closing = pl.takeMembers()
	if old != nil {
		old.draining.Store(true)
		pl.draining = append(pl.draining, old)
	}
	return old, append(closing, pl.evict()...)
}

// evict takes the oldest draining connections off the list, as many as
// keep the pool within its limit, and returns them.
func (pl *pool) evict() []*link {
	n := len(pl.draining) + len(pl.members) + 1 - pl.limit
	if n <= 0 {
		return nil
	}
	evicted := slices.Clone(pl.draining[:n])
	pl.draining = slices.Delete(pl.draining, 0, n)
	return evicted
}

// all are every connection of the pool, draining ones included.
func (pl *pool) all() []*link {
	var ls []*link
	if pl.primary != nil {
		ls = append(ls, pl.primary)
	}
	return slices.Concat(ls, pl.members, pl.draining)
}

// move is a flow that goes to another connection, by index.
type move[F any] struct {
	flow F
	to   int
}

// spread plans the moves that leave the connections carrying as many
// flows each, give or take one: on[i] are the flows on connection i,
// stray those on no connection of the pool (they move first, each to the
// connection carrying fewest). It returns the moves and does nothing else.
func spread[F any](on [][]F, stray []F) []move[F] {
	if len(on) == 0 {
		return nil
	}
	n := make([]int, len(on))
	for i, fs := range on {
		n[i] = len(fs)
	}
	fewest := func() int {
		best := 0
		for i := range n {
			if n[i] < n[best] {
				best = i
			}
		}
		return best
	}
	var moves []move[F]
	for _, f := range stray {
		to := fewest()
		n[to]++
		moves = append(moves, move[F]{f, to})
	}
	left := make([][]F, len(on)) // what may still move off each
	for i, fs := range on {
		left[i] = slices.Clone(fs)
	}
	for {
		hi, lo := 0, fewest()
		for i := range n {
			if n[i] > n[hi] {
				hi = i
			}
		}
		if n[hi]-n[lo] < 2 || len(left[hi]) == 0 {
			return moves
		}
		f := left[hi][len(left[hi])-1]
		left[hi] = left[hi][:len(left[hi])-1]
		n[hi]--
		n[lo]++
		moves = append(moves, move[F]{f, lo})
	}
}

// flowMove is a flow of ours and where it runs.
type flowMove struct {
	key flowKey
	e   *flowEntry
}

// mineLocked lists, per connection of ls, the flows to p we opened that
// run on it, and those on no connection of ls (not while a resume is
// under way: it chooses its own).
func (p *peer) mineLocked(ls []*link) (on [][]flowMove, stray []flowMove) {
	at := make(map[*link]int, len(ls))
	for i, l := range ls {
		at[l] = i
	}
	on = make([][]flowMove, len(ls))
	pf := p.m.flows.of(p.pid)
	pf.mu.Lock()
	defer pf.mu.Unlock()
	for k, e := range pf.live {
		if !k.mine {
			continue
		}
		if i, ok := at[e.on.Load()]; ok {
			on[i] = append(on[i], flowMove{k, e})
		} else if !e.resuming.Load() {
			stray = append(stray, flowMove{k, e})
		}
	}
	return on, stray
}

// pickLocked is the connection to p carrying fewest of the flows we
// opened; nil when there is none.
func (p *peer) pickLocked() *link {
	ls := p.pool.live()
	if len(ls) < 2 {
		return p.pool.primary
	}
	on, _ := p.mineLocked(ls)
	best := 0
	for i := range on {
		if len(on[i]) < len(on[best]) {
			best = i
		}
	}
	return ls[best]
}

// balance moves the flows we opened to p so that its connections carry
// as many each, give or take one.
func (p *peer) balance() {
	p.mu.Lock()
	ls := p.pool.live()
	on, stray := p.mineLocked(ls)
	moves := spread(on, stray)
	for _, mv := range moves {
		mv.flow.e.want.Store(ls[mv.to])
		mv.flow.e.on.Store(ls[mv.to])
	}
	p.mu.Unlock()
	for _, mv := range moves {
		p.m.wg.Go(func() { p.m.resume(mv.flow.key, mv.flow.e) })
	}
}

// grow opens members until p has a connection per flow, up to
// ConnsPerPeer (dialer only).
func (p *peer) grow(ctx context.Context, primary *link) {
	if primary.ep.session != nil {
		return // one connection through a peer relay: the relay's own connections carry it
	}
	if !p.growing.CompareAndSwap(false, true) {
		return
	}
	defer p.growing.Store(false)
	m := p.m
	for range config.MaxConnsPerPeer {
		flows := m.flows.of(p.pid).count()
		p.mu.Lock()
		have := len(p.pool.live())
		want := min(m.opts.ConnsPerPeer, max(flows, 1)) - have
		if c := int(p.poolCap.Load()); c > 0 {
			want = min(want, c-have)
		}
		current := p.pool.primary == primary
		p.mu.Unlock()
		if want <= 0 || !current || ctx.Err() != nil {
			return
		}
		var wg sync.WaitGroup
		var failed, refused atomic.Bool
		for range want {
			wg.Go(func() {
				start := time.Now()
				conn, ep, err := p.dialMember(ctx, primary)
				if err != nil {
					p.log.Debug("pool connection not opened", "err", err)
					failed.Store(true)
					var te *quic.TransportError
					refused.Store(errors.As(err, &te) && te.Remote) // the peer's handshake said no
					return
				}
				p.log.Debug("pool connection opened", "handshake", time.Since(start).Round(time.Microsecond))
				if !p.installMember(ctx, primary, conn, ep) {
					failed.Store(true)
				}
			})
		}
		wg.Wait()
		if failed.Load() {
			// The next flow tries again, unless the peer refused: then
			// no more than it took, until the primary changes.
			if refused.Load() {
				p.mu.Lock()
				p.poolCap.Store(int32(len(p.pool.live())))
				p.mu.Unlock()
			}
			return
		}
	}
}

// dialMember opens a pool member of primary, on the endpoint primary
// runs on now.
func (p *peer) dialMember(ctx context.Context, primary *link) (*quic.Conn, *endpoint, error) {
	m := p.m
	ep := primary.ep
	if primary.direct.Load() {
		ep = m.main // it migrated off our relay
	}
	p.mu.Lock()
	pin := p.info.Pin
	p.mu.Unlock()
	dctx, cancel := context.WithTimeout(ctx, m.opts.HandshakeTimeout)
	defer cancel()
	tc := m.clientTLS(p.pid, pin)
	tc.ServerName = handshakeName(m.opts.PID, p.pid) + memberName
	conn, err := ep.tr.Dial(dctx, addrOf(primary.remote), tc, m.qc)
	return conn, ep, err
}

// installMember adds conn to p's pool, if primary is still p's connection.
func (p *peer) installMember(ctx context.Context, primary *link, conn *quic.Conn, ep *endpoint) bool {
	m := p.m
	l := newLink(conn, ep, primary)
	p.mu.Lock()
	if primary == nil || p.pool.primary != primary || len(p.pool.members) >= p.pool.limit-1 {
		p.mu.Unlock()
		m.closeLater(codeRejected, "not a member of the current pool", conn)
		return false
	}
	l.direct.Store(primary.direct.Load())
	l.tr = p.trafficLocked(p.kindLocked(l))
	l.turn = p.kindLocked(l) == PathRelayed
	p.pool.members = append(p.pool.members, l)
	evicted := p.pool.evict()
	m.count.poolOpened.Add(1)
	p.mu.Unlock()
	m.closeLater(codeReplaced, "too many replaced connections still open", conns(evicted)...)
	m.changed.broadcast()
	m.wg.Go(func() { m.serveStreams(ctx, p.pid, l) })
	m.wg.Go(func() { m.serveDatagrams(ctx, p.pid, l) })
	m.wg.Go(func() {
		select {
		case <-conn.Context().Done():
		case <-ctx.Done():
		}
		p.mu.Lock()
		p.pool.members = slices.DeleteFunc(p.pool.members, func(x *link) bool { return x == l })
		p.mu.Unlock()
		m.changed.broadcast()
		p.poolChanged()
	})
	p.poolChanged()
	return true
}

// shrink closes the members that carried nothing for the pool's idle time
// (dialer only).
func (p *peer) shrink(now time.Time) {
	var idle []*link
	p.mu.Lock()
	for _, l := range p.pool.members {
		switch {
		case l.open.Load() > 0:
			l.idleSince = time.Time{}
		case l.idleSince.IsZero():
			l.idleSince = now
		case now.Sub(l.idleSince) >= p.m.tune.poolIdle:
			idle = append(idle, l)
		}
	}
	p.mu.Unlock()
	p.m.closeLater(codeIdle, "idle pool connection", conns(idle)...)
}

// poolChanged tells p's loop that a flow was attached or the pool changed.
func (p *peer) poolChanged() { notify(p.poolCh) }

// poolChanged tells party pid's loop, if it is registered.
func (m *Mux) poolChanged(pid int) {
	if p := m.peer(pid); p != nil {
		p.poolChanged()
	}
}

// conns are the QUIC connections of ls.
func conns(ls []*link) []*quic.Conn {
	out := make([]*quic.Conn, len(ls))
	for i, l := range ls {
		out[i] = l.conn
	}
	return out
}
