package relay

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/pion/stun/v3"

	"sfkit-proxy/backoff"
)

// A TURN allocation belongs to the 5-tuple it was made from: when the
// client's own NAT rebinds (a new external port or address for its
// socket), the server no longer knows the client's packets, the
// allocation stops carrying anything, and it cannot be refreshed. Renewing
// notices and makes a new one: every CheckInterval it asks the server
// (a STUN Binding through the same socket) what address it sees, and
// whether it still holds the allocation (held), and it allocates again
// when that address changed, when the server lost the allocation (it
// restarted: on UDP nothing else tells), when two checks in a row get no
// answer, or when the socket fails (a TURN-over-TCP connection reset).
// Until one succeeds it retries with backoff, so a relay that is down at
// start is allocated once it is up. The new relayed address is told to
// OnChange (the sidecar publishes it; the Mux sends its checks from it),
// and the connections over the old one move, as on any path change.

// CheckInterval is how often Renewing asks the server what it sees.
const CheckInterval = 2 * time.Second

// checkTimeout bounds one check's answer.
const checkTimeout = 2 * time.Second

// Renewing is a relayed socket that outlives its allocations: a
// net.PacketConn over the current one, whose reads go on across a
// replacement. Run keeps it allocated; Close releases it.
type Renewing struct {
	opts Options
	log  *slog.Logger
	// OnChange, if set before Run, is told each new relayed address.
	OnChange func(addr netip.AddrPort, server string)
	dead     chan struct{} // a token when a read found the allocation's socket failed
	done     chan struct{} // closed by Close

	mu        sync.Mutex  // guards cur, swapped, closed, deadline and dlChanged
	cur       *Allocation // nil until one is allocated
	swapped   chan struct{}
	closed    bool
	deadline  time.Time     // the last read deadline set
	dlChanged chan struct{} // closed when the deadline changes (quic-go's Close sets one to end a read)
}

// NewRenewing returns a Renewing over a, which may be nil (none could be
// allocated yet: Run tries again). It takes a: Close closes it.
func NewRenewing(a *Allocation, opts Options) *Renewing {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Renewing{opts: opts, log: opts.Logger.With("component", "relay"), cur: a, swapped: make(chan struct{}),
		dlChanged: make(chan struct{}), dead: make(chan struct{}, 1), done: make(chan struct{})}
}

// Current is the allocation now, nil while there is none.
func (r *Renewing) Current() *Allocation {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cur
}

// Run checks the allocation every CheckInterval and replaces it when it
// is lost, until ctx ends or Close.
func (r *Renewing) Run(ctx context.Context) error {
	t := time.NewTicker(CheckInterval)
	defer t.Stop()
	misses := 0
	for {
		why := ""
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-r.done:
			return nil
		case <-r.dead:
			why = "its socket failed"
		case <-t.C:
			a := r.Current()
			if a == nil {
				why = "none was allocated yet"
				break
			}
			mapped, err := a.check(ctx)
			if err == nil && !a.mapped.IsValid() {
				a.mapped = mapped // the first answer, when allocating had none
			}
			switch {
			case err == nil && a.mapped.IsValid() && mapped != a.mapped:
				why = "this party's NAT rebound its socket (" + a.mapped.String() + " is now " + mapped.String() + ")"
			case err == nil && !a.held(ctx):
				why = "the server no longer holds it (it restarted, or expired it)"
			case err != nil && a.mapped.IsValid():
				// (A server that never answered a Binding, some do not,
				// is judged by its socket alone.)
				if misses++; misses >= 2 {
					why = "the server did not answer two checks"
				}
			default:
				misses = 0
			}
		}
		if why == "" {
			continue
		}
		misses = 0
		if err := r.renew(ctx, why); err != nil {
			return nil // closed, or ctx ended
		}
	}
}

// renew allocates again, with backoff until it succeeds, and swaps.
func (r *Renewing) renew(ctx context.Context, why string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the goroutine below
	go func() {
		select {
		case <-r.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	old := r.Current()
	if old != nil {
		r.log.Warn("relay allocation lost; allocating again", "relay", old.Server, "addr", old.Addr, "why", why)
	}
	b := backoff.Backoff{Min: time.Second, Max: 30 * time.Second}
	for {
		a, err := Allocate(ctx, r.opts)
		if err == nil {
			r.swap(a)
			r.log.Info("relay allocated", "relay", a.Server, "addr", a.Addr)
			if r.OnChange != nil {
				r.OnChange(a.Addr, a.Server)
			}
			return nil
		}
		if werr := b.Wait(ctx); werr != nil {
			return werr
		}
	}
}

// swap makes a the current allocation and releases the old one, whose
// blocked read then goes on on a.
func (r *Renewing) swap(a *Allocation) {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		a.Conn.Close()
		return
	}
	old := r.cur
	r.cur = a
	if !r.deadline.IsZero() {
		a.Conn.SetReadDeadline(r.deadline)
	}
	close(r.swapped)
	r.swapped = make(chan struct{})
	r.mu.Unlock()
	if old != nil {
		old.Conn.Close()
	}
}

// ReadFrom reads from the current allocation, across replacements.
func (r *Renewing) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		r.mu.Lock()
		a, swapped, closed, deadline, dlChanged := r.cur, r.swapped, r.closed, r.deadline, r.dlChanged
		r.mu.Unlock()
		if closed {
			return 0, nil, net.ErrClosed
		}
		if a != nil {
			n, from, err := a.Conn.ReadFrom(b)
			var ne net.Error
			if err == nil || errors.As(err, &ne) && ne.Timeout() {
				return n, from, err
			}
			if r.Current() != a {
				continue // replaced while this read waited
			}
			select {
			case r.dead <- struct{}{}:
			default:
			}
		}
		var expired <-chan time.Time
		var t *time.Timer
		if !deadline.IsZero() {
			t = time.NewTimer(time.Until(deadline))
			expired = t.C
		}
		var err error
		select {
		case <-swapped:
		case <-dlChanged:
		case <-r.done:
			err = net.ErrClosed
		case <-expired:
			err = os.ErrDeadlineExceeded
		}
		if t != nil {
			t.Stop()
		}
		if err != nil {
			return 0, nil, err
		}
	}
}

// WriteTo writes through the current allocation. With none, or when the
// write fails (a socket closed by a replacement, a server gone), the
// packet is lost, as on a path that is down: an error would end the QUIC
// transport over it, and with it every connection.
func (r *Renewing) WriteTo(b []byte, to net.Addr) (int, error) {
	if a := r.Current(); a != nil {
		if _, err := a.Conn.WriteTo(b, to); err != nil {
			r.log.Debug("relayed write lost", "relay", a.Server, "err", err)
		}
	}
	return len(b), nil
}

// ClientPort is the local port of the current allocation's socket to its
// server (0 for none, or over TCP): a peer's datagram to that port must
// not reach it.
func (r *Renewing) ClientPort() uint16 {
	a := r.Current()
	if a == nil {
		return 0
	}
	ac, ok := a.Conn.(*allocConn)
	if !ok {
		return 0
	}
	if ua, ok := ac.base.LocalAddr().(*net.UDPAddr); ok {
		return uint16(ua.Port)
	}
	return 0
}

// Close releases the allocation; reads and Run end. It is safe to call
// twice.
func (r *Renewing) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	close(r.done)
	a := r.cur
	r.mu.Unlock()
	if a != nil {
		return a.Conn.Close()
	}
	return nil
}

// LocalAddr is the current relayed address (0.0.0.0:0 with none).
func (r *Renewing) LocalAddr() net.Addr {
	if a := r.Current(); a != nil {
		return net.UDPAddrFromAddrPort(a.Addr)
	}
	return &net.UDPAddr{IP: net.IPv4zero}
}

func (r *Renewing) SetDeadline(t time.Time) error {
	r.SetWriteDeadline(t)
	return r.SetReadDeadline(t)
}

func (r *Renewing) SetReadDeadline(t time.Time) error {
	r.mu.Lock()
	r.deadline = t
	close(r.dlChanged) // a read waiting for an allocation looks again
	r.dlChanged = make(chan struct{})
	a := r.cur
	r.mu.Unlock()
	if a != nil {
		return a.Conn.SetReadDeadline(t)
	}
	return nil
}

func (r *Renewing) SetWriteDeadline(t time.Time) error {
	if a := r.Current(); a != nil {
		return a.Conn.SetWriteDeadline(t)
	}
	return nil
}

// held reports whether the server still holds the allocation, as far as
// it says: it asks for a permission to this party's own address, and a
// server that lost the allocation (one that restarted, on UDP, where
// nothing else tells) refuses it: 437, allocation mismatch (RFC 8656), or
// 400, bad request (coturn). Only a server that granted this allocation
// such a permission before is judged so, and any other answer, or none
// (pion's server does not answer a request without an allocation),
// counts as held: the checks of the mapping and the socket judge those.
// One request is under way at a time.
func (a *Allocation) held(ctx context.Context) bool {
	if a.client == nil || !a.mapped.IsValid() || !a.asking.CompareAndSwap(false, true) {
		return true
	}
	to := net.UDPAddrFromAddrPort(a.mapped)
	err, ok := answer(ctx, func() error {
		defer a.asking.Store(false)
		err := a.client.CreatePermission(to)
		var te *stun.TurnError
		if err != nil && !errors.As(err, &te) {
			err = a.client.CreatePermission(to) // a stale nonce, now renewed
		}
		return err
	})
	switch {
	case !ok:
		return true
	case err == nil:
		a.granted = true
		return true
	}
	var te *stun.TurnError
	return !a.granted || !errors.As(err, &te) ||
		(te.ErrorCodeAttr.Code != stun.CodeAllocMismatch && te.ErrorCodeAttr.Code != stun.CodeBadRequest)
}

// answer runs f, a pion transaction (which has no ctx: it ends when its
// retries do or the client closes), and waits checkTimeout at most for its
// result; ok is false when it did not come in time.
func answer[T any](ctx context.Context, f func() T) (res T, ok bool) {
	ch := make(chan T, 1)
	go func() { ch <- f() }()
	t := time.NewTimer(checkTimeout)
	defer t.Stop()
	select {
	case res = <-ch:
		return res, true
	case <-t.C:
	case <-ctx.Done():
	}
	return res, false
}

// check asks the server what address it sees this allocation's socket
// come from.
func (a *Allocation) check(ctx context.Context) (netip.AddrPort, error) {
	if a.client == nil {
		return netip.AddrPort{}, errors.New("no client")
	}
	type result struct {
		addr net.Addr
		err  error
	}
	res, ok := answer(ctx, func() result {
		addr, err := a.client.SendBindingRequest()
		return result{addr, err}
	})
	switch {
	case ctx.Err() != nil:
		return netip.AddrPort{}, ctx.Err()
	case !ok:
		return netip.AddrPort{}, errors.New("no answer to a binding check")
	case res.err != nil:
		return netip.AddrPort{}, res.err
	}
	ua, isUDP := res.addr.(*net.UDPAddr)
	if !isUDP {
		return netip.AddrPort{}, errors.New("binding answer is not a UDP address")
	}
	ap := ua.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}
