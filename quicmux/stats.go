package quicmux

import (
	"net"
	"net/netip"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"sfkit-proxy/status"
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
// from when the peer appeared. Guarded by its peer's mu.
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
	Path      PathKind
	Conns     uint64 // tunnelled connections opened, both directions
	BytesSent uint64
	BytesRecv uint64
}

// PeerStats is a snapshot of one peer.
type PeerStats struct {
	PID        int
	State      State
	Path       PathKind // of the path in use, PathNone when not connected
	Via        string   // the relay, when relayed
	NAT        string   // what the peer published of its NAT (PeerInfo.NAT)
	RemoteAddr netip.AddrPort
	RTT        time.Duration
	// PacketSize is the largest QUIC packet its connection sends now, in
	// bytes of UDP payload (0: unknown).
	PacketSize int
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
	// Repairs counts paths repaired; LastRepair is how long the last took,
	// LastRepairReason why its path was lost: stall (no progress while
	// packets came, stall.go), dead (nothing heard) or lost (the
	// connection's own error).
	Repairs          uint64
	LastRepair       time.Duration
	LastRepairReason string
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
	// PathStalls counts paths dropped as stalled (stall.go);
	// PacketRaises, links replaced for larger packets once a path's MTU
	// grew back.
	PathStalls, PacketRaises uint64
	// PeerRelay is what this party relays for others (peerrelay.go).
	PeerRelay  status.PeerRelay
	FlowsReset map[string]uint64 // by reason (ResetReason's String)
	Socket     status.Socket     // the main socket's, read once at New
}

// socketInfo reads what the kernel gave conn, a UDP socket; nothing for
// another kind of PacketConn.
func socketInfo(conn net.PacketConn) status.Socket {
	var s status.Socket
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return s
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return s
	}
	rc.Control(func(fd uintptr) {
		s.ReadBuffer, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF)
		s.WriteBuffer, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF)
		_, err := unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT) // as quic-go tests for GSO
		s.GSO = err == nil
	})
	return s
}

// counters are the mux-wide event counts.
type counters struct {
	dialsOK, dialsFailed       atomic.Uint64
	acceptsOK, acceptsRejected atomic.Uint64
	checksSent, checksAnswered atomic.Uint64
	flowsResumed, flowsMoved   atomic.Uint64
	poolOpened                 atomic.Uint64
	pathStalls, packetRaises   atomic.Uint64
	flowResets                 [numResetReasons]atomic.Uint64
}

func (c *counters) reset(why ResetReason) { c.flowResets[why].Add(1) }

// trafficLocked returns p's counters for path kind, creating them.
func (p *peer) trafficLocked(kind PathKind) *traffic {
	if p.traffic == nil {
		p.traffic = make(map[PathKind]*traffic)
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
	for _, p := range m.peerList() {
		p.mu.Lock()
		sent, recv, _ := p.totalsLocked()
		r := &p.rates
		if dt := now.Sub(r.last).Seconds(); dt > 0 {
			s, v := float64(sent-r.lastSent)/dt, float64(recv-r.lastRecv)/dt
			r.window[r.n%rateWindow] = [2]float64{s, v}
			r.n++
			r.maxSent, r.maxRecv = max(r.maxSent, s), max(r.maxRecv, v)
			r.last, r.lastSent, r.lastRecv = now, sent, recv
		}
		p.mu.Unlock()
	}
}

// peerList is every peer, in pid order.
func (m *Mux) peerList() []*peer {
	m.mu.Lock()
	ps := make([]*peer, 0, len(m.peers))
	for _, p := range m.peers {
		ps = append(ps, p)
	}
	m.mu.Unlock()
	slices.SortFunc(ps, func(a, b *peer) int { return a.pid - b.pid })
	return ps
}

// Stats returns a snapshot of every peer and of the mux's counters.
func (m *Mux) Stats() Stats {
	st := Stats{
		DialsOK: m.count.dialsOK.Load(), DialsFailed: m.count.dialsFailed.Load(),
		AcceptsOK: m.count.acceptsOK.Load(), AcceptsRejected: m.count.acceptsRejected.Load(),
		ChecksSent: m.count.checksSent.Load(), ChecksAnswered: m.count.checksAnswered.Load(),
		FlowsResumed: m.count.flowsResumed.Load(), FlowsReset: map[string]uint64{},
		FlowsMoved: m.count.flowsMoved.Load(), PoolConnsOpened: m.count.poolOpened.Load(),
		PathStalls: m.count.pathStalls.Load(), PacketRaises: m.count.packetRaises.Load(),
		Socket: m.socket,
	}
	r := &m.prelay
	r.mu.Lock()
	st.PeerRelay = status.PeerRelay{Enabled: !m.opts.NoPeerRelay, Sessions: len(r.relayed), Ends: len(r.ends),
		RateLimit: m.opts.PeerRelayRate}
	for _, s := range r.relayed {
		ab, ba := s.bytesAB.Load(), s.bytesBA.Load()
		now := time.Now().UnixNano()
		rs := status.RelaySession{A: s.a, B: s.b, Since: s.since, BytesAB: ab, BytesBA: ba, Raw: s.rawA.fresh(now) && s.rawB.fresh(now)}
		if el := time.Since(s.since).Seconds(); el > 0 {
			rs.RateAB, rs.RateBA = float64(ab)/el, float64(ba)/el
		}
		st.PeerRelay.Relaying = append(st.PeerRelay.Relaying, rs)
	}
	r.mu.Unlock()
	slices.SortFunc(st.PeerRelay.Relaying, func(a, b status.RelaySession) int { return a.Since.Compare(b.Since) })
	st.PeerRelay.BytesForwarded, st.PeerRelay.Dropped, st.PeerRelay.Refused = r.forwarded.Load(), r.dropped.Load(), r.refused.Load()
	st.PeerRelay.RawIn, st.PeerRelay.RawOut = r.rawIn.Load(), r.rawOut.Load()
	for why := ResetByPeer; why < numResetReasons; why++ {
		if n := m.count.flowResets[why].Load(); n > 0 {
			st.FlowsReset[why.String()] = n
		}
	}
	now := time.Now()
	for _, p := range m.peerList() {
		st.Peers = append(st.Peers, p.stats(now))
	}
	return st
}

// stats is a snapshot of p.
func (p *peer) stats(now time.Time) PeerStats {
	pf := p.m.flows.of(p.pid)
	pf.mu.Lock()
	waiting := pf.waiting
	pf.mu.Unlock()
	p.mu.Lock()
	defer p.mu.Unlock()
	ps := PeerStats{PID: p.pid, State: p.path.state, StateSince: p.path.since, NAT: p.info.NAT,
		Repairs: p.repairs, LastRepair: p.lastRepair, LastRepairReason: p.repairWhy, Waiting: waiting}
	if p.lastErr != nil {
		ps.LastError = p.lastErr.Error()
	}
	if l := p.pool.primary; l != nil {
		ps.Path, ps.Via = p.kindLocked(l), p.viaLocked(l)
		ps.RemoteAddr, ps.Since = l.remote, l.since
		ps.RTT = l.conn.ConnectionStats().SmoothedRTT
		ps.PacketSize = packetSize(l.conn)
		ps.QUICConns = len(p.pool.live())
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
	slices.SortFunc(ps.Traffic, func(a, b PathTraffic) int { return int(a.Path) - int(b.Path) })
	return ps
}

// UpdateStatus fills s's peers and the mux's counters: the part of the
// sidecar's status that quicmux owns.
func (m *Mux) UpdateStatus(s *status.Status) {
	st := m.Stats()
	c := &s.Counters
	c.DialsOK, c.DialsFailed = st.DialsOK, st.DialsFailed
	c.AcceptsOK, c.AcceptsRejected = st.AcceptsOK, st.AcceptsRejected
	c.ChecksSent, c.ChecksAnswered = st.ChecksSent, st.ChecksAnswered
	c.FlowsResumed, c.FlowsReset = st.FlowsResumed, st.FlowsReset
	c.FlowsMoved, c.PoolConnsOpened = st.FlowsMoved, st.PoolConnsOpened
	c.PathStalls, c.PacketSizeRaises = st.PathStalls, st.PacketRaises
	s.PeerRelay = st.PeerRelay
	s.Socket = st.Socket
	for _, p := range st.Peers {
		sp := status.Peer{PID: p.PID, State: p.State.String(), Via: p.Via, NAT: p.NAT, RTTMillis: float64(p.RTT.Microseconds()) / 1000, PacketSize: p.PacketSize,
			OpenConns: p.OpenConns, QUICConns: p.QUICConns, WaitingConns: p.Waiting, BytesSent: p.BytesSent, BytesReceived: p.BytesRecv,
			LastError: p.LastError, Repairs: p.Repairs, LastRepairSeconds: p.LastRepair.Seconds(), LastRepairReason: p.LastRepairReason,
			Rate: status.Rates{CurrentSent: p.RateSent, CurrentReceived: p.RateRecv, AverageSent: p.AvgSent,
				AverageReceived: p.AvgRecv, MaxSent: p.MaxSent, MaxReceived: p.MaxRecv}}
		if p.Path != PathNone {
			sp.Path = p.Path.String()
		}
		if !p.StateSince.IsZero() {
			sp.StateSince = &p.StateSince
		}
		if p.RemoteAddr.IsValid() {
			sp.RemoteAddr = p.RemoteAddr.String()
			sp.ConnectedSince = &p.Since
		}
		for _, t := range p.Traffic {
			sp.Traffic = append(sp.Traffic, status.PathTraffic{Path: t.Path.String(), Conns: t.Conns, BytesSent: t.BytesSent, BytesReceived: t.BytesRecv})
		}
		s.Peers = append(s.Peers, sp)
	}
}
