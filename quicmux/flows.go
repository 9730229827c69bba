package quicmux

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/backoff"
	"sfkit-proxy/flow"
	"sfkit-proxy/quicmux/header"
)

// flowKey names a flow: the peer, which side opened it, and its id.
type flowKey struct {
	pid  int
	mine bool // we opened it (a local client dialled): we resume it
	id   uint64
}

// ResetReason is why a flow was reset, as counted.
type ResetReason uint8

// Reset reasons.
const (
	resetNone          ResetReason = iota // none
	ResetByPeer                           // connection_reset
	ResetResumeTimeout                    // resume_timeout
	ResetPeerRestarted                    // peer_restarted
	ResetPeerShutdown                     // peer_shutdown
	ResetPeerLostFlow                     // peer_lost_flow
	ResetShutdown                         // shutdown
	ResetProtocol                         // protocol
	numResetReasons
)

// flowEntry is a live flow.
type flowEntry struct {
	c        *flow.Conn
	born     *link // the connection it was opened on
	port     uint16
	log      *slog.Logger
	resuming atomic.Bool
	why      atomic.Uint32 // a ResetReason: why the owner abandons it, for the reset counters
	// on is the connection it runs on, or is moving to; want, when set, is
	// where its next resume goes (pool.go).
	on, want atomic.Pointer[link]
	// ready is closed once the flow is first attached: a peer's resume
	// (a move) may arrive on another connection before that.
	ready     chan struct{}
	readyOnce sync.Once
	// local is the local connection of a flow the peer opened: a reset
	// closes it at once, though the local program reads nothing (a write
	// to it may wait for ever), so that its file descriptor is let go of
	// with the flow.
	local atomic.Pointer[net.TCPConn]
}

// attached marks e attached for the first time (or never to be).
func (e *flowEntry) attached() { e.readyOnce.Do(func() { close(e.ready) }) }

// abandon resets the flow here, counting the reason.
func (e *flowEntry) abandon(why ResetReason) {
	e.why.CompareAndSwap(0, uint32(why))
	e.c.Abandon()
}

// The flow table: every live flow, by peer, and the tombs of the ended
// flows each peer opened. It outlives peers (a flow waits for its peer to
// come back), so it is the Mux's, not a peer's. Its lock guards only the
// index of peers; each peer's flows have a lock of their own, so that what
// one peer makes grow (its flows, its tombs) costs only under its own
// lock. Lock order: Mux.mu, then peer.mu, then flowTable.mu, then
// peerFlows.mu; nothing is closed or written under either.
type flowTable struct {
	memory int // each peer's flow.Budget

	mu     sync.Mutex // guards byPeer
	byPeer map[int]*peerFlows
}

// peerFlows are one peer's flows.
type peerFlows struct {
	budget *flow.Budget // the memory its flows' buffers share

	mu   sync.Mutex // guards the fields below
	live map[flowKey]*flowEntry
	// tombs remember the ended flows the peer opened, for its late resumes.
	tombs graveyard
	// opened counts the flows the peer opened here and holds, attached or
	// not, and those being dialled locally: each holds a local connection
	// (a file descriptor) until it ends.
	opened int
	// waiting counts, of those, the ones waiting for a local listener.
	waiting int
}

// of is pid's flows, made on first use. Entries are never removed: there
// is one per party of the study.
func (t *flowTable) of(pid int) *peerFlows {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.byPeer == nil {
		t.byPeer = make(map[int]*peerFlows)
	}
	pf := t.byPeer[pid]
	if pf == nil {
		pf = &peerFlows{budget: flow.NewBudget(t.memory), live: make(map[flowKey]*flowEntry), tombs: graveyard{byKey: make(map[flowKey]tomb)}}
		t.byPeer[pid] = pf
	}
	return pf
}

// all lists every live flow.
func (t *flowTable) all() []*flowEntry {
	t.mu.Lock()
	pfs := make([]*peerFlows, 0, len(t.byPeer))
	for _, pf := range t.byPeer {
		pfs = append(pfs, pf)
	}
	t.mu.Unlock()
	var out []*flowEntry
	for _, pf := range pfs {
		pf.mu.Lock()
		for _, e := range pf.live {
			out = append(out, e)
		}
		pf.mu.Unlock()
	}
	return out
}

// count is how many flows the peer has, both directions.
func (pf *peerFlows) count() int {
	pf.mu.Lock()
	defer pf.mu.Unlock()
	return len(pf.live)
}

// take counts a new flow key that its peer opens here, if the peer's
// budget (max flows) allows. fresh is false when the peer has, or had, a
// flow of that id: a new one would take the other's place. give gives it
// back when it ends.
func (pf *peerFlows) take(key flowKey, max int) (ok, fresh bool) {
	pf.mu.Lock()
	defer pf.mu.Unlock()
	if _, ended := pf.tombs.byKey[key]; ended || pf.live[key] != nil {
		return false, false
	}
	if pf.opened >= max {
		return false, true
	}
	pf.opened++
	return true, true
}

func (pf *peerFlows) give() {
	pf.mu.Lock()
	defer pf.mu.Unlock()
	pf.opened--
}

// startWaiting counts a connection of the peer's waiting for a local
// listener, if its budget (max) allows.
func (pf *peerFlows) startWaiting(max int) bool {
	pf.mu.Lock()
	defer pf.mu.Unlock()
	if pf.waiting >= max {
		return false
	}
	pf.waiting++
	return true
}

func (pf *peerFlows) stopWaiting() {
	pf.mu.Lock()
	defer pf.mu.Unlock()
	pf.waiting--
}

// tomb remembers how a flow ended, for a peer that asks to resume it
// after the connection died under the last acknowledgement.
type tomb struct {
	status header.Status
	rcvd   uint64
	until  time.Time
}

// graveyard is one peer's tombs, in the order they were made (and so the
// order they expire: each lives ResumeTimeout).
type graveyard struct {
	byKey map[flowKey]tomb
	order []flowKey
}

// maxTombs bounds the tombs kept per peer: a peer that ends flows faster
// than they expire loses the oldest (a late resume of one is refused, and
// the peer resets that flow).
const maxTombs = 16384

// bury remembers how flow key, which the peer opened, ended, and forgets
// the tombs that expired by now: this costs what it forgets, whatever the
// number kept.
func (g *graveyard) bury(key flowKey, t tomb, now time.Time) {
	for len(g.order) > 0 {
		old, ok := g.byKey[g.order[0]]
		if ok && !now.After(old.until) && len(g.byKey) < maxTombs {
			break
		}
		delete(g.byKey, g.order[0])
		g.order = g.order[1:]
	}
	if _, again := g.byKey[key]; !again {
		g.order = append(g.order, key)
	}
	g.byKey[key] = t
}

// ended removes e, the live flow key, which ended with t; opened says
// whether the peer opened it (and so had it counted, and may resume it
// late).
func (pf *peerFlows) ended(key flowKey, e *flowEntry, t tomb, now time.Time) {
	pf.mu.Lock()
	defer pf.mu.Unlock()
	if pf.live[key] == e {
		delete(pf.live, key)
	}
	if key.mine {
		return // only the peer resumes its own
	}
	pf.opened--
	pf.tombs.bury(key, t, now)
}

// lookup is the live flow key, or how it ended.
func (pf *peerFlows) lookup(key flowKey) (e *flowEntry, t tomb, ended bool) {
	pf.mu.Lock()
	defer pf.mu.Unlock()
	t, ended = pf.tombs.byKey[key]
	return pf.live[key], t, ended
}

// newFlow makes and registers a flow on link l, to be attached, or
// returns nil if a flow of that key is live already. A flow the peer
// opened was counted by take, until it ends.
func (m *Mux) newFlow(key flowKey, port uint16, l *link, log *slog.Logger) *flowEntry {
	e := &flowEntry{port: port, log: log, born: l, ready: make(chan struct{})}
	e.on.Store(l)
	start := time.Now()
	pf := m.flows.of(key.pid)
	e.c = flow.New(flow.Options{
		ResumeTimeout: m.opts.ResumeTimeout,
		Buffers:       &m.fbufs,
		Budget:        pf.budget,
		OnDetach: func() {
			if !m.goUnlessQuit(func() {
				if key.mine {
					m.resume(key, e)
				}
			}) {
				e.abandon(ResetShutdown) // nothing will resume it
			}
		},
		OnDone: func(how flow.End) {
			_, rcvd := e.c.State()
			st := header.StatusFlowDone
			reset := how != flow.EndDone
			if reset {
				st = header.StatusFlowReset
				why := ResetByPeer
				switch how {
				case flow.EndTimeout:
					why = ResetResumeTimeout
				case flow.EndProtocol:
					why = ResetProtocol
					m.quiet.Warn("protocol:"+strconv.Itoa(key.pid), "peer broke the flow protocol; flow reset", "peer", key.pid)
				case flow.EndAbandoned:
					if w := ResetReason(e.why.Load()); w != resetNone {
						why = w
					}
				}
				m.count.reset(why)
				if tc := e.local.Load(); tc != nil {
					tc.SetLinger(0)
					tc.Close()
				}
			}
			now := time.Now()
			pf.ended(key, e, tomb{status: st, rcvd: rcvd, until: now.Add(m.opts.ResumeTimeout)}, now)
			sent, recv := e.c.Counts()
			logClosed(log, start, sent, recv, reset)
		},
	}, addrOf(l.local), addrOf(l.remote))
	pf.mu.Lock()
	if pf.live[key] != nil {
		pf.mu.Unlock()
		return nil // the peer raced two flows of one id: the first keeps it
	}
	pf.live[key] = e
	pf.mu.Unlock()
	select {
	case <-m.quit:
		e.abandon(ResetShutdown)
	default:
	}
	return e
}

// goUnlessQuit runs f on a goroutine that Run waits for, unless Run is
// ending; it reports whether it did. The check and the count are one step
// under mu, as Run's close of quit is: a goroutine is never added while Run
// waits for them.
func (m *Mux) goUnlessQuit(f func()) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	select {
	case <-m.quit:
		return false
	default:
	}
	m.wg.Go(f)
	return true
}

// resume carries a flow we opened over the peer's current connection, once
// there is one, until it is resumed, ends, or its resume timeout passes.
func (m *Mux) resume(key flowKey, e *flowEntry) {
	if !e.resuming.CompareAndSwap(false, true) {
		return
	}
	defer e.resuming.Store(false)
	ctx, cancel := context.WithTimeout(context.Background(), m.opts.ResumeTimeout)
	defer cancel()
	go func() {
		select {
		case <-m.quit:
			cancel()
		case <-ctx.Done():
		}
	}()
	lost := time.Now()
	moving := e.want.Load() != nil
	if !moving {
		e.log.Info("flow waiting for a path to resume")
	}
	bo := backoff.Backoff{Min: 100 * time.Millisecond, Max: 2 * time.Second}
	for {
		if st, _ := e.c.State(); st != flow.Live {
			return
		}
		p, l, err := m.waitLink(ctx, key.pid)
		if err != nil {
			e.log.Warn("flow not resumed in time; resetting it", "after", time.Since(lost).Round(time.Second), "err", err)
			e.abandon(ResetResumeTimeout)
			return
		}
		if w := e.want.Swap(nil); w != nil && w.conn.Context().Err() == nil {
			l = w
		}
		e.on.Store(l)
		e.c.Detach()
		_, rcvd := e.c.State()
		str, reply, err := openStream(ctx, l.conn, header.Request{Kind: header.KindResume, Port: e.port, Flow: key.id, Rcvd: rcvd})
		if err != nil {
			if connectionDead(l.conn, err) {
				p.dropLink(l, err, evLost)
			}
			if bo.Wait(ctx) != nil {
				e.abandon(ResetResumeTimeout)
				return
			}
			continue
		}
		switch reply.Status {
		case header.StatusOK:
			e.c.Attach(m.flowStream(str, l), reply.Rcvd)
			if moving {
				m.count.flowsMoved.Add(1)
				e.log.Debug("flow moved to another connection of the pool", "after", time.Since(lost).Round(time.Millisecond))
			} else {
				m.count.flowsResumed.Add(1)
				e.log.Info("flow resumed", "after", time.Since(lost).Round(time.Millisecond), "path", p.kindOf(l))
			}
			p.poolChanged()
		case header.StatusFlowDone:
			e.c.PeerDone(reply.Rcvd)
		default:
			e.log.Info("peer no longer has the flow; resetting it", "status", reply.Status)
			why := ResetPeerLostFlow
			if reply.Status == header.StatusFlowReset {
				why = ResetByPeer
			}
			e.abandon(why)
		}
		return
	}
}

// resumed answers a peer's resume of a flow it opened.
func (m *Mux) resumed(pid int, req header.Request, str *quic.Stream, l *link) {
	key := flowKey{pid: pid, id: req.Flow}
	e, t, ended := m.flows.of(pid).lookup(key)
	if e != nil {
		select {
		case <-e.ready:
		case <-time.After(m.opts.HandshakeTimeout):
		}
	}
	if e == nil {
		st := header.StatusUnknownFlow
		if ended {
			st = t.status
		}
		str.Write(header.Reply{Status: st, Rcvd: t.rcvd}.Append(nil))
		endStream(str)
		return
	}
	e.c.Detach()
	_, rcvd := e.c.State()
	if _, err := str.Write(header.Reply{Rcvd: rcvd}.Append(nil)); err != nil {
		str.CancelRead(codeStreamAbort)
		return
	}
	// The peer moves a flow whose connection still lives (pool.go), and
	// resumes one whose connection died.
	if old := e.on.Swap(l); old != nil && old.conn.Context().Err() == nil {
		m.count.flowsMoved.Add(1)
		e.log.Debug("flow moved by peer to another connection of the pool")
	} else {
		m.count.flowsResumed.Add(1)
		e.log.Info("flow resumed by peer")
	}
	e.c.Attach(m.flowStream(str, l), req.Rcvd)
	m.poolChanged(pid)
}

// resetFlows resets every flow with pid but those opened on keep (nil for
// none): the peer restarted or shut down (why), so they cannot be resumed.
func (m *Mux) resetFlows(pid int, why ResetReason, keep *link) {
	pf := m.flows.of(pid)
	pf.mu.Lock()
	var es []*flowEntry
	for _, e := range pf.live {
		if keep == nil || e.born != keep && e.born.primary != keep {
			es = append(es, e)
		}
	}
	pf.mu.Unlock()
	if len(es) > 0 {
		m.log.Info("resetting the peer's flows", "peer", pid, "flows", len(es), "why", why)
	}
	for _, e := range es {
		e.abandon(why)
	}
}

// flowStream is a QUIC stream as a flow's stream, counted on its link.
type flowStream struct {
	str  *quic.Stream
	l    *link
	once sync.Once
}

func (m *Mux) flowStream(str *quic.Stream, l *link) *flowStream {
	l.tr.open.Add(1)
	l.open.Add(1)
	return &flowStream{str: str, l: l}
}

func (s *flowStream) release() {
	s.once.Do(func() {
		s.l.tr.open.Add(-1)
		s.l.open.Add(-1)
	})
}

func (s *flowStream) Read(b []byte) (int, error) {
	n, err := s.str.Read(b)
	s.l.tr.recv.Add(uint64(n))
	s.l.read.Add(uint64(n))
	return n, err
}

func (s *flowStream) Write(b []byte) (int, error) {
	n, err := s.str.Write(b)
	s.l.tr.sent.Add(uint64(n))
	return n, err
}

// Close ends our side once everything is written; the peer's side ends
// with its own Close.
func (s *flowStream) Close() error {
	s.release()
	return s.str.Close()
}

func (s *flowStream) Abort() {
	s.release()
	s.str.CancelWrite(codeStreamAbort)
	s.str.CancelRead(codeStreamAbort)
}

// newBoot is a boot id: random, never zero.
func newBoot() uint64 { return rand.Uint64() | 1 }
