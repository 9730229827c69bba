// Package dgram carries UDP through the tunnel. A local client (a SOCKS5
// UDP ASSOCIATE, a UDP gateway) opens an Assoc and sends datagrams to a
// peer's port; each rides one QUIC datagram (RFC 9221) on the
// authenticated connection to that peer, framed by package frame. At the
// peer, the Carrier keeps one connected UDP socket on 127.0.0.1 per
// (peer, association, port), which is what the service there sees as its
// client; what the service sends back returns to the association, and
// only to it. A socket that carried nothing either way for Options.Idle
// is closed.
//
// The far end applies the same port policy as TCP (Options.Allow), and
// each peer has a budget of sockets here (Options.MaxPerPeer). Datagrams
// are as unreliable as UDP: one the path cannot carry whole (larger than
// a QUIC datagram, about 1,150 bytes on the smallest paths) is dropped,
// counted and logged, never cut.
package dgram

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/time/rate"

	"sfkit-proxy/dgram/frame"
	"sfkit-proxy/quietlog"
	"sfkit-proxy/status"
)

// Defaults of Options.
const (
	DefaultIdle       = 2 * time.Minute
	DefaultMaxPerPeer = 256
	// DefaultRate bounds the UDP bytes per second this party sends to one
	// peer (its associations' and its local ports' answers together):
	// quic-go sends datagrams before stream data, so UDP past it would
	// starve the peer's tunnelled TCP connections. Past it, datagrams are
	// dropped (over_rate).
	DefaultRate = 8 << 20
	// MaxDests bounds the (peer, port) destinations of one association.
	MaxDests = 256
	// readBuf is a far socket's read buffer: larger than any datagram a
	// QUIC datagram carries, so that a datagram filling it was too large
	// (and is dropped, not cut).
	readBuf = 2048
)

// Options configure a Carrier. Zero values are documented per field.
type Options struct {
	// Logger; nil discards.
	Logger *slog.Logger
	// Self is this party's id: an association's datagrams to it go to the
	// local port here, without the tunnel and whatever Allow says.
	Self int
	// Send carries the frame b to party pid (required): quicmux's
	// SendDatagram.
	Send func(pid int, b []byte) error
	// Allow says which local ports party pid may send to; nil allows none.
	Allow func(pid int, port uint16) bool
	// LocalHost is where peers' datagrams go; zero means 127.0.0.1.
	LocalHost netip.Addr
	// Idle closes a far socket that carried nothing either way this long;
	// zero means DefaultIdle.
	Idle time.Duration
	// MaxPerPeer bounds the far sockets one peer holds here; zero means
	// DefaultMaxPerPeer. Past it, its new associations are refused.
	MaxPerPeer int
	// Rate bounds the bytes per second sent to one peer; zero means
	// DefaultRate.
	Rate int
}

// Drop reasons, as status and metrics name them.
const (
	dropTooLarge   = iota // larger than the path carries
	dropNoPath            // no connection to the peer now
	dropNotAllowed        // to a port not open to the peer (here, or refused there)
	dropOverBudget        // the peer's far sockets are all in use
	dropUnknown           // for no association, or from a destination it never sent to
	dropBadFrame          // a frame that does not parse
	dropSendFailed        // the local socket or the connection refused it
	dropOverRate          // past the rate to its peer
	numDrops
)

var dropNames = [numDrops]string{"too_large", "no_path", "not_allowed", "over_budget", "unknown_association", "bad_frame", "send_failed", "over_rate"}

// DropReasons are the drop reasons, for metrics.
func DropReasons() []string { return dropNames[:] }

// Carrier carries associations' datagrams to peers and peers' datagrams to
// local ports. Close ends it.
type Carrier struct {
	opts  Options
	log   *slog.Logger
	quiet *quietlog.Log
	wg    sync.WaitGroup
	// refusals wait for sendRefusals; done ends it.
	refusals chan refusal
	done     chan struct{}

	sent, sentBytes         atomic.Uint64 // associations' datagrams to peers
	received, receivedBytes atomic.Uint64 // peers' answers to associations
	served, servedBytes     atomic.Uint64 // peers' datagrams to local ports
	answered, answeredBytes atomic.Uint64 // local ports' answers to peers
	dropped                 [numDrops]atomic.Uint64

	mu       sync.Mutex // guards near, far, perPeer and closed
	near     map[uint64]*Assoc
	far      map[farKey]*farSocket
	perPeer  map[int]int
	limiters sync.Map // pid → *rate.Limiter, per peer sent to (the send path takes no lock)
	closed   bool
}

// New returns a Carrier.
func New(opts Options) *Carrier {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if !opts.LocalHost.IsValid() {
		opts.LocalHost = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	if opts.Idle <= 0 {
		opts.Idle = DefaultIdle
	}
	if opts.MaxPerPeer <= 0 {
		opts.MaxPerPeer = DefaultMaxPerPeer
	}
	if opts.Rate <= 0 {
		opts.Rate = DefaultRate
	}
	log := opts.Logger.With("component", "udp")
	c := &Carrier{opts: opts, log: log, quiet: quietlog.New(log, time.Minute), refusals: make(chan refusal, 64), done: make(chan struct{}),
		near: make(map[uint64]*Assoc), far: make(map[farKey]*farSocket), perPeer: make(map[int]int)}
	c.wg.Go(c.sendRefusals)
	return c
}

// Errors of Assoc.Send.
var (
	ErrClosed       = errors.New("udp association closed")
	ErrTooManyDests = fmt.Errorf("an association sends to at most %d peer ports", MaxDests)
	ErrBadPort      = errors.New("port 0")
)

// Close closes every far socket and association, and waits for them. It
// is safe to call twice; an Open after it fails with ErrClosed.
func (c *Carrier) Close() {
	c.mu.Lock()
	if !c.closed {
		close(c.done)
	}
	c.closed = true
	fs, as := slices.Collect(maps.Values(c.far)), slices.Collect(maps.Values(c.near))
	c.mu.Unlock()
	for _, f := range fs {
		f.conn.Close()
	}
	for _, a := range as {
		a.Close()
	}
	c.wg.Wait()
}

// dest is where an association sent.
type dest struct {
	pid  int
	port uint16
}

// Assoc is a local client's association: its datagrams to peers' ports,
// and their answers to recv.
type Assoc struct {
	c    *Carrier
	id   uint64
	recv func(pid int, port uint16, data []byte)

	mu     sync.Mutex // guards dests and closed
	dests  map[dest]struct{}
	closed bool
}

// Open starts an association whose answers go to recv. recv is called on
// the connection's receive loop: it must not block (a UDP write does not).
func (c *Carrier) Open(recv func(pid int, port uint16, data []byte)) (*Assoc, error) {
	a := &Assoc{c: c, recv: recv, dests: make(map[dest]struct{})}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	for {
		var b [8]byte
		rand.Read(b[:])
		if a.id = binary.BigEndian.Uint64(b[:]); a.id != 0 && c.near[a.id] == nil {
			break
		}
	}
	c.near[a.id] = a
	return a, nil
}

// Close ends the association: answers after it are dropped, and each
// destination is told (KindClose), so that its socket there closes at
// once, not when idle. It is safe to call twice.
func (a *Assoc) Close() {
	a.mu.Lock()
	was := a.closed
	a.closed = true
	dests := slices.Collect(maps.Keys(a.dests))
	a.mu.Unlock()
	a.c.mu.Lock()
	delete(a.c.near, a.id)
	a.c.mu.Unlock()
	if was {
		return
	}
	for _, d := range dests {
		a.c.send(d.pid, frame.Append(nil, frame.Frame{Kind: frame.KindClose, Assoc: a.id, Port: d.port}))
	}
}

// Send sends data to port at party pid. Like UDP, a nil error does not
// mean it arrived; an error means it was not sent, and why.
func (a *Assoc) Send(pid int, port uint16, data []byte) error {
	if port == 0 {
		return ErrBadPort
	}
	d := dest{pid, port}
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return ErrClosed
	}
	if _, ok := a.dests[d]; !ok {
		if len(a.dests) >= MaxDests {
			a.mu.Unlock()
			return ErrTooManyDests
		}
		a.dests[d] = struct{}{}
	}
	a.mu.Unlock()
	c := a.c
	b := frame.Append(make([]byte, 0, frame.HeaderLen+len(data)), frame.Frame{Kind: frame.KindTo, Assoc: a.id, Port: port, Data: data})
	if err := c.send(pid, b); err != nil {
		return err
	}
	c.sent.Add(1)
	c.sentBytes.Add(uint64(len(data)))
	return nil
}

// sent reports whether the association sent to port at pid.
func (a *Assoc) sentTo(pid int, port uint16) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.dests[dest{pid, port}]
	return ok && !a.closed
}

// send carries frame b to pid, the tunnel or (to Self) straight to
// Receive, and counts a failure.
func (c *Carrier) send(pid int, b []byte) error {
	if pid == c.opts.Self {
		c.Receive(pid, b)
		return nil
	}
	if !c.limiter(pid).AllowN(time.Now(), len(b)) {
		c.dropped[dropOverRate].Add(1)
		c.quiet.Warn("rate:"+strconv.Itoa(pid), "UDP to a peer is over its rate: datagrams dropped (the tunnel's TCP connections to it come first)",
			"peer", pid, "bytes_per_second", c.opts.Rate)
		return errOverRate
	}
	err := c.opts.Send(pid, b)
	if err == nil {
		return nil
	}
	var big *quic.DatagramTooLargeError
	switch {
	case errors.As(err, &big):
		c.dropped[dropTooLarge].Add(1)
		most := int(big.MaxDatagramPayloadSize) - frame.HeaderLen
		c.quiet.Warn("large:"+strconv.Itoa(pid), "a UDP datagram is larger than the path to the peer carries: dropped (keep datagrams to 1,150 bytes or less)",
			"peer", pid, "bytes", len(b)-frame.HeaderLen, "at_most", most)
		return fmt.Errorf("udp datagram of %d bytes to party %d: the path carries at most %d: %w", len(b)-frame.HeaderLen, pid, most, err)
	case errors.Is(err, errNoPath):
		c.dropped[dropNoPath].Add(1)
	default:
		c.dropped[dropSendFailed].Add(1)
	}
	c.quiet.Warn("send:"+strconv.Itoa(pid), "a UDP datagram to a peer was dropped", "peer", pid, "err", err)
	return err
}

// limiter is the rate of what is sent to pid.
func (c *Carrier) limiter(pid int) *rate.Limiter {
	if l, ok := c.limiters.Load(pid); ok {
		return l.(*rate.Limiter)
	}
	l, _ := c.limiters.LoadOrStore(pid, rate.NewLimiter(rate.Limit(c.opts.Rate), max(c.opts.Rate/8, 64<<10)))
	return l.(*rate.Limiter)
}

var errOverRate = errors.New("udp to the peer is over its rate")

// errNoPath is what the Send of Options returns, wrapped, when there is
// no path to the peer; the sidecar maps quicmux.ErrNoPath to it.
var errNoPath = errors.New("no path")

// ErrNoPath wraps err as the error of no path to the peer (for counting).
func ErrNoPath(err error) error { return fmt.Errorf("%w: %w", errNoPath, err) }

// Receive takes a frame from party pid (quicmux's Options.Datagram).
func (c *Carrier) Receive(pid int, b []byte) {
	f, err := frame.Parse(b)
	if err != nil {
		c.dropped[dropBadFrame].Add(1)
		c.quiet.Warn("frame:"+strconv.Itoa(pid), "a peer sent a UDP frame that does not parse: dropped", "peer", pid, "err", err)
		return
	}
	switch f.Kind {
	case frame.KindTo:
		c.toLocal(pid, f)
	case frame.KindClose:
		c.mu.Lock()
		fs := c.far[farKey{pid, f.Assoc, f.Port}]
		c.mu.Unlock()
		if fs != nil {
			fs.conn.Close() // serveFar forgets it
		}
	case frame.KindBack, frame.KindRefused:
		c.mu.Lock()
		a := c.near[f.Assoc]
		c.mu.Unlock()
		if a == nil || !a.sentTo(pid, f.Port) {
			// Late (the association closed), or a peer guessing: either
			// way not for anyone here.
			c.dropped[dropUnknown].Add(1)
			return
		}
		if f.Kind == frame.KindRefused {
			why := "the port is not open to this party (its --allow-ports)"
			reason := dropNotAllowed
			if f.Data[0] == frame.RefusedOverBudget {
				why, reason = "this party holds as many UDP associations there as it may", dropOverBudget
			}
			c.dropped[reason].Add(1)
			c.quiet.Warn("refused:"+strconv.Itoa(pid)+":"+strconv.Itoa(int(f.Port)), "a peer refuses UDP datagrams to its port", "peer", pid, "port", f.Port, "why", why)
			return
		}
		c.received.Add(1)
		c.receivedBytes.Add(uint64(len(f.Data)))
		a.recv(pid, f.Port, f.Data)
	}
}

// farKey names a far socket.
type farKey struct {
	pid   int
	assoc uint64
	port  uint16
}

// farSocket is a peer association's socket to a local port.
type farSocket struct {
	key  farKey
	conn *net.UDPConn
	last atomic.Int64 // unix nanoseconds of the last datagram either way
}

func (f *farSocket) touch() { f.last.Store(time.Now().UnixNano()) }

// toLocal delivers a peer's datagram to the local port it names, through
// the association's socket, opened on its first datagram if the policy and
// the peer's budget allow.
func (c *Carrier) toLocal(pid int, f frame.Frame) {
	k := farKey{pid, f.Assoc, f.Port}
	c.mu.Lock()
	fs := c.far[k]
	c.mu.Unlock()
	if fs == nil {
		var reason byte
		if fs, reason = c.openFar(k); fs == nil {
			if reason != 0 {
				c.refuse(k, reason)
			}
			return
		}
	}
	fs.touch()
	if _, err := fs.conn.Write(f.Data); err != nil {
		c.dropped[dropSendFailed].Add(1)
		c.log.Debug("udp write to a local port failed", "peer", pid, "port", f.Port, "err", err)
		return
	}
	c.served.Add(1)
	c.servedBytes.Add(uint64(len(f.Data)))
}

// openFar opens the socket of k when the policy and the peer's budget
// allow it, and starts its reader; else it returns the refusal's reason
// (zero when there is nothing to answer: closing, or the socket failed).
func (c *Carrier) openFar(k farKey) (*farSocket, byte) {
	if k.pid != c.opts.Self && (c.opts.Allow == nil || !c.opts.Allow(k.pid, k.port)) {
		c.dropped[dropNotAllowed].Add(1)
		c.quiet.Warn("allow:"+strconv.Itoa(k.pid)+":"+strconv.Itoa(int(k.port)), "a peer sent UDP to a port that --allow-ports does not open to it: refused",
			"peer", k.pid, "port", k.port)
		return nil, frame.RefusedNotAllowed
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, 0
	}
	if c.perPeer[k.pid] >= c.opts.MaxPerPeer {
		c.mu.Unlock()
		c.dropped[dropOverBudget].Add(1)
		c.quiet.Warn("budget:"+strconv.Itoa(k.pid), "refusing a UDP association: the peer has spent its budget of sockets here",
			"peer", k.pid, "limit", c.opts.MaxPerPeer)
		return nil, frame.RefusedOverBudget
	}
	c.perPeer[k.pid]++ // held while the socket opens
	c.mu.Unlock()
	conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(c.opts.LocalHost, k.port)))
	c.mu.Lock()
	defer c.mu.Unlock()
	if other := c.far[k]; err != nil || other != nil || c.closed {
		c.perPeer[k.pid]--
		if err != nil {
			c.dropped[dropSendFailed].Add(1)
			c.log.Warn("could not open a UDP socket for a peer", "peer", k.pid, "port", k.port, "err", err)
		} else {
			conn.Close()
		}
		return other, 0 // another datagram of k opened it first
	}
	fs := &farSocket{key: k, conn: conn}
	fs.touch()
	c.far[k] = fs
	c.wg.Go(func() { c.serveFar(fs) })
	return fs, 0
}

// refusal is a refusal to send.
type refusal struct {
	key    farKey
	reason byte
}

// refuse tells the peer of k, and only it, that its association to k's
// port is refused: through sendRefusals, since a send may wait for the
// connection and this runs on its receive loop. Past a backlog, refusals
// are not sent (the datagrams are dropped all the same).
func (c *Carrier) refuse(k farKey, reason byte) {
	select {
	case c.refusals <- refusal{k, reason}:
	default:
	}
}

// sendRefusals sends the queued refusals until Close.
func (c *Carrier) sendRefusals() {
	for {
		select {
		case <-c.done:
			return
		case r := <-c.refusals:
			c.send(r.key.pid, frame.Append(nil, frame.Frame{Kind: frame.KindRefused, Assoc: r.key.assoc, Port: r.key.port, Data: []byte{r.reason}}))
		}
	}
}

// serveFar carries what the local port sends back on fs to the peer's
// association, until fs idles past Options.Idle or closes.
func (c *Carrier) serveFar(fs *farSocket) {
	defer func() {
		fs.conn.Close()
		c.mu.Lock()
		if c.far[fs.key] == fs {
			delete(c.far, fs.key)
			c.perPeer[fs.key.pid]--
			if c.perPeer[fs.key.pid] <= 0 {
				delete(c.perPeer, fs.key.pid)
			}
		}
		c.mu.Unlock()
	}()
	buf := make([]byte, frame.HeaderLen+readBuf)
	hdr := frame.Append(nil, frame.Frame{Kind: frame.KindBack, Assoc: fs.key.assoc, Port: fs.key.port})
	copy(buf, hdr)
	for {
		last := time.Unix(0, fs.last.Load())
		if time.Since(last) >= c.opts.Idle {
			return
		}
		fs.conn.SetReadDeadline(last.Add(c.opts.Idle))
		n, err := fs.conn.Read(buf[frame.HeaderLen:])
		if err != nil {
			var ne net.Error
			switch {
			case errors.As(err, &ne) && ne.Timeout():
				continue // idle, or touched since: the loop's head says
			case errors.Is(err, syscall.ECONNREFUSED):
				continue // nothing listens there (yet): UDP says no more
			}
			return
		}
		if n == readBuf {
			c.dropped[dropTooLarge].Add(1)
			continue
		}
		fs.touch()
		if c.send(fs.key.pid, buf[:frame.HeaderLen+n]) == nil {
			c.answered.Add(1)
			c.answeredBytes.Add(uint64(n))
		}
	}
}

// UpdateStatus fills the status's UDP part.
func (c *Carrier) UpdateStatus(s *status.Status) {
	c.mu.Lock()
	u := status.UDP{Associations: len(c.near), PeerSockets: len(c.far)}
	c.mu.Unlock()
	u.Sent, u.SentBytes = c.sent.Load(), c.sentBytes.Load()
	u.Received, u.ReceivedBytes = c.received.Load(), c.receivedBytes.Load()
	u.Served, u.ServedBytes = c.served.Load(), c.servedBytes.Load()
	u.Answered, u.AnsweredBytes = c.answered.Load(), c.answeredBytes.Load()
	u.Dropped = map[string]uint64{}
	for i, n := range dropNames {
		if v := c.dropped[i].Load(); v > 0 {
			u.Dropped[n] = v
		}
	}
	s.UDP = u
}
