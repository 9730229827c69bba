package quicmux

import (
	"net"
	"net/netip"
	"sync/atomic"
	"time"
)

// Raw hops. A hop of a session (an end to its relay, a relay to an end or
// to the next relay) carries the session's packets as QUIC datagrams of
// the two parties' authenticated connection until it can carry them raw:
// the same relayed packet, its first byte rawHeard or rawUnheard, sent
// as a UDP packet from the main socket to the neighbour's address, as
// Tailscale's peer relays and TURN do. The inner packet is already the end-to-end QUIC
// connection's ciphertext; the hop's own encryption costs every party
// on the path a decryption and an encryption per packet and makes each
// relay a QUIC endpoint of two connections, and on a CPU-bound relay that
// is most of its cost. The byte is below 0x40, so quic-go hands the
// packet to the endpoint's non-QUIC reader, and not STUN's 0 or 1.
//
// Who may send a raw packet is what binds it, as with a datagram: its
// session must be one this party relays or is an end of, and it must come
// from the very address of the connection to a party that session joins
// here (the address the connection was made with; raw packets are sent to
// it too). The session id is random and known only to the session's
// parties and to anyone on their path, who could drop the packets anyway
// (and the inner connection drops what its peer did not send). A raw
// packet is then taken exactly as a datagram from that party would be:
// the same limits, queues and counters.
//
// A hop goes raw only once it works both ways: a sender sends raw to a
// neighbour while raw packets from that neighbour for the session came
// within rawFresh (they reach us) and the last of them said that ours
// reach it (its first byte rawHeard, not rawUnheard); otherwise it sends
// datagrams, and once every rawProbe also a raw copy of one, which tells
// the neighbour that raw packets reach it and whether its reach us (QUIC
// drops the duplicate). A hop whose raw packets stop either way (a
// firewall, even one way; a NAT rebinding that moved the connection to a
// new address) is back on datagrams within rawFresh and the next packet
// of the side that stops hearing, less than a path takes to count as lost
// while it carries traffic, until a new connection joins the two.
// rawFresh is longer than the inner connection's keepalive interval (2 s
// after the last packet received), so an idle hop stays raw on paths of
// up to a few hundred milliseconds' round trip; on longer ones it goes
// back to datagrams between keepalives, which loses nothing. Only a connection made on the
// main socket, not through TURN, goes raw: its NAT mapping is the one a
// raw packet from that socket takes.

// rawHeard and rawUnheard are the first bytes of a raw relayed packet
// (the rest is the datagram's header and bytes): whether its sender
// hears the receiver's raw packets.
const (
	rawHeard   = 0x2a
	rawUnheard = 0x2b
)

const (
	rawFresh = 2500 * time.Millisecond
	rawProbe = time.Second
)

// rawHop is what a party knows of one hop's raw packets: when one came
// from the neighbour (unix nanoseconds), whether the last said that ours
// reach it, when it last probed; and where it sends them.
type rawHop struct {
	heard, probed atomic.Int64
	confirmed     atomic.Bool
	dst           atomic.Pointer[rawDst]
}

// rawDst is the neighbour's address on a link.
type rawDst struct {
	l  *link
	ua *net.UDPAddr
}

// hears reports whether the neighbour's raw packets came within rawFresh.
func (h *rawHop) hears(now int64) bool { return now-h.heard.Load() < int64(rawFresh) }

// fresh reports whether the hop works raw both ways now.
func (h *rawHop) fresh(now int64) bool { return h.hears(now) && h.confirmed.Load() }

// took notes a raw packet from the neighbour whose first byte was first.
func (h *rawHop) took(first byte, now int64) {
	h.heard.Store(now)
	h.confirmed.Store(first == rawHeard)
}

// lead is the first byte of a raw packet to the neighbour.
func (h *rawHop) lead(now int64) byte {
	if h.hears(now) {
		return rawHeard
	}
	return rawUnheard
}

// to is where raw packets to the neighbour on l go: l's remote address.
func (h *rawHop) to(l *link) *net.UDPAddr {
	if d := h.dst.Load(); d != nil && d.l == l {
		return d.ua
	}
	d := &rawDst{l: l, ua: net.UDPAddrFromAddrPort(l.remote)}
	h.dst.Store(d)
	return d.ua
}

// rawCapable reports whether l can carry a hop raw: a connection made on
// the main socket, not through TURN, that did not move from a relay.
func (m *Mux) rawCapable(l *link) bool {
	return l != nil && l.ep == m.main && !l.turn && !l.direct.Load()
}

// rawFrom reports whether a raw packet from `from` is from the neighbour on l.
func (m *Mux) rawFrom(l *link, from netip.AddrPort) bool {
	return m.rawCapable(l) && from == l.remote
}

// rawIn takes a raw relayed packet b (this party's to keep) that came
// from `from` on the main socket: a relay forwards it, an end delivers it,
// as a datagram from the party it matches; anything else is dropped.
func (m *Mux) rawIn(from netip.AddrPort, b []byte) {
	r := &m.prelay
	if len(b) < relayHeaderLen || b[17] > pieceSecond {
		r.dropped.Add(1)
		return
	}
	id := sessionID(b[1:17])
	r.mu.Lock()
	s, e := r.relayed[id], r.ends[id]
	var srcA, srcB *source
	if s != nil {
		srcA, srcB = r.limiters[s.a], r.limiters[s.b]
	}
	r.mu.Unlock()
	var hop *rawHop
	var src *source
	pid := -1
	switch {
	case s != nil && m.rawFrom(s.linkA.get(m.relayable, s.a), from):
		pid, hop, src, e = s.a, &s.rawA, srcA, nil
	case s != nil && m.rawFrom(s.linkB.get(m.relayable, s.b), from):
		pid, hop, src, e = s.b, &s.rawB, srcB, nil
	case e != nil && m.rawFrom(e.link.get(m.relayable, e.via), from):
		pid, hop, s = e.via, &e.raw, nil
	}
	if hop == nil {
		r.dropped.Add(1)
		return
	}
	hop.took(b[0], time.Now().UnixNano())
	r.rawIn.Add(1)
	b[0] = dgRelay
	m.relayTake(pid, b, s, e, src)
}

// sendHop sends the relayed packet b (header included; the caller's to
// change) to the neighbour on l: raw while its raw packets come, else as
// a datagram (whole, or as two pieces numbered by seq), with a raw copy
// once every rawProbe.
func (m *Mux) sendHop(l *link, h *rawHop, b []byte, seq func() uint16) error {
	if b[17] != pieceWhole || !m.rawCapable(l) {
		return sendRelayed(l.conn, b, seq)
	}
	now := time.Now().UnixNano()
	if h.fresh(now) {
		return m.writeRaw(b, h.lead(now), h.to(l))
	}
	err := sendRelayed(l.conn, b, seq) // a copy of b is queued
	if last := h.probed.Load(); now-last >= int64(rawProbe) && h.probed.CompareAndSwap(last, now) {
		m.writeRaw(b, h.lead(now), h.to(l))
	}
	return err
}

// Raw packets to one neighbour go out together, as quic-go sends its
// own: up to gsoMax of them, gsoBytes in all, in one send.
const (
	gsoMax   = 64
	gsoBytes = 65000
)

// rawBatch is a forwarder's packets for one send, and its buffers.
type rawBatch struct {
	pkts     [][]byte
	buf, oob []byte
}

// sendHops sends packets bs (each the caller's to change) to the
// neighbour on l as sendHop does, those that go raw in as few sends as
// their sizes allow; it reports the bytes of those it sent.
func (m *Mux) sendHops(l *link, h *rawHop, bs [][]byte, rb *rawBatch, seq func() uint16) (sent int) {
	rb.pkts = rb.pkts[:0]
	now := time.Now().UnixNano()
	raw := m.rawCapable(l) && h.fresh(now)
	for _, b := range bs {
		if raw && b[17] == pieceWhole {
			b[0] = rawHeard
			rb.pkts = append(rb.pkts, b)
			continue
		}
		if m.sendHop(l, h, b, seq) == nil {
			sent += len(b) - relayHeaderLen
		} else {
			m.prelay.dropped.Add(1)
		}
	}
	if len(rb.pkts) == 0 {
		return sent
	}
	to := h.to(l)
	uc, gso := m.main.conn.(*net.UDPConn)
	gso = gso && m.rawGSO && !m.noGSO.Load()
	for p := rb.pkts; len(p) > 0; {
		// A run of packets of one size; the last may be shorter.
		n, size := 1, len(p[0])
		for n < len(p) && n < gsoMax && (n+1)*size <= gsoBytes && len(p[n]) <= size {
			n++
			if len(p[n-1]) < size {
				break
			}
		}
		run := p[:n]
		p = p[n:]
		if gso && n > 1 {
			if rb.buf == nil {
				rb.buf, rb.oob = make([]byte, 0, gsoBytes+relayHeaderLen+1500), make([]byte, 64)
			}
			ok, err := writeGSO(uc, rb.buf, rb.oob, run, to)
			if ok {
				for _, b := range run {
					if err == nil {
						sent += len(b) - relayHeaderLen
						m.prelay.rawOut.Add(1)
					} else {
						m.prelay.dropped.Add(1)
					}
				}
				continue
			}
			m.noGSO.Store(true)
			gso = false
		}
		for _, b := range run {
			if m.writeRaw(b, rawHeard, to) == nil {
				sent += len(b) - relayHeaderLen
			} else {
				m.prelay.dropped.Add(1)
			}
		}
	}
	return sent
}

// writeRaw sends b raw to `to` from the main socket, first its first byte.
func (m *Mux) writeRaw(b []byte, first byte, to *net.UDPAddr) error {
	b[0] = first
	if _, err := m.main.tr.WriteTo(b, to); err != nil {
		return err
	}
	m.prelay.rawOut.Add(1)
	return nil
}
