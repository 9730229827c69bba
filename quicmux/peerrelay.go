package quicmux

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/time/rate"

	"sfkit-proxy/quicmux/header"
)

// Peer relays. Where no direct path joins two parties A and B (a
// symmetric NAT on either side) and no TURN server is configured, a third
// member of the study, R, with a connection to each, carries A–B: A's
// QUIC connection to B, with pinned mutual TLS end to end, runs as QUIC
// datagrams (RFC 9221) on the authenticated A–R and R–B connections that
// already exist, and then, on each hop where that works, as raw UDP
// packets between the same sockets (rawhop.go). No new socket, port or
// punching: R sees only the inner connection's ciphertext, and cannot
// read it, change it undetected, or speak as A or B (B's handshake checks
// A's pin, and that the session is A's).
//
// A session is brokered. The dialer A (the lower pid) asks R over a stream
// for a session to B, with a random 128-bit id; R offers it to B over
// another stream; B takes it only for another member of its study with a
// lower pid (the one that dials), within its own limits;
// then R binds the id to A's and B's connections (and so to their pins)
// and answers A. From then on R forwards a datagram with that id only
// from A's connections to B's primary and back; any other is dropped.
// A session ends at R when either end has sent nothing for relayIdle,
// and at an end when it has sent nothing for as long (a live inner
// connection sends keepalives both ways; junk from a relay keeps
// nothing). R limits sessions per pair and per peer, and the bytes per
// second it forwards (opts.PeerRelayRate, shared out equally among the
// peers sending bulk data), dropping what is over: on a hop still on
// datagrams, quic-go sends them before stream data, so that cap is what
// relaying may take from R's own flows there. An end accepts a few inner
// handshakes, then one a second, and no pool members: the relay's own
// connections carry one inner connection.
//
// On A and B a session is a net.PacketConn (sessionEnd) under a QUIC
// transport of its own (an endpoint with session set): the inner link is
// an ordinary peer link whose path kind is PathPeerRelayed, so flows, the
// pool, resume and the stall watch work on it unchanged, and the direct
// path is checked for while it runs (keep). Inner packets are 1,200 bytes
// (QUIC's minimum; no path MTU discovery on a virtual socket); one that
// does not fit in a datagram of the outer connection, whose packets may
// still be small, goes as two pieces, joined again at the far end.

// dgRelay is a relayed packet: kind | session (16) | piece (1) | seq (2) | bytes.
const dgRelay = 0x03

const relayHeaderLen = 20

// Pieces of a packet.
const (
	pieceWhole  = 0
	pieceFirst  = 1
	pieceSecond = 2
)

// Peer relay limits and timings.
const (
	// pairSessions bounds the sessions of one pair at a relay, and of one
	// peer through one relay at an end, so that no member can take the
	// slots of another pair; a peer may hold at most peerSessions at a
	// relay (as either end), and an end takes at most viaSessions through
	// one relay.
	pairSessions = 4
	peerSessions = 32
	viaSessions  = 64
	// sessionHandshakes bounds the inner handshakes a session's end
	// accepts: a few at first, then one a second (each costs a TLS
	// signature before the claim is checked).
	sessionHandshakes = 1
	sessionBurst      = 3
	// relayIdle ends a session that carried nothing this long (an inner
	// connection sends a keepalive every 2 s).
	relayIdle = 30 * time.Second
	// relayQueue bounds the packets a relay holds for one direction of a
	// session, and an end for its inner transport; more are dropped, as
	// a full router queue would.
	relayQueue = 256
	// relayRetry spaces a dialer's attempts at a session.
	relayRetry = 5 * time.Second
	// A relay's limiters hold a quarter second of its rate (at least
	// 256 KiB): a policer with a shallow bucket drops the bursts that
	// congestion control sends, and a flow through it gets far less than
	// the rate.
	relayBurstMin = 256 << 10
	// maxPartials bounds an end's packets waiting for their other piece.
	maxPartials = 64
)

// sessionID names a session; random, 128 bits.
type sessionID [16]byte

func newSessionID() sessionID {
	var id sessionID
	rand.Read(id[:])
	return id
}

// sessionOf reads a session id from a relay or offer request (flow and
// rcvd hold its two halves).
func sessionOf(r header.Request) sessionID {
	var id sessionID
	binary.BigEndian.PutUint64(id[:8], r.Flow)
	binary.BigEndian.PutUint64(id[8:], r.Rcvd)
	return id
}

// request is a relay or offer request for session id naming pid.
func (id sessionID) request(kind header.Kind, pid int) header.Request {
	return header.Request{Kind: kind, Port: uint16(pid), Flow: binary.BigEndian.Uint64(id[:8]), Rcvd: binary.BigEndian.Uint64(id[8:])}
}

// peerRelays are the sessions this party relays and those it is an end of.
type peerRelays struct {
	mu       sync.Mutex
	relayed  map[sessionID]*relaySession
	ends     map[sessionID]*sessionEnd
	limiters map[int]*source // per source peer of relayed packets
	total    *rate.Limiter   // all sources together
	// Counters; rawIn and rawOut count raw packets (rawhop.go).
	forwarded, dropped, refused, rawIn, rawOut atomic.Uint64
}

func (r *peerRelays) init(total int) {
	r.relayed, r.ends, r.limiters = map[sessionID]*relaySession{}, map[sessionID]*sessionEnd{}, map[int]*source{}
	r.total = rate.NewLimiter(rate.Limit(total), relayBurst(total))
}

// relaySession is a session this party relays, between peers a and b.
type relaySession struct {
	id   sessionID
	a, b int
	// fromA, fromB are the unix nanoseconds of each end's last packet: a
	// session ends when either falls silent (a live inner connection
	// sends keepalives both ways).
	fromA, fromB atomic.Int64
	toA, toB     chan []byte
	seq          atomic.Uint32
	// Bytes forwarded each way.
	bytesAB, bytesBA atomic.Uint64
	since            time.Time
	// links are the connections it forwards on, to a and to b (linkCache);
	// raws, their hops' raw packets.
	linkA, linkB linkCache
	rawA, rawB   rawHop
}

// fullLocked reports whether a session between a and b would pass a
// relay's limits: per pair, and per peer.
func (r *peerRelays) fullLocked(a, b int) bool {
	pair, na, nb := 0, 0, 0
	for _, s := range r.relayed {
		if (s.a == a && s.b == b) || (s.a == b && s.b == a) {
			pair++
		}
		if s.a == a || s.b == a {
			na++
		}
		if s.a == b || s.b == b {
			nb++
		}
	}
	return pair >= pairSessions || na >= peerSessions || nb >= peerSessions
}

// relayBurst is the bucket of a relay whose rate is total.
func relayBurst(total int) int { return max(relayBurstMin, total/4) }

// source is a peer that sends packets for the relay to forward.
type source struct {
	lim   *rate.Limiter
	bytes atomic.Int64 // sent since the last sample
	seen  atomic.Int64 // unix nanoseconds of when it was last active
}

// A source that sent activeBytes, and a sixteenth of the relay's rate,
// within a second (more than keepalives and the acknowledgements of a
// transfer the other way), no longer than sourceActive ago, is active.
const (
	sourceActive = 2 * time.Second
	activeBytes  = 64 << 10
	activeShare  = 16
)

// shareLocked gives every peer with a session an equal share of total,
// the rate a relay forwards, among those that sent lately: an idle one
// leaves its share to the others until it sends again (then the shares
// are reset within a second, at the next sample).
func (r *peerRelays) shareLocked(total int, now time.Time) {
	srcs := map[int]bool{}
	for _, s := range r.relayed {
		srcs[s.a], srcs[s.b] = true, true
	}
	for pid := range r.limiters {
		if !srcs[pid] {
			delete(r.limiters, pid)
		}
	}
	active := 0
	for pid := range srcs {
		src := r.limiters[pid]
		if src == nil {
			// New: the whole rate until the next sample says what it
			// sends (the limiter of all sources bounds it meanwhile).
			src = &source{lim: rate.NewLimiter(rate.Limit(total), relayBurst(total))}
			r.limiters[pid] = src
			continue
		}
		if now.Sub(time.Unix(0, src.seen.Load())) < sourceActive {
			active++
		}
	}
	share := rate.Limit(float64(total) / float64(max(1, active)))
	for _, src := range r.limiters {
		if src.seen.Load() != 0 {
			src.lim.SetLimitAt(now, share)
		}
	}
}

// reshare shares the relay's rate out again (every second).
func (m *Mux) reshare(now time.Time) {
	r := &m.prelay
	r.mu.Lock()
	r.shareLocked(m.opts.PeerRelayRate, now)
	for _, src := range r.limiters {
		src.bytes.Store(0)
	}
	r.mu.Unlock()
}

// relayable is p's primary, when it can carry sessions: a connection of
// its own (direct or through TURN), not itself relayed by a peer.
func (m *Mux) relayable(pid int) *link {
	if l := m.datagramLink(pid); l != nil && l.ep.session == nil {
		return l
	}
	return nil
}

// relayRequest is R's side of a request from peer from for a session to
// peer to: it offers it to `to`, and binds it when taken.
func (m *Mux) relayRequest(ctx context.Context, from, to int, id sessionID) header.Status {
	return m.relayHop(ctx, from, to, id, id.request(header.KindRelayOffer, from), nil)
}

// Routes of two relays. Where no single member reaches both A and B, the
// dialer A asks a relay R1 it reaches for a session to B through a second
// relay R2 (a KindRelayVia request, its Route naming R2 and A): R1 asks R2
// in turn (its Route naming B and A), R2 offers B a session with A (a
// KindRelayVia to B itself, carrying A's proof: a MAC over the session
// keyed with A and B's pair key, which B checks, so that no member can
// claim to relay for A), and binds R1–B; R1 then binds A–R2. The session's id
// is the same at every hop, each hop forwarding only between the two
// parties it bound, over its own authenticated connections: every hop
// sees the inner connection's ciphertext only, and B's handshake still
// checks A's pin. A route has two relays at most: a request for a route
// that comes from a relay (its origin is not the asker) must end at the
// far end. The dialer finds a route by asking: after every single relay
// it reaches has said it does not reach B, it asks each of them for each
// other member as the second relay (maxRoutes a round).

// maxRoutes bounds the two-relay routes a dialer asks for in one round.
const maxRoutes = 16

// relayVia is a party's side of a KindRelayVia request from peer from for
// its hop of a two-relay route to peer to: the first relay's, the last
// relay's, or the far end's (the offer of the session, taken only with
// the origin's proof, so that no member can spend the origin's sessions
// here by claiming to relay for it).
func (m *Mux) relayVia(ctx context.Context, from, to int, route header.Route, id sessionID) header.Status {
	next, origin := int(route.Next), int(route.Origin)
	switch {
	case to == m.opts.PID && next == to && origin != from:
		if !m.routeProven(origin, id, route.MAC) {
			m.prelay.refused.Add(1)
			m.quiet.Warn("route-mac:"+strconv.Itoa(from), "peer offered a session of a route of two relays without the proof of the party it names: refused",
				"peer", from, "for", origin)
			return header.StatusBadRequest
		}
		return m.relayOffer(from, origin, id)
	case next == to && to != m.opts.PID && origin != from && origin != to && origin != m.opts.PID:
		// The last relay: from is the relay before it.
		return m.relayHop(ctx, from, to, id, id.request(header.KindRelayVia, to),
			header.Route{Next: uint16(to), Origin: uint16(origin), MAC: route.MAC}.Append(nil))
	case origin == from && to != m.opts.PID && next != to && next != from && next != m.opts.PID:
		// The first relay: from is the party the session is for.
		return m.relayHop(ctx, from, next, id, id.request(header.KindRelayVia, to),
			header.Route{Next: uint16(to), Origin: uint16(from), MAC: route.MAC}.Append(nil))
	}
	m.prelay.refused.Add(1)
	m.quiet.Warn("route:"+strconv.Itoa(from), "peer asked for a relayed route that is not one of two relays ending at its far end: refused",
		"peer", from, "to", to, "next", next, "origin", origin)
	return header.StatusBadRequest
}

// routeMAC is origin's proof to the far end that it asked for session id
// through two relays: keyed with their pair key (the checks' integrity
// key, which only the two hold).
func routeMAC(key string, id sessionID, origin, far int) [16]byte {
	h := hmac.New(sha256.New, []byte(key))
	h.Write([]byte("sfkit-proxy relay route"))
	h.Write(id[:])
	h.Write(binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(nil, uint16(origin)), uint16(far)))
	return [16]byte(h.Sum(nil))
}

// routeProven reports whether mac is origin's proof of session id to us.
func (m *Mux) routeProven(origin int, id sessionID, mac [16]byte) bool {
	p := m.peer(origin)
	if p == nil {
		return false
	}
	p.mu.Lock()
	key := p.key
	p.mu.Unlock()
	want := routeMAC(key, id, origin, m.opts.PID)
	return key != "" && hmac.Equal(want[:], mac[:])
}

// relayHop binds a session between peers from and to, once `to` takes
// req (an offer, or the next relay's hop, with its trailer) over a stream.
func (m *Mux) relayHop(ctx context.Context, from, to int, id sessionID, req header.Request, trailer []byte) header.Status {
	r := &m.prelay
	refuse := func(st header.Status, why string) header.Status {
		r.refused.Add(1)
		m.log.Debug("peer relay session refused", "peer", from, "to", to, "why", why)
		return st
	}
	if m.opts.NoPeerRelay {
		return refuse(header.StatusNotAllowed, "peer relay is off here")
	}
	if to == from || to == m.opts.PID {
		return refuse(header.StatusBadRequest, "a session to itself or to the relay")
	}
	lb := m.relayable(to)
	if lb == nil || m.relayable(from) == nil {
		return refuse(header.StatusUnreachable, "no connection of ours to both")
	}
	r.mu.Lock()
	full, taken := r.fullLocked(from, to), r.relayed[id] != nil
	r.mu.Unlock()
	if full {
		return refuse(header.StatusOverBudget, "too many sessions")
	}
	if taken {
		return refuse(header.StatusBadRequest, "session id in use")
	}
	wait := m.opts.HandshakeTimeout
	if req.Kind == header.KindRelayVia {
		wait *= 2 // the next relay offers it in turn
	}
	octx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	str, rep, err := openStream(octx, lb.conn, req, trailer...)
	if err != nil {
		return refuse(header.StatusUnreachable, "offer failed: "+err.Error())
	}
	if rep.Status != header.StatusOK {
		return refuse(header.StatusRefused, "the peer refused: "+rep.Status.String())
	}
	endStream(str)
	now := time.Now()
	s := &relaySession{id: id, a: from, b: to, toA: make(chan []byte, relayQueue), toB: make(chan []byte, relayQueue), since: now}
	s.fromA.Store(now.UnixNano())
	s.fromB.Store(now.UnixNano())
	r.mu.Lock()
	if r.fullLocked(from, to) || r.relayed[id] != nil {
		r.mu.Unlock()
		return refuse(header.StatusOverBudget, "too many sessions")
	}
	r.relayed[id] = s
	r.shareLocked(m.opts.PeerRelayRate, time.Now())
	r.mu.Unlock()
	m.log.Info("relaying for peers", "peer", from, "to", to)
	m.goUnlessQuit(func() { m.runRelaySession(s) })
	return header.StatusOK
}

// runRelaySession forwards s's packets until it is idle for relayIdle.
func (m *Mux) runRelaySession(s *relaySession) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-m.quit:
		case <-ctx.Done():
		}
		cancel()
	}()
	var wg sync.WaitGroup
	wg.Go(func() { m.forward(ctx, s, s.a, &s.linkA, &s.rawA, s.toA, &s.bytesBA) })
	wg.Go(func() { m.forward(ctx, s, s.b, &s.linkB, &s.rawB, s.toB, &s.bytesAB) })
	t := time.NewTicker(relayIdle / 6)
	defer t.Stop()
	for ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case now := <-t.C:
			last := min(s.fromA.Load(), s.fromB.Load())
			if now.Sub(time.Unix(0, last)) >= relayIdle {
				cancel()
			}
		}
	}
	wg.Wait()
	r := &m.prelay
	r.mu.Lock()
	delete(r.relayed, s.id)
	r.shareLocked(m.opts.PeerRelayRate, time.Now())
	r.mu.Unlock()
	m.log.Info("relay session ended", "peer", s.a, "to", s.b)
}

// forward sends the packets of q to peer pid's primary until ctx ends,
// counting their bytes in n.
func (m *Mux) forward(ctx context.Context, s *relaySession, pid int, lc *linkCache, h *rawHop, q <-chan []byte, n *atomic.Uint64) {
	var rb rawBatch
	batch := make([][]byte, 0, gsoMax)
	seq := func() uint16 { return uint16(s.seq.Add(1)) | 0x8000 }
	for {
		select {
		case <-ctx.Done():
			return
		case b := <-q:
			batch = takeBatch(batch, b, q)
			l := lc.get(m.relayable, pid)
			if l == nil {
				m.prelay.dropped.Add(uint64(len(batch)))
				continue
			}
			sent := m.sendHops(l, h, batch, &rb, seq)
			m.prelay.forwarded.Add(uint64(sent))
			n.Add(uint64(sent))
		}
	}
}

// takeBatch is first and what else waits in q, up to gsoMax, in batch.
func takeBatch(batch [][]byte, first []byte, q <-chan []byte) [][]byte {
	batch = append(batch[:0], first)
	for len(batch) < gsoMax {
		select {
		case b := <-q:
			batch = append(batch, b)
		default:
			return batch
		}
	}
	return batch
}

// linkCache holds a peer's link between packets (the relayable one, or
// the one for datagrams), so that the data path takes no lock of the Mux
// or the peer while the link lives and is not replaced.
type linkCache struct{ l atomic.Pointer[link] }

func (c *linkCache) get(pick func(pid int) *link, pid int) *link {
	l := c.l.Load()
	if l == nil || l.draining.Load() || l.conn.Context().Err() != nil {
		l = pick(pid)
		c.l.Store(l)
	}
	return l
}

// sendRelayed sends the relayed packet b (header included) on conn: whole
// when it fits in a datagram, else as two pieces numbered by seq.
func sendRelayed(conn *quic.Conn, b []byte, seq func() uint16) error {
	err := conn.SendDatagram(b)
	var big *quic.DatagramTooLargeError
	if !errors.As(err, &big) || b[17] != pieceWhole {
		return err
	}
	n := seq()
	body := b[relayHeaderLen:]
	half := (len(body) + 1) / 2
	for i, part := range [][]byte{body[:half], body[half:]} {
		d := append(slices.Clone(b[:17]), byte(pieceFirst+i), byte(n>>8), byte(n))
		if err := conn.SendDatagram(append(d, part...)); err != nil {
			return err
		}
	}
	return nil
}

// relayDatagram takes a relayed packet b from peer from: a relay forwards
// it, an end delivers it; anything else is dropped.
func (m *Mux) relayDatagram(from int, b []byte) {
	r := &m.prelay
	if len(b) < relayHeaderLen || b[17] > pieceSecond {
		r.dropped.Add(1)
		return
	}
	id := sessionID(b[1:17])
	r.mu.Lock()
	s, e := r.relayed[id], r.ends[id]
	var src *source
	if s != nil {
		src = r.limiters[from]
	}
	r.mu.Unlock()
	m.relayTake(from, b, s, e, src)
}

// relayTake is relayDatagram's packet b from peer from once looked up: s
// the session it relays with that id, e the one it ends (either nil), src
// from's limiter when s is not nil.
func (m *Mux) relayTake(from int, b []byte, s *relaySession, e *sessionEnd, src *source) {
	r := &m.prelay
	switch {
	case s != nil && (from == s.a || from == s.b):
		now := time.Now()
		if src.bytes.Add(int64(len(b))) >= max(activeBytes, int64(m.opts.PeerRelayRate/activeShare)) {
			src.seen.Store(now.UnixNano())
		}
		if !r.total.AllowN(now, len(b)) || !src.lim.AllowN(now, len(b)) {
			r.dropped.Add(1)
			return
		}
		q := s.toB
		if from == s.b {
			q = s.toA
			s.fromB.Store(now.UnixNano())
		} else {
			s.fromA.Store(now.UnixNano())
		}
		select {
		case q <- b:
		default:
			r.dropped.Add(1)
		}
	case e != nil && from == e.via:
		e.take(b)
	default:
		r.dropped.Add(1)
	}
}

// sessionEnd is this party's end of a session with peer, through via: a
// net.PacketConn for the inner connection's QUIC transport.
type sessionEnd struct {
	m         *Mux
	id        sessionID
	via, peer int
	ep        *endpoint
	in        chan []byte
	// out holds the inner packets for write to send, together.
	out chan []byte
	// last is the unix nanoseconds of its last packet sent: its inner
	// transport sends only for a live connection or a handshake, so a
	// relay that sends junk cannot keep it.
	last      atomic.Int64
	seq       atomic.Uint32
	closed    chan struct{}
	closeOnce sync.Once
	link      linkCache // to the relay
	raw       rawHop    // its raw packets
	// route is the relays the dialer's end goes through, via first (set
	// before its connection is installed); nil at the other end, which
	// knows only via.
	route []int
	// handshakes bounds the inner handshakes it accepts.
	handshakes *rate.Limiter

	mu       sync.Mutex // guards the fields below
	partials map[uint16]*partial
	deadline time.Time
	dlCh     chan struct{} // closed when the deadline changes
}

// partial is a packet of which one piece came.
type partial struct {
	pieces [2][]byte
	at     time.Time
}

// partialAge is how long a piece waits for the other.
const partialAge = time.Second

// newSessionEnd makes this party's end of session id with peer through
// via, with its QUIC transport and listener, or refuses it (at most
// pairSessions with one peer through one relay, viaSessions through it).
func (m *Mux) newSessionEnd(id sessionID, via, peer int) (*sessionEnd, error) {
	e := &sessionEnd{m: m, id: id, via: via, peer: peer, in: make(chan []byte, relayQueue), out: make(chan []byte, relayQueue), closed: make(chan struct{}),
		partials: map[uint16]*partial{}, dlCh: make(chan struct{}), handshakes: rate.NewLimiter(sessionHandshakes, sessionBurst)}
	e.last.Store(time.Now().UnixNano())
	r := &m.prelay
	r.mu.Lock()
	n, nv := 0, 0
	for _, x := range r.ends {
		if x.via == via {
			nv++
			if x.peer == peer {
				n++
			}
		}
	}
	if n >= pairSessions || nv >= viaSessions || r.ends[id] != nil {
		r.mu.Unlock()
		return nil, fmt.Errorf("too many relayed sessions with party %d, or through party %d", peer, via)
	}
	r.ends[id] = e
	r.mu.Unlock()
	ep := &endpoint{session: e, conn: e, tr: &quic.Transport{Conn: e, ConnContext: e.admit}}
	var err error
	if ep.ln, err = ep.tr.Listen(m.serverTLS(), m.qcRelayed); err != nil {
		ep.tr.Close()
		e.Close()
		return nil, fmt.Errorf("quic listen: %w", err)
	}
	e.ep = ep
	if !m.goUnlessQuit(func() { e.run() }) {
		ep.close()
		return nil, net.ErrClosed
	}
	return e, nil
}

// admit refuses an inner handshake past e's rate, before any TLS.
func (e *sessionEnd) admit(ctx context.Context, _ *quic.ClientInfo) (context.Context, error) {
	if !e.handshakes.Allow() {
		return ctx, errHandshakeRate
	}
	return ctx, nil
}

// run accepts the inner connections of e until it is idle for relayIdle,
// or the Mux ends; then it closes e's transport.
func (e *sessionEnd) run() {
	m := e.m
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	wg.Go(func() { m.acceptLoop(ctx, e.ep) })
	wg.Go(func() { e.write(ctx) })
	t := time.NewTicker(relayIdle / 6)
	defer t.Stop()
	for idle := false; !idle; {
		select {
		case <-m.quit:
			idle = true
		case <-e.closed:
			idle = true
		case now := <-t.C:
			idle = now.Sub(time.Unix(0, e.last.Load())) >= relayIdle
		}
	}
	cancel()
	e.ep.close()
	wg.Wait()
}

// write sends the packets of e.out until ctx ends, those waiting together.
func (e *sessionEnd) write(ctx context.Context) {
	var rb rawBatch
	batch := make([][]byte, 0, gsoMax)
	seq := func() uint16 { return uint16(e.seq.Add(1)) &^ 0x8000 }
	for {
		select {
		case <-ctx.Done():
			return
		case b := <-e.out:
			batch = takeBatch(batch, b, e.out)
			if l := e.link.get(e.m.relayable, e.via); l != nil {
				e.m.sendHops(l, &e.raw, batch, &rb, seq)
			} else {
				e.m.prelay.dropped.Add(uint64(len(batch)))
			}
		}
	}
}

// take delivers a packet (or a piece of one) of the session from its relay.
func (e *sessionEnd) take(b []byte) {
	body := b[relayHeaderLen:]
	if b[17] != pieceWhole {
		seq := binary.BigEndian.Uint16(b[18:20])
		now := time.Now()
		e.mu.Lock()
		pp := e.partials[seq]
		if pp != nil && now.Sub(pp.at) > partialAge {
			pp = nil // a stale piece of an earlier packet with this number
		}
		if pp == nil {
			if len(e.partials) >= maxPartials {
				// Pieces whose others were lost.
				maps.DeleteFunc(e.partials, func(_ uint16, p *partial) bool { return now.Sub(p.at) > partialAge })
			}
			if len(e.partials) >= maxPartials {
				e.mu.Unlock()
				e.m.prelay.dropped.Add(1)
				return
			}
			pp = &partial{at: now}
			e.partials[seq] = pp
		}
		pp.pieces[b[17]-pieceFirst] = body
		whole := pp.pieces[0] != nil && pp.pieces[1] != nil
		if whole {
			delete(e.partials, seq)
			body = append(slices.Clip(pp.pieces[0]), pp.pieces[1]...)
		}
		e.mu.Unlock()
		if !whole {
			return
		}
	}
	select {
	case e.in <- body:
	default:
		e.m.prelay.dropped.Add(1)
	}
}

// ReadFrom returns the next inner packet.
func (e *sessionEnd) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		e.mu.Lock()
		dl, changed := e.deadline, e.dlCh
		e.mu.Unlock()
		var expired <-chan time.Time
		var t *time.Timer
		if !dl.IsZero() {
			wait := time.Until(dl)
			if wait <= 0 {
				return 0, nil, os.ErrDeadlineExceeded
			}
			t = time.NewTimer(wait)
			expired = t.C
		}
		var p []byte
		var closed bool
		select {
		case p = <-e.in:
		case <-e.closed:
			closed = true
		case <-changed:
		case <-expired:
		}
		if t != nil {
			t.Stop()
		}
		switch {
		case p != nil:
			return copy(b, p), e.remote(), nil
		case closed:
			return 0, nil, net.ErrClosed
		}
	}
}

// WriteTo sends an inner packet to the relay; with no connection to it,
// the packet is lost, as on a path that went away.
func (e *sessionEnd) WriteTo(b []byte, _ net.Addr) (int, error) {
	select {
	case <-e.closed:
		return 0, net.ErrClosed
	default:
	}
	l := e.link.get(e.m.relayable, e.via)
	if l == nil {
		return len(b), nil
	}
	d := make([]byte, 0, relayHeaderLen+len(b))
	d = append(append(append(d, dgRelay), e.id[:]...), pieceWhole, 0, 0)
	// The writer sends it with what else the inner connection sends now;
	// a full queue loses it, as a full socket buffer would.
	select {
	case e.out <- append(d, b...):
		e.last.Store(time.Now().UnixNano())
	default:
		e.m.prelay.dropped.Add(1)
	}
	return len(b), nil
}

// Close ends the session here.
func (e *sessionEnd) Close() error {
	e.closeOnce.Do(func() {
		close(e.closed)
		r := &e.m.prelay
		r.mu.Lock()
		if r.ends[e.id] == e {
			delete(r.ends, e.id)
		}
		r.mu.Unlock()
	})
	return nil
}

// where names the relays of e: "peer 2", or "peer 2 → peer 4".
func (e *sessionEnd) where() string {
	if len(e.route) < 2 {
		return "peer " + strconv.Itoa(e.via)
	}
	var s []string
	for _, r := range e.route {
		s = append(s, "peer "+strconv.Itoa(r))
	}
	return strings.Join(s, " → ")
}

func (e *sessionEnd) LocalAddr() net.Addr { return relayAddr{via: e.via, peer: e.m.opts.PID} }

func (e *sessionEnd) remote() net.Addr { return relayAddr{via: e.via, peer: e.peer} }

func (e *sessionEnd) SetDeadline(t time.Time) error { return e.SetReadDeadline(t) }

func (e *sessionEnd) SetReadDeadline(t time.Time) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.deadline = t
	close(e.dlCh)
	e.dlCh = make(chan struct{})
	return nil
}

func (e *sessionEnd) SetWriteDeadline(time.Time) error { return nil }

// SetReadBuffer and SetWriteBuffer tell quic-go that the buffers are
// fine: they are the session's queues (relayQueue packets).
func (e *sessionEnd) SetReadBuffer(int) error  { return nil }
func (e *sessionEnd) SetWriteBuffer(int) error { return nil }

// relayAddr is the address of a party reached through a session.
type relayAddr struct{ via, peer int }

func (relayAddr) Network() string  { return "peer-relay" }
func (a relayAddr) String() string { return fmt.Sprintf("party %d via party %d", a.peer, a.via) }

// relayOffer is B's side of an offer from relay `via` of a session with
// peer: taken only when peer relay is on, peer is another member with a
// lower pid (the dialer), and the limits allow.
func (m *Mux) relayOffer(via, peer int, id sessionID) header.Status {
	if m.opts.NoPeerRelay {
		m.prelay.refused.Add(1)
		return header.StatusNotAllowed
	}
	if peer == via || peer >= m.opts.PID || m.peer(peer) == nil {
		m.prelay.refused.Add(1)
		m.log.Warn("peer offered a relayed session for a party that does not dial us", "peer", via, "for", peer)
		return header.StatusBadRequest
	}
	if _, err := m.newSessionEnd(id, via, peer); err != nil {
		m.prelay.refused.Add(1)
		m.log.Debug("relayed session refused", "peer", via, "for", peer, "err", err)
		return header.StatusOverBudget
	}
	m.log.Info("relayed session offered and taken", "peer", peer, "via", via)
	return header.StatusOK
}

// dialViaPeers asks each peer that p's dialer reaches by its own path, the
// nearest first, for a session to p, and dials p through the first that
// gives one; failing that, it asks them for routes of two relays, through
// the members it does not reach itself. It reports whether a connection
// is up.
func (p *peer) dialViaPeers(ctx context.Context) bool {
	m := p.m
	now := time.Now()
	p.mu.Lock()
	if now.Before(p.nextViaPeer) {
		p.mu.Unlock()
		return false
	}
	p.nextViaPeer = now.Add(relayRetry)
	pin, key := p.info.Pin, p.key
	p.mu.Unlock()
	hops := p.relayHops()
	reached := map[int]bool{}
	for _, h := range hops {
		reached[h.pid] = true
	}
	for _, h := range hops {
		if ctx.Err() != nil {
			return false
		}
		id := newSessionID()
		if p.dialThrough(ctx, ctx, pin, h.l, []int{h.pid}, id, id.request(header.KindRelay, p.pid), nil, 2*m.opts.HandshakeTimeout, nil) {
			return true
		}
	}
	// Two relays: the first one we reach, the second one we do not (one
	// we reach would have been a single relay above). The search as a
	// whole is bounded, so that the connect loop's checks go on.
	sctx, cancel := context.WithTimeout(ctx, 4*m.opts.HandshakeTimeout)
	defer cancel()
	tried := 0
	for _, h := range hops {
		if key == "" {
			break // no proof for the far end without the pair key
		}
		for _, r2 := range m.peerList() {
			if r2.pid == p.pid || reached[r2.pid] {
				continue
			}
			if tried++; tried > maxRoutes || sctx.Err() != nil {
				return false
			}
			id := newSessionID()
			route := header.Route{Next: uint16(r2.pid), Origin: uint16(m.opts.PID), MAC: routeMAC(key, id, m.opts.PID, p.pid)}
			if p.dialThrough(ctx, sctx, pin, h.l, []int{h.pid, r2.pid}, id, id.request(header.KindRelayVia, p.pid), route.Append(nil), 3*m.opts.HandshakeTimeout, nil) {
				return true
			}
		}
	}
	return false
}

// relayHop is a party this party reaches by its own path, with that
// connection and its round trip (quic-go's minimum).
type relayHop struct {
	pid int
	l   *link
	rtt time.Duration
}

// relayHops are the parties other than p that could relay for p, the
// nearest first.
func (p *peer) relayHops() []relayHop {
	var hops []relayHop
	for _, r := range p.m.peerList() {
		if r.pid == p.pid {
			continue
		}
		if l := p.m.relayable(r.pid); l != nil {
			hops = append(hops, relayHop{r.pid, l, l.conn.ConnectionStats().MinRTT})
		}
	}
	slices.SortFunc(hops, func(a, b relayHop) int { return int(a.rtt - b.rtt) })
	return hops
}

// Ranking against TURN. A pair whose dialer has TURN is tried on TURN
// first (it needs no third party). While it is, the dialer looks for a
// peer relay with a shorter round trip, rankFirst after the connection
// and every rankEvery: a relay it reaches in less than the TURN path's
// round trip (more cannot beat it) is asked for a session, and its
// answer carries its own round trip to the far end (hopRTT); when the
// two hops together beat TURN (a fifth shorter, and by rankMargin at
// least: noise on a short path is no reason to move), the dialer
// connects through it and the connection moves there, as to a direct
// path: the flows resume, nothing lost. Round trips are quic-go's
// minimum of each connection. A session not dialed ends idle at both.
// A relay that draws the pair and then does not carry it (it lies about
// its round trip, or drops what it relays) has the pair back on TURN:
// each time that happens within rankEvery of the move, the next ranking
// waits twice as long, rankEvery at least and rankMaxWait at most.
const (
	rankFirst   = 2 * time.Second
	rankEvery   = time.Minute
	rankMaxWait = 16 * time.Minute
	rankMargin  = 5 * time.Millisecond
	// rankMaxRTT bounds a relay's claimed round trip to the far end.
	rankMaxRTT = 10 * time.Second
)

// rankDelay is how long p, on TURN, waits for its first ranking: once
// back from a move that did not hold, longer each time.
func (p *peer) rankDelay() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	switch {
	case p.rankedAt.IsZero():
	case now.Sub(p.rankedAt) < rankEvery:
		p.rankWait = min(max(2*p.rankWait, rankEvery), rankMaxWait)
		p.rankNext = now.Add(p.rankWait)
	default: // it held
		p.rankWait, p.rankNext = 0, time.Time{}
	}
	p.rankedAt = time.Time{}
	return max(rankFirst, p.rankNext.Sub(now))
}

// viaRTT is the round trip through a relay first away whose answer
// claimed far microseconds to the far end, taken as rankMaxRTT at most
// (a relay's number: it must not wrap around).
func viaRTT(first time.Duration, far uint64) time.Duration {
	return first + time.Duration(min(far, uint64(rankMaxRTT/time.Microsecond)))*time.Microsecond
}

// beats reports whether a round trip of rtt beats one of than.
func beats(rtt, than time.Duration) bool {
	return rtt > 0 && rtt < than*4/5 && than-rtt >= rankMargin
}

// hopRTT is this party's round trip to pid, in microseconds, for a
// relay's answer (0: none).
func (m *Mux) hopRTT(pid int) uint64 {
	if l := m.relayable(pid); l != nil {
		return uint64(l.conn.ConnectionStats().MinRTT.Microseconds())
	}
	return 0
}

// rankPeerRelays moves p from its TURN link l to a peer relay with a
// shorter round trip, if one has, and reports whether it did; the new
// connection lives within life, and is dialled only while ctx lasts.
func (p *peer) rankPeerRelays(life, ctx context.Context, l *link) bool {
	m := p.m
	turn := l.conn.ConnectionStats().MinRTT
	p.mu.Lock()
	pin := p.info.Pin
	p.mu.Unlock()
	for _, h := range p.relayHops() {
		if ctx.Err() != nil || l.conn.Context().Err() != nil || !beats(h.rtt, turn) {
			continue
		}
		id := newSessionID()
		better := func(rep header.Reply) bool {
			rtt := viaRTT(h.rtt, rep.Rcvd)
			if rep.Rcvd == 0 || !beats(rtt, turn) {
				p.log.Debug("peer relay does not beat TURN", "via", h.pid, "rtt", rtt, "turn_rtt", turn)
				return false
			}
			p.log.Info("peer relay is nearer than TURN; moving to it", "via", h.pid, "rtt", rtt, "turn_rtt", turn)
			return true
		}
		if p.dialThrough(life, ctx, pin, h.l, []int{h.pid}, id, id.request(header.KindRelay, p.pid), nil, 2*m.opts.HandshakeTimeout, better) {
			p.mu.Lock()
			p.rankedAt = time.Now()
			p.mu.Unlock()
			return true
		}
	}
	return false
}

// dialThrough asks the relay on l for session id to p (req, with its
// trailer, waiting at most wait for the answer), and dials p through it,
// within ctx; route names the relays, l's first. The connection lives
// within life. better, when not nil, judges the relay's answer first. It
// reports whether a connection is up.
func (p *peer) dialThrough(life, ctx context.Context, pin string, l *link, route []int, id sessionID, req header.Request, trailer []byte, wait time.Duration,
	better func(header.Reply) bool) bool {
	m := p.m
	rctx, cancel := context.WithTimeout(ctx, wait)
	str, rep, err := openStream(rctx, l.conn, req, trailer...)
	cancel()
	if err == nil && rep.Status != header.StatusOK {
		err = errors.New(rep.Status.String())
	}
	if err != nil {
		p.log.Debug("no relayed session", "route", route, "err", err)
		return false
	}
	endStream(str)
	if better != nil && !better(rep) {
		return false
	}
	e, err := m.newSessionEnd(id, route[0], p.pid)
	if err != nil {
		p.log.Debug("no relayed session", "route", route, "err", err)
		return false
	}
	e.route = route
	dctx, cancel := context.WithTimeout(ctx, m.opts.HandshakeTimeout)
	conn, err := e.ep.tr.Dial(dctx, e.remote(), m.clientTLS(p.pid, pin), m.qcRelayed)
	cancel()
	// (A connection made is installed, even if the search ended meanwhile:
	// the far end took it as the newest already.)
	if err != nil {
		p.log.Debug("dial through a peer relay failed", "route", route, "err", err)
		e.Close()
		return false
	}
	m.count.dialsOK.Add(1)
	p.log.Info("reached through a peer relay", "via", route[0], "route", e.where(), "relay_rtt", l.conn.ConnectionStats().SmoothedRTT)
	p.installConn(life, conn, e.ep)
	return true
}
