package quicmux

import (
	"context"
	"encoding/binary"
	"errors"
	"maps"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/quic-go/quic-go"
)

// Stalled paths. QUIC raises its packet size as the path allows (path MTU
// discovery) and never lowers it: when the path's MTU shrinks (a VPN comes
// up, a route changes), every full-size packet is lost, while keepalives
// and acknowledgements, small, still get through. The connection neither
// dies nor carries anything; its flows wait for ever. So each connection
// is watched for progress: when a flow on it gave its stream bytes the
// peer has not acknowledged, and nothing came back on its streams for a
// while (not even the flows' acknowledgements), a probe as large as the
// connection's packets goes
// out as a QUIC datagram, which the peer echoes as large as its own. An
// echo means the path carries full packets, and the peer's programs are
// only slow to read (backpressure): nothing is done. No echo means the
// path is stalled: the connection is dropped, its flows resume on a new
// one, whose packet size starts again from QUIC's minimum and grows only
// as far as the path now allows.

// Why a path was given up, beside the connection's own errors.
var (
	errPathStalled = errors.New("path stalled")
	errPathDead    = errors.New("path dead")
)

// Datagram kinds.
const (
	dgProbe = 0x01 // a probe: kind | nonce (8) | padding
	dgEcho  = 0x02 // its echo: kind | nonce (8) | padding
)

// Stall watch timings.
const (
	stallAfterMin = 3 * time.Second  // no progress for at least this long
	stallRTTs     = 8                // nor for fewer round trips
	probeAgain    = 10 * time.Second // after an echo, while still no progress
	probeTries    = 3                // probes per check, probeGap apart
	probeGap      = 300 * time.Millisecond
	probeWaitMin  = 2 * time.Second // the last probe's echo waits this long, or 4 round trips
	echoesPerSec  = 10              // what a peer's probes get answered, at most
)

// stallWatch is what keep knows of one connection's progress.
type stallWatch struct {
	read      uint64    // the link's stream bytes read when last seen
	since     time.Time // when it last read, or began to owe; zero while it owes nothing
	nextProbe time.Time // no probe before this
	probing   bool      // a probe is out
}

// observe takes the bytes read on the link's streams at now, and whether
// a flow on it owes the peer an answer (it gave its stream bytes the peer
// has not acknowledged), and reports whether to probe: it owes, has read
// nothing for after, and no probe is due later. Pure: the caller probes.
func (w *stallWatch) observe(read uint64, owes bool, now time.Time, after time.Duration) bool {
	if !owes {
		w.read, w.since, w.nextProbe = read, time.Time{}, time.Time{}
		return false
	}
	if read != w.read || w.since.IsZero() {
		if read != w.read {
			w.nextProbe = time.Time{}
		}
		w.read, w.since = read, now
	}
	if now.Sub(w.since) < after || now.Before(w.nextProbe) {
		return false
	}
	w.nextProbe = now.Add(probeAgain)
	return true
}

// stallAfter is how long a link may make no progress before a probe.
func stallAfter(rtt time.Duration) time.Duration { return max(stallAfterMin, stallRTTs*rtt) }

// probe sends full-size probes on l and reports whether one was echoed
// in time, and how large they were. A connection without datagrams (an
// older peer) counts as echoed: it cannot be told apart from backpressure.
func probe(ctx context.Context, l *link) (echoed bool, size int) {
	if !l.datagrams {
		return true, 0
	}
	nonce := rand.Uint64()
	rtt := l.conn.ConnectionStats().SmoothedRTT
	// Echoes of an earlier probe are stale.
	for len(l.echoes) > 0 {
		<-l.echoes
	}
	wait := time.NewTimer(probeTries*probeGap + max(probeWaitMin, 4*rtt))
	defer wait.Stop()
	gap := time.NewTicker(probeGap)
	defer gap.Stop()
	for sent := 0; ; {
		if sent < probeTries {
			var err error
			if size, err = sendFull(l.conn, dgProbe, nonce); err != nil {
				return true, size // closed, or no datagrams: not for this watch to say
			}
			sent++
		}
		select {
		case <-ctx.Done():
			return true, size
		case n := <-l.echoes:
			if n == nonce {
				return true, size
			}
		case <-gap.C:
		case <-wait.C:
			return false, size
		}
	}
}

// sendFull sends a datagram of kind and nonce, padded to the largest the
// connection's packets carry now, and returns its size.
func sendFull(conn *quic.Conn, kind byte, nonce uint64) (int, error) {
	b := binary.BigEndian.AppendUint64([]byte{kind}, nonce)
	err := conn.SendDatagram(append(b, make([]byte, 1500)...))
	var big *quic.DatagramTooLargeError
	if !errors.As(err, &big) {
		return len(b) + 1500, err
	}
	b = append(b, make([]byte, max(0, int(big.MaxDatagramPayloadSize)-len(b)))...)
	return len(b), conn.SendDatagram(b)
}

// serveDatagrams answers the probes of peer pid on l, at most
// echoesPerSec, hands echoes of ours to l's probe, relayed packets to the
// peer relay (peerrelay.go) and carried UDP to Options.Datagram, until l
// closes.
func (m *Mux) serveDatagrams(ctx context.Context, pid int, l *link) {
	if !l.datagrams {
		return
	}
	var window time.Time
	answered := 0
	for {
		b, err := l.conn.ReceiveDatagram(ctx)
		if err != nil {
			return
		}
		if len(b) < 9 {
			continue
		}
		nonce := binary.BigEndian.Uint64(b[1:9])
		switch b[0] {
		case dgProbe:
			if now := time.Now(); now.Sub(window) >= time.Second {
				window, answered = now, 0
			}
			if answered < echoesPerSec {
				answered++
				sendFull(l.conn, dgEcho, nonce)
			}
		case dgEcho:
			select {
			case l.echoes <- nonce:
			default:
			}
		case dgRelay:
			m.relayDatagram(pid, b)
		default:
			if b[0] >= DatagramKindMin && b[0] <= DatagramKindMax && m.opts.Datagram != nil {
				m.opts.Datagram(pid, b)
			}
		}
	}
}

// probeResult is how a probe of l went.
type probeResult struct {
	l      *link
	echoed bool
	size   int // of the probes' datagrams
}

// watchStalls takes the progress of each connection of p's pool at now,
// and probes those that made none for a while (one probe at a time per
// connection), each probe's result going to results.
func (p *peer) watchStalls(ctx context.Context, now time.Time, watches map[*link]*stallWatch, results chan<- probeResult) {
	p.mu.Lock()
	ls := p.pool.live()
	p.mu.Unlock()
	owes := make(map[*link]bool, len(ls))
	pf := p.m.flows.of(p.pid)
	pf.mu.Lock()
	live := slices.Collect(maps.Values(pf.live))
	pf.mu.Unlock()
	for _, e := range live {
		if on := e.on.Load(); on != nil && !owes[on] && e.c.Owes() {
			owes[on] = true
		}
	}
	seen := make(map[*link]bool, len(ls))
	for _, l := range ls {
		seen[l] = true
		w := watches[l]
		if w == nil {
			w = &stallWatch{read: l.read.Load()}
			watches[l] = w
		}
		if w.observe(l.read.Load(), owes[l], now, stallAfter(l.conn.ConnectionStats().SmoothedRTT)) && !w.probing {
			w.probing = true
			p.m.wg.Go(func() {
				echoed, size := probe(ctx, l)
				results <- probeResult{l, echoed, size}
			})
		}
	}
	for l, w := range watches {
		if !seen[l] && !w.probing {
			delete(watches, l)
		}
	}
}

// Packets that grow back. quic-go's path MTU discovery searches upward
// once per connection and stops: a connection made while the path was
// small (after a stall, on a VPN) keeps small packets after the path
// grows again, each carrying up to a sixth less. So the dialer of a
// direct link whose packets are short of full size tries, now and then, a
// pool member on the same path, which discovers afresh (packetTrial).
// When it finds packets larger by more than quic-go's own search step,
// the path carries more again: the link is replaced by a new one, and its
// flows move (a resume: nothing lost). Trials come 30 s after the link
// was made, then doubling to 15 min apart; each costs one handshake and a
// few probes.

// Packet sizes, in bytes of UDP payload.
const (
	// fullPacket: quic-go searches up to 1,452 (a 1,500-byte MTU) and
	// stops within 21 bytes of it.
	fullPacket = 1452 - 21
	// packetGain: a trial's packets must be this much larger to replace a
	// link (more than quic-go's own search step, 20).
	packetGain = 24
	// datagramOverhead is what a packet holds beside the largest datagram
	// quic-go takes (a type byte, a connection ID of up to 20 bytes, the
	// 16-byte tag).
	datagramOverhead = 37
)

// Trial timings.
const (
	regrowFirst = 30 * time.Second
	regrowMax   = 15 * time.Minute
	// trialSettle bounds how long a trial's discovery may take, at least
	// trialSettleMin or trialSettleRTTs round trips (quic-go waits five
	// round trips between its probes, and needs about four).
	trialSettleMin  = 3 * time.Second
	trialSettleRTTs = 40
	trialSettleMax  = 30 * time.Second
)

// packetSize is the largest QUIC packet conn sends now, in bytes of UDP
// payload, as its path MTU discovery has found it (QUIC's minimum until
// it found more), or 0 when conn takes no datagrams. It asks quic-go for
// the largest datagram it would take (a refusal sends nothing).
func packetSize(conn *quic.Conn) int {
	var big *quic.DatagramTooLargeError
	if !errors.As(conn.SendDatagram(oversize[:]), &big) {
		return 0
	}
	return int(big.MaxDatagramPayloadSize) + datagramOverhead
}

// oversize is larger than any datagram a packet holds (read only).
var oversize [1500]byte

// regrow schedules one link's packet-size trials.
type regrow struct {
	next   time.Time     // no trial before this
	wait   time.Duration // between trials, doubling
	trying bool          // one is out
}

func newRegrow(since time.Time) regrow {
	return regrow{next: since.Add(regrowFirst), wait: regrowFirst}
}

// due reports whether to try larger packets now, for a link whose
// packets are size bytes (0: unknown). Pure: the caller tries.
func (r *regrow) due(now time.Time, size int) bool {
	if r.trying || now.Before(r.next) || size == 0 || size >= fullPacket {
		return false
	}
	r.trying = true
	return true
}

// done takes a trial's end at now: the next is twice as far off.
func (r *regrow) done(now time.Time) {
	r.trying = false
	r.wait = min(2*r.wait, regrowMax)
	r.next = now.Add(r.wait)
}

// trialResult is how a trial of larger packets on l went.
type trialResult struct {
	l         *link
	size, got int // l's packets, the trial's
	err       error
}

// packetTrial opens a pool member beside primary, lets its path MTU
// discovery run, and reports the packet size it found; the member closes
// after, unless its packets are larger (then primary is replaced, and the
// member with it).
func (p *peer) packetTrial(ctx context.Context, primary *link, size int) trialResult {
	r := trialResult{l: primary, size: size}
	conn, ep, err := p.dialMember(ctx, primary)
	if err != nil {
		r.err = err
		return r
	}
	if !p.installMember(ctx, primary, conn, ep) {
		r.err = errors.New("the pool took no trial connection")
		return r
	}
	settle := min(max(trialSettleMin, trialSettleRTTs*conn.ConnectionStats().SmoothedRTT), trialSettleMax)
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for end := time.Now().Add(settle); time.Now().Before(end) && r.got < fullPacket; {
		select {
		case <-ctx.Done():
			return r
		case <-conn.Context().Done():
			return r
		case <-t.C:
			r.got = packetSize(conn)
		}
	}
	if r.got < size+packetGain {
		p.m.closeLater(codeIdle, "packet-size trial over", conn)
	}
	return r
}
