package quicmux

import (
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Path kinds.
const (
	PathDirect  = "direct"
	PathRelayed = "relayed"
)

// traffic counts one peer's tunnelled connections and bytes on one kind of
// path.
type traffic struct {
	sent, recv atomic.Uint64
	opened     atomic.Uint64
	open       atomic.Int64
}

// rateWindow is how many 1 s samples make the "current" rate.
const rateWindow = 3

// rates turns a peer's byte counts into rates from 1 s samples, counted
// from when the peer appeared. Guarded by Mux.mu.
type rates struct {
	start              time.Time // when the peer appeared
	last               time.Time
	lastSent, lastRecv uint64
	window             [rateWindow][2]float64
	n                  int
	maxSent, maxRecv   float64
}

// PathTraffic is a peer's traffic on one kind of path.
type PathTraffic struct {
	Path      string
	Conns     uint64 // tunnelled connections opened, both directions
	BytesSent uint64
	BytesRecv uint64
}

// PeerStats is a snapshot of one peer.
type PeerStats struct {
	PID        int
	State      string // connecting, direct, relayed, unreachable
	Path       string // kind of the path in use, "" when not connected
	Via        string // the relay, when relayed
	RemoteAddr netip.AddrPort
	RTT        time.Duration
	Since      time.Time // connected since
	OpenConns  int64
	// Waiting counts its connections waiting for a local listener here.
	Waiting int
	// QUICConns is how many QUIC connections carry them (the pool).
	QUICConns int
	BytesSent uint64
	BytesRecv uint64
	// Rates in bytes per second: over the last few seconds, since the first
	// connection, and the largest 1 s sample.
	RateSent, RateRecv float64
	AvgSent, AvgRecv   float64
	MaxSent, MaxRecv   float64
	LastError          string
	Traffic            []PathTraffic
	// StateSince is when the state began (repairing: when the path died).
	StateSince time.Time
	// Repairs counts paths repaired; LastRepair is how long the last took.
	Repairs    uint64
	LastRepair time.Duration
}

// Stats is a snapshot of the mux.
type Stats struct {
	Peers                      []PeerStats
	DialsOK, DialsFailed       uint64
	AcceptsOK, AcceptsRejected uint64
	ChecksSent, ChecksAnswered uint64
	FlowsResumed               uint64
	// FlowsMoved counts flows moved between a peer's connections (pool.go);
	// PoolConnsOpened counts pool members opened or accepted.
	FlowsMoved, PoolConnsOpened uint64
	FlowsReset                  map[string]uint64 // by reason
}

// counters are the mux-wide event counts.
type counters struct {
	dialsOK, dialsFailed       atomic.Uint64
	acceptsOK, acceptsRejected atomic.Uint64
	checksSent, checksAnswered atomic.Uint64
	flowsResumed, flowsMoved   atomic.Uint64
	poolOpened                 atomic.Uint64

	mu         sync.Mutex        // guards flowResets
	flowResets map[string]uint64 // by reason
}

func (c *counters) reset(why string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.flowResets == nil {
		c.flowResets = make(map[string]uint64)
	}
	c.flowResets[why]++
}

// trafficLocked returns p's counters for path kind, creating them.
func (p *peer) trafficLocked(kind string) *traffic {
	if p.traffic == nil {
		p.traffic = make(map[string]*traffic)
	}
	t := p.traffic[kind]
	if t == nil {
		t = new(traffic)
		p.traffic[kind] = t
	}
	return t
}

func (p *peer) totalsLocked() (sent, recv uint64, open int64) {
	for _, t := range p.traffic {
		sent += t.sent.Load()
		recv += t.recv.Load()
		open += t.open.Load()
	}
	return sent, recv, open
}

// sample takes the 1 s rate sample of every peer.
func (m *Mux) sample(now time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, p := range m.peers {
		sent, recv, _ := p.totalsLocked()
		r := &p.rates
		dt := now.Sub(r.last).Seconds()
		if dt <= 0 {
			continue
		}
		s, v := float64(sent-r.lastSent)/dt, float64(recv-r.lastRecv)/dt
		r.window[r.n%rateWindow] = [2]float64{s, v}
		r.n++
		r.maxSent, r.maxRecv = max(r.maxSent, s), max(r.maxRecv, v)
		r.last, r.lastSent, r.lastRecv = now, sent, recv
	}
}

// Stats returns a snapshot of every peer and of the mux's counters.
func (m *Mux) Stats() Stats {
	st := Stats{
		DialsOK: m.count.dialsOK.Load(), DialsFailed: m.count.dialsFailed.Load(),
		AcceptsOK: m.count.acceptsOK.Load(), AcceptsRejected: m.count.acceptsRejected.Load(),
		ChecksSent: m.count.checksSent.Load(), ChecksAnswered: m.count.checksAnswered.Load(),
		FlowsResumed: m.count.flowsResumed.Load(), FlowsReset: map[string]uint64{},
		FlowsMoved: m.count.flowsMoved.Load(), PoolConnsOpened: m.count.poolOpened.Load(),
	}
	m.count.mu.Lock()
	for k, v := range m.count.flowResets {
		st.FlowsReset[k] = v
	}
	m.count.mu.Unlock()
	now := time.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, p := range m.peers {
		ps := PeerStats{PID: p.pid, State: p.path.state, StateSince: p.path.since, LastError: p.lastErr,
			Repairs: p.repairs, LastRepair: p.lastRepair, Waiting: p.waiting}
		if l := p.link; l != nil {
			ps.Path, ps.Via = m.linkKindLocked(p, l), m.viaLocked(p, l)
			ps.State = ps.Path // direct or relayed
			ps.RemoteAddr, ps.Since = l.remote, l.since
			ps.RTT = l.conn.ConnectionStats().SmoothedRTT
			ps.QUICConns = len(m.linksLocked(p))
		}
		ps.BytesSent, ps.BytesRecv, ps.OpenConns = p.totalsLocked()
		r := &p.rates
		for i := 0; i < min(r.n, rateWindow); i++ {
			ps.RateSent += r.window[i][0] / float64(min(r.n, rateWindow))
			ps.RateRecv += r.window[i][1] / float64(min(r.n, rateWindow))
		}
		if el := now.Sub(r.start).Seconds(); el > 0 {
			ps.AvgSent, ps.AvgRecv = float64(ps.BytesSent)/el, float64(ps.BytesRecv)/el
		}
		ps.MaxSent, ps.MaxRecv = r.maxSent, r.maxRecv
		for kind, t := range p.traffic {
			ps.Traffic = append(ps.Traffic, PathTraffic{Path: kind, Conns: t.opened.Load(), BytesSent: t.sent.Load(), BytesRecv: t.recv.Load()})
		}
		slices.SortFunc(ps.Traffic, func(a, b PathTraffic) int { return cmpString(a.Path, b.Path) })
		st.Peers = append(st.Peers, ps)
	}
	slices.SortFunc(st.Peers, func(a, b PeerStats) int { return a.PID - b.PID })
	return st
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
