package quicmux

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"

	"github.com/quic-go/quic-go"
	"golang.org/x/time/rate"

	"sfkit-proxy/quietlog"
)

// handshakeGuard admits unauthenticated handshakes: at most a few per
// second from one source IP, and with source address validation (a QUIC
// Retry round trip) for everyone while handshakes arrive faster than peers
// ever need. A TLS handshake costs the acceptor real CPU; refusing one
// costs a packet.
type handshakeGuard struct {
	perSource rate.Limit
	burst     int
	load      *rate.Limiter // all sources together, before Retry kicks in
	log       *quietlog.Log

	mu       sync.Mutex // guards sources and overflow
	sources  map[netip.Addr]*rate.Limiter
	overflow *rate.Limiter // shared by new sources while sources is full
}

// Handshake limits: a peer dials a handful of times per path change; a
// study has a few dozen parties at most.
const (
	handshakesPerSource = 5
	handshakeBurst      = 20
	handshakesUnderLoad = 50
	maxGuardSources     = 4096
)

func newHandshakeGuard(log *quietlog.Log) *handshakeGuard {
	return &handshakeGuard{perSource: handshakesPerSource, burst: handshakeBurst,
		load: rate.NewLimiter(handshakesUnderLoad, 2*handshakesUnderLoad), log: log,
		sources: make(map[netip.Addr]*rate.Limiter)}
}

var errHandshakeRate = errors.New("too many handshakes from this address")

// verifySource is quic.Transport.VerifySourceAddress: validate sources
// while under load, so that a flood from spoofed addresses costs a Retry
// packet each and reaches the per-source limit only from real ones.
func (g *handshakeGuard) verifySource(net.Addr) bool { return !g.load.Allow() }

// admit is quic.Transport.ConnContext: it refuses a handshake from a source
// over its rate, before any cryptography is done.
func (g *handshakeGuard) admit(ctx context.Context, info *quic.ClientInfo) (context.Context, error) {
	src := addrPortOf(info.RemoteAddr).Addr()
	g.mu.Lock()
	lim := g.sources[src]
	if lim == nil {
		if len(g.sources) >= maxGuardSources {
			for a, l := range g.sources {
				if l.Tokens() >= float64(g.burst) {
					delete(g.sources, a) // full again: as good as new
				}
			}
		}
		if len(g.sources) < maxGuardSources {
			lim = rate.NewLimiter(g.perSource, g.burst)
			g.sources[src] = lim
		} else {
			// Still full, all of them busy: sources not yet known share
			// one limit, so the map stays bounded.
			if g.overflow == nil {
				g.overflow = rate.NewLimiter(g.perSource, g.burst)
			}
			lim = g.overflow
		}
	}
	ok := lim.Allow()
	g.mu.Unlock()
	if !ok {
		g.log.Warn("handshake:"+src.String(), "refusing handshakes: too many from one address", "from", src,
			"limit_per_s", float64(g.perSource))
		return ctx, errHandshakeRate
	}
	return ctx, nil
}
