package quicmux

import (
	"net/netip"
	"slices"
	"time"

	"sfkit-proxy/backoff"
)

// Peer-reflexive addresses: how many are kept per peer, and how long one
// is checked after the last check that came from it.
const (
	maxPrflx = 8
	prflxTTL = time.Minute
)

// Pauses after a failed dial of a pair: checks may answer many times a
// second, and every handshake costs both sides (and counts against the
// peer's per-source limit).
const (
	dialRetryMin = 250 * time.Millisecond
	dialRetryMax = 8 * time.Second
)

// via says which of our endpoints a check or dial goes from.
type via uint8

const (
	viaMain  via = iota // the main UDP socket
	viaRelay            // our relay allocation
)

// route is what we know of reaching one candidate from one endpoint.
type route struct {
	answered time.Time // the last answer to a check over it; zero: none
	seq      uint64    // order of that answer among the table's answers
	retry    backoff.Backoff
	failures int
	nextTry  time.Time // no dial before this, after a failure
}

// candidate is one address of a peer.
type candidate struct {
	published bool      // in the peer's registry entry
	relay     bool      // published as one of the peer's relayed addresses
	heard     time.Time // an authenticated check of the peer's came from it (peer-reflexive)
	routes    [2]route  // by via
}

// candidates is one peer's address table: published, learned, answered,
// failed. It replaces what would otherwise be three scattered structures
// (learned addresses, answers waiting, and dial failures); its decisions
// (targets, best) are pure functions of the table and a time. Guarded by
// its peer's mu.
type candidates struct {
	byAddr map[netip.AddrPort]*candidate
	v4     bool   // our socket's family: only its addresses are targets
	seq    uint64 // answers so far
}

func newCandidates(v4 bool) candidates {
	return candidates{byAddr: make(map[netip.AddrPort]*candidate), v4: v4}
}

// publish sets the peer's published addresses (relays among them, or
// beside them); what it no longer publishes and never checked us from is
// forgotten.
func (c *candidates) publish(addrs, relays []netip.AddrPort) {
	for a, cd := range c.byAddr {
		cd.published, cd.relay = false, false
		if cd.heard.IsZero() {
			delete(c.byAddr, a)
		}
	}
	for _, a := range slices.Concat(addrs, relays) {
		cd := c.get(a)
		cd.published = true
		cd.relay = cd.relay || slices.Contains(relays, a)
	}
}

func (c *candidates) get(a netip.AddrPort) *candidate {
	cd := c.byAddr[a]
	if cd == nil {
		cd = &candidate{}
		c.byAddr[a] = cd
	}
	return cd
}

// learn remembers an address an authenticated check of the peer came from:
// the newest maxPrflx such unpublished addresses, each until it has been
// silent for prflxTTL.
func (c *candidates) learn(a netip.AddrPort, now time.Time) {
	c.get(a).heard = now
	var learned []netip.AddrPort
	for x, cd := range c.byAddr {
		switch {
		case cd.published:
		case now.Sub(cd.heard) > prflxTTL:
			delete(c.byAddr, x)
		default:
			learned = append(learned, x)
		}
	}
	if len(learned) <= maxPrflx {
		return
	}
	slices.SortFunc(learned, func(x, y netip.AddrPort) int { return c.byAddr[y].heard.Compare(c.byAddr[x].heard) })
	for _, x := range learned[maxPrflx:] {
		delete(c.byAddr, x)
	}
}

// isTarget reports whether a is an address to check at now: published, or
// heard from within prflxTTL, and of our family.
func (c *candidates) isTarget(a netip.AddrPort, now time.Time) bool {
	cd := c.byAddr[a]
	return cd != nil && a.Addr().Is4() == c.v4 && (cd.published || !cd.heard.IsZero() && now.Sub(cd.heard) <= prflxTTL)
}

// targets are the addresses to check at now, in address order.
func (c *candidates) targets(now time.Time) []netip.AddrPort {
	var out []netip.AddrPort
	for a := range c.byAddr {
		if c.isTarget(a, now) {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.AddrPort.Compare)
	return out
}

// isRelay reports whether the peer publishes a as a relayed address.
func (c *candidates) isRelay(a netip.AddrPort) bool {
	cd := c.byAddr[a]
	return cd != nil && cd.relay
}

// relays are the peer's relayed addresses.
func (c *candidates) relays() []netip.AddrPort {
	var out []netip.AddrPort
	for a, cd := range c.byAddr {
		if cd.relay {
			out = append(out, a)
		}
	}
	return out
}

// answered records an answer to our check to a, sent over v, at now; an
// address we no longer check is ignored.
func (c *candidates) answered(a netip.AddrPort, v via, now time.Time) {
	cd := c.byAddr[a]
	if cd == nil {
		return
	}
	c.seq++
	cd.routes[v].answered, cd.routes[v].seq = now, c.seq
}

// failed records a failed dial of a over v at now: the pair waits before
// the next, dialRetryMin doubling to dialRetryMax.
func (c *candidates) failed(a netip.AddrPort, v via, now time.Time) {
	cd := c.byAddr[a]
	if cd == nil {
		return
	}
	r := &cd.routes[v]
	if r.failures == 0 {
		r.retry = backoff.Backoff{Min: dialRetryMin, Max: dialRetryMax}
	}
	r.failures++
	r.nextTry = now.Add(r.retry.Step())
}

// succeeded forgets the failures of a over v.
func (c *candidates) succeeded(a netip.AddrPort, v via) {
	if cd := c.byAddr[a]; cd != nil {
		cd.routes[v] = route{answered: cd.routes[v].answered, seq: cd.routes[v].seq}
	}
}

// pick is a pair to dial: a peer address and the endpoint to dial it from.
type pick struct {
	to  netip.AddrPort
	via via
}

// best is the pair to dial at now, from the answers since the round began:
// a direct pair (from the main socket to an address that is not a relay)
// if one answered, the newest answer first, since after a burst what
// answered last is likeliest to work. Only with relayed (direct checks had
// their time) a relayed pair: through our own relay first (that one can
// migrate to the direct path later), else from the main socket to one of
// the peer's relayed addresses. A pair waiting after a failed dial is
// skipped. ok is false when there is nothing to dial.
func (c *candidates) best(now, since time.Time, relayed bool) (p pick, ok bool) {
	type option struct {
		pick
		rank int // lower is better
		seq  uint64
	}
	var opts []option
	for a, cd := range c.byAddr {
		if !c.isTarget(a, now) {
			continue
		}
		for v := range cd.routes {
			r := &cd.routes[v]
			if r.answered.IsZero() || r.answered.Before(since) || now.Before(r.nextTry) {
				continue
			}
			rank := 0
			switch {
			case via(v) == viaMain && !cd.relay:
			case !relayed:
				continue
			case via(v) == viaRelay:
				rank = 1
			default:
				rank = 2
			}
			opts = append(opts, option{pick{a, via(v)}, rank, r.seq})
		}
	}
	if len(opts) == 0 {
		return pick{}, false
	}
	b := slices.MinFunc(opts, func(x, y option) int {
		if x.rank != y.rank {
			return x.rank - y.rank
		}
		switch {
		case x.seq > y.seq:
			return -1
		case x.seq < y.seq:
			return 1
		}
		return 0
	})
	return b.pick, true
}
