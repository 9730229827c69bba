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

// serveDatagrams answers the peer's probes on l, at most echoesPerSec,
// and hands echoes of ours to l's probe, until l closes.
func serveDatagrams(ctx context.Context, l *link) {
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
