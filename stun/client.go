package stun

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"time"
)

// Sender writes a datagram from the shared socket. *quic.Transport has this
// method; the stun package never owns the socket.
type Sender interface {
	WriteTo(b []byte, addr net.Addr) (int, error)
}

// Result is the outcome of one transaction: who answered and what address
// they saw us at.
type Result struct {
	TxID   TxID
	From   netip.AddrPort
	Mapped netip.AddrPort
}

// Client runs STUN transactions over a socket it is handed. Responses reach
// it through Handle, called by the socket's owner for every STUN response.
type Client struct {
	send Sender

	mu      sync.Mutex // guards pending and swept
	pending map[TxID]pending
	swept   time.Time // when expired transactions were last dropped
}

// ErrTooManyPending is Send's error when maxPending transactions wait for
// answers: the request is not sent.
var ErrTooManyPending = errors.New("too many stun transactions waiting for answers")

// maxPending bounds the transactions a Client remembers: a study of a
// dozen peers, each checked at two dozen addresses ten times a second,
// for pendingTTL, stays below it.
const maxPending = 1 << 15

type pending struct {
	key     string // integrity key the response must carry; "" for none
	deliver func(Result)
	expires time.Time
}

// pendingTTL bounds how long an unanswered transaction is remembered.
const pendingTTL = 10 * time.Second

// NewClient returns a client that sends through s.
func NewClient(s Sender) *Client {
	return &Client{send: s, pending: make(map[TxID]pending)}
}

// Send writes pkt, a request with transaction tx, to `to`, and arranges for a
// matching response to be handed to deliver, which must not block. A
// non-empty key means the response must carry integrity with it.
func (c *Client) Send(to netip.AddrPort, pkt []byte, tx TxID, key string, deliver func(Result)) error {
	now := time.Now()
	c.mu.Lock()
	if now.Sub(c.swept) >= time.Second {
		// A sweep a second at most: Send is called per check, and a scan
		// per call grows with what waits.
		c.swept = now
		for id, p := range c.pending {
			if now.After(p.expires) {
				delete(c.pending, id)
			}
		}
	}
	if len(c.pending) >= maxPending {
		c.mu.Unlock()
		return fmt.Errorf("send stun to %v: %w", to, ErrTooManyPending)
	}
	c.pending[tx] = pending{key: key, deliver: deliver, expires: now.Add(pendingTTL)}
	c.mu.Unlock()
	if _, err := c.send.WriteTo(pkt, net.UDPAddrFromAddrPort(to)); err != nil {
		c.forget(tx)
		return fmt.Errorf("send stun to %v: %w", to, err)
	}
	return nil
}

func (c *Client) forget(tx TxID) {
	c.mu.Lock()
	delete(c.pending, tx)
	c.mu.Unlock()
}

// Handle delivers a response to the transaction waiting for it. It reports
// whether the message was taken; responses nobody waits for, or that fail the
// integrity check, are ignored.
func (c *Client) Handle(m *Message, from netip.AddrPort) bool {
	if m.Request {
		return false
	}
	c.mu.Lock()
	p, ok := c.pending[m.TxID]
	if ok && time.Now().Before(p.expires) && (p.key == "" || m.Verify(p.key) == nil) {
		delete(c.pending, m.TxID)
	} else {
		ok = false
	}
	c.mu.Unlock()
	if !ok {
		return false
	}
	p.deliver(Result{TxID: m.TxID, From: from, Mapped: m.Mapped})
	return true
}

// Bind asks server for our mapped address, retransmitting (RFC 8489 section
// 6.2.1, shortened) until an answer or ctx ends.
func (c *Client) Bind(ctx context.Context, server netip.AddrPort) (netip.AddrPort, error) {
	tx := NewTxID()
	pkt := Request(tx)
	out := make(chan Result, 1)
	deliver := func(r Result) {
		select {
		case out <- r:
		default:
		}
	}
	defer c.forget(tx)
	rto := 250 * time.Millisecond
	for {
		if err := c.Send(server, pkt, tx, "", deliver); err != nil {
			return netip.AddrPort{}, err
		}
		t := time.NewTimer(rto)
		select {
		case r := <-out:
			t.Stop()
			return r.Mapped, nil
		case <-ctx.Done():
			t.Stop()
			return netip.AddrPort{}, fmt.Errorf("stun binding to %v: %w", server, ctx.Err())
		case <-t.C:
		}
		rto = min(2*rto, 2*time.Second)
	}
}

// Answer builds the reply to a binding request m received from `from`. With a
// non-empty key the request must carry integrity with that key, and the
// reply does too; a request that fails the check gets nil (ignore it, as ICE
// does, so strangers learn nothing). With an empty key it answers anyone, as
// a plain STUN server.
func Answer(m *Message, from netip.AddrPort, key string) []byte {
	if !m.Request {
		return nil
	}
	if key != "" && m.Verify(key) != nil {
		return nil
	}
	return Response(m.TxID, from, key)
}

// NAT behaviours as RFC 4787 names them, as far as two servers can tell.
const (
	NATUnknown             = "unknown"
	NATEndpointIndependent = "endpoint-independent"
	NATEndpointDependent   = "endpoint-dependent"
)

// Mapping is what the keepalive learned.
type Mapping struct {
	Addr netip.AddrPort // the socket's address as the first answering server saw it
	NAT  string         // NATUnknown unless two servers answered
}

// Keepalive learns the socket's external address from STUN servers and keeps
// the NAT mapping open with a jittered binding every 20–26 s.
type Keepalive struct {
	Client  *Client
	Servers []string // host:port, tried in turn; resolved every round
	// Network is "udp4" or "udp6": the family of the shared socket.
	Network string
	// OnMapping is called with the first mapping and whenever it changes.
	OnMapping func(Mapping)
	// Resolver resolves server names; nil means net.DefaultResolver.
	Resolver *net.Resolver
	// Interval is the base period between bindings; zero means 20 s, to
	// which up to 30% jitter is added.
	Interval time.Duration
	// OnRound, if set, is called after every round with its error (nil on
	// success); for logs and metrics.
	OnRound func(error)
	// Now, if set, starts a round at once when it receives: a path died,
	// and the mapping may have changed with it.
	Now <-chan struct{}
}

// ErrNoServer is returned by a round when no STUN server answered.
var ErrNoServer = errors.New("no stun server answered")

// Run binds until ctx ends. Failed rounds are retried with backoff from 1 s
// to the normal interval. It returns ctx's error.
func (k *Keepalive) Run(ctx context.Context) error {
	interval := k.Interval
	if interval == 0 {
		interval = 20 * time.Second
	}
	var last Mapping
	backoff := time.Second
	for {
		m, err := k.round(ctx)
		if k.OnRound != nil && ctx.Err() == nil {
			k.OnRound(err)
		}
		wait := interval + rand.N(interval*3/10+1)
		if err == nil {
			backoff = time.Second
			if m != last {
				last = m
				if k.OnMapping != nil {
					k.OnMapping(m)
				}
			}
		} else {
			wait = backoff + rand.N(backoff/4+1)
			backoff = min(2*backoff, interval)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-k.Now:
			t.Stop()
		case <-t.C:
		}
	}
}

// round binds with the servers in turn; after the first answer it asks one
// more server, if there is one, to tell the NAT's mapping behaviour.
func (k *Keepalive) round(ctx context.Context) (Mapping, error) {
	r := k.Resolver
	if r == nil {
		r = net.DefaultResolver
	}
	family := "ip4"
	if k.Network == "udp6" {
		family = "ip6"
	}
	var m Mapping
	var errs []error
	for _, s := range k.Servers {
		ap, err := resolve(ctx, r, family, s)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		bctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		mapped, err := k.Client.Bind(bctx, ap)
		cancel()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !m.Addr.IsValid() {
			m = Mapping{Addr: mapped, NAT: NATUnknown}
			continue
		}
		m.NAT = NATEndpointIndependent
		if mapped != m.Addr {
			m.NAT = NATEndpointDependent
		}
		return m, nil
	}
	if m.Addr.IsValid() {
		return m, nil
	}
	if ctx.Err() != nil {
		return m, ctx.Err()
	}
	return m, fmt.Errorf("%w: %w", ErrNoServer, errors.Join(errs...))
}

func resolve(ctx context.Context, r *net.Resolver, family, hostport string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(hostport); err == nil {
		return ap, nil
	}
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("stun server %q: %w", hostport, err)
	}
	p, err := net.LookupPort("udp", port)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("stun server %q: %w", hostport, err)
	}
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	ips, err := r.LookupNetIP(rctx, family, host)
	if err != nil || len(ips) == 0 {
		return netip.AddrPort{}, fmt.Errorf("resolve stun server %q: %w", hostport, err)
	}
	return netip.AddrPortFrom(ips[0].Unmap(), uint16(p)), nil
}
