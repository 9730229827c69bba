package quicmux

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/backoff"
	"sfkit-proxy/flow"
)

// flowKey names a flow: the peer, which side opened it, and its id.
type flowKey struct {
	pid  int
	mine bool // we opened it (a local client dialled): we resume it
	id   uint64
}

// flowEntry is a live flow.
type flowEntry struct {
	c        *flow.Conn
	born     *link // the connection it was opened on
	port     uint16
	log      *slog.Logger
	resuming atomic.Bool
	why      atomic.Value // string: why the owner abandons it, for the reset counters
	// on is the connection it runs on, or is moving to; want, when set, is
	// where its next resume goes (pool.go).
	on, want atomic.Pointer[link]
	// ready is closed once the flow is first attached: a peer's resume
	// (a move) may arrive on another connection before that.
	ready     chan struct{}
	readyOnce sync.Once
}

// attached marks e attached for the first time (or never to be).
func (e *flowEntry) attached() { e.readyOnce.Do(func() { close(e.ready) }) }

// abandon resets the flow here, counting the reason.
func (e *flowEntry) abandon(why string) {
	e.why.CompareAndSwap(nil, why)
	e.c.Abandon()
}

// Reasons a flow was reset, as counted.
const (
	ResetByPeer        = "connection_reset" // an application reset it, at either end
	ResetResumeTimeout = "resume_timeout"   // no path came back in time
	ResetPeerRestarted = "peer_restarted"
	ResetPeerShutdown  = "peer_shutdown"
	ResetPeerLostFlow  = "peer_lost_flow" // the peer no longer had it
	ResetShutdown      = "shutdown"       // this sidecar stopped
	ResetProtocol      = "protocol"       // the peer broke the flow protocol
)

// tomb remembers how a flow ended, for a peer that asks to resume it
// after the connection died under the last acknowledgement.
type tomb struct {
	status Status
	rcvd   uint64
	until  time.Time
}

// newFlow makes and registers a flow on link l, to be attached, or
// returns nil if a flow of that key is live already. owner,
// for a flow the peer opened, is the peer whose budget it counts against
// (see takeFlow) until it ends.
func (m *Mux) newFlow(key flowKey, port uint16, l *link, log *slog.Logger, owner *peer) *flowEntry {
	e := &flowEntry{port: port, log: log, born: l, ready: make(chan struct{})}
	e.on.Store(l)
	start := time.Now()
	e.c = flow.New(flow.Options{
		ResumeTimeout: m.opts.ResumeTimeout,
		Buffers:       &m.fbufs,
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
			st := StatusFlowDone
			reset := how != flow.EndDone
			if reset {
				st = StatusFlowReset
				why := ResetByPeer
				switch how {
				case flow.EndTimeout:
					why = ResetResumeTimeout
				case flow.EndProtocol:
					why = ResetProtocol
					m.quiet.warn("protocol:"+strconv.Itoa(key.pid), "peer broke the flow protocol; flow reset", "peer", key.pid)
				case flow.EndAbandoned:
					if w, ok := e.why.Load().(string); ok {
						why = w
					}
				}
				m.count.reset(why)
			}
			now := time.Now()
			m.mu.Lock()
			m.delFlowLocked(key, e)
			if owner != nil {
				owner.inFlows--
			}
			m.buryLocked(key, tomb{status: st, rcvd: rcvd, until: now.Add(m.opts.ResumeTimeout)}, now)
			m.mu.Unlock()
			sent, recv := e.c.Counts()
			logClosed(log, start, sent, recv, reset)
		},
	}, addrOf(l.local), addrOf(l.remote))
	m.mu.Lock()
	pf := m.flows[key.pid]
	if pf == nil {
		pf = make(map[flowKey]*flowEntry)
		m.flows[key.pid] = pf
	}
	if pf[key] != nil {
		m.mu.Unlock()
		return nil // the peer raced two flows of one id: the first keeps it
	}
	pf[key] = e
	m.mu.Unlock()
	select {
	case <-m.quit:
		e.abandon(ResetShutdown)
	default:
	}
	return e
}

// delFlowLocked forgets e, the live flow key.
func (m *Mux) delFlowLocked(key flowKey, e *flowEntry) {
	pf := m.flows[key.pid]
	if pf[key] != e {
		return
	}
	delete(pf, key)
	if len(pf) == 0 {
		delete(m.flows, key.pid)
	}
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

// buryLocked remembers how flow key, which the peer opened, ended, and
// forgets that peer's tombs that expired by now: this costs what it
// forgets, whatever the number kept. Flows we opened need no tomb: only
// the peer resumes its own.
func (m *Mux) buryLocked(key flowKey, t tomb, now time.Time) {
	if key.mine {
		return
	}
	g := m.tombs[key.pid]
	if g == nil {
		g = &graveyard{byKey: make(map[flowKey]tomb)}
		m.tombs[key.pid] = g
	}
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

// tombLocked is how flow key ended, if it is remembered.
func (m *Mux) tombLocked(key flowKey) (tomb, bool) {
	if g := m.tombs[key.pid]; g != nil {
		t, ok := g.byKey[key]
		return t, ok
	}
	return tomb{}, false
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
		str, reply, err := openStream(ctx, l.conn, Request{Kind: KindResume, Port: e.port, Flow: key.id, Rcvd: rcvd})
		if err != nil {
			if connectionDead(l.conn, err) {
				m.dropLink(p, l, err, evLost)
			}
			if bo.Wait(ctx) != nil {
				e.abandon(ResetResumeTimeout)
				return
			}
			continue
		}
		switch reply.Status {
		case StatusOK:
			e.c.Attach(m.flowStream(str, l), reply.Rcvd)
			if moving {
				m.count.flowsMoved.Add(1)
				e.log.Debug("flow moved to another connection of the pool", "after", time.Since(lost).Round(time.Millisecond))
			} else {
				m.count.flowsResumed.Add(1)
				e.log.Info("flow resumed", "after", time.Since(lost).Round(time.Millisecond), "path", m.linkKind(p, l))
			}
			m.poolChanged(key.pid)
		case StatusFlowDone:
			e.c.PeerDone(reply.Rcvd)
		default:
			e.log.Info("peer no longer has the flow; resetting it", "status", reply.Status)
			why := ResetPeerLostFlow
			if reply.Status == StatusFlowReset {
				why = ResetByPeer
			}
			e.abandon(why)
		}
		return
	}
}

// resumed answers a peer's resume of a flow it opened.
func (m *Mux) resumed(pid int, req Request, str *quic.Stream, l *link, log *slog.Logger) {
	key := flowKey{pid: pid, id: req.Flow}
	m.mu.Lock()
	e := m.flows[key.pid][key]
	t, ended := m.tombLocked(key)
	m.mu.Unlock()
	if e != nil {
		select {
		case <-e.ready:
		case <-time.After(m.opts.DialTimeout):
		}
	}
	if e == nil {
		st := StatusUnknownFlow
		if ended {
			st = t.status
		}
		str.Write(Reply{Status: st, Rcvd: t.rcvd}.Append(nil))
		endStream(str)
		return
	}
	e.c.Detach()
	_, rcvd := e.c.State()
	if _, err := str.Write(Reply{Rcvd: rcvd}.Append(nil)); err != nil {
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

// hello records the boot id a peer sent on l, a new connection: a new one
// means the peer restarted, and the flows of its old instance (those opened
// before l) cannot be resumed.
func (m *Mux) hello(pid int, boot uint64, l *link) {
	m.mu.Lock()
	p := m.peers[pid]
	restarted := p != nil && p.boot != 0 && p.boot != boot
	if p != nil {
		p.boot = boot
	}
	m.mu.Unlock()
	if restarted {
		m.resetFlows(pid, ResetPeerRestarted, l)
	}
}

// sayHello tells the peer on a new connection who we are, and learns who
// it is.
func (m *Mux) sayHello(ctx context.Context, pid int, l *link) {
	hctx, cancel := context.WithTimeout(ctx, m.opts.DialTimeout)
	defer cancel()
	str, reply, err := openStream(hctx, l.conn, Request{Kind: KindHello, Flow: m.boot})
	if err != nil {
		m.log.Debug("hello failed", "peer", pid, "err", err)
		return
	}
	endStream(str)
	m.hello(pid, reply.Rcvd, l)
}

// resetFlows resets every flow with pid but those opened on keep (nil for
// none): the peer restarted or shut down (why), so they cannot be resumed.
func (m *Mux) resetFlows(pid int, why string, keep *link) {
	m.mu.Lock()
	var es []*flowEntry
	for _, e := range m.flows[pid] {
		if keep == nil || e.born != keep && e.born.primary != keep {
			es = append(es, e)
		}
	}
	m.mu.Unlock()
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
