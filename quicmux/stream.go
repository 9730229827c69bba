package quicmux

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/backoff"
	"sfkit-proxy/flow"
)

// Errors of Dial.
var (
	ErrUnknownPeer = errors.New("party is not in the registry")
	ErrNoPath      = errors.New("no path to party yet")
	// ErrTooManyConns carries "refused" in its text, so that go-socks5
	// answers "connection refused" at once.
	ErrTooManyConns = errors.New("too many open tunnelled connections to this party: connection refused until some close")
)

// Dial opens a tunnelled TCP connection (a flow) to port on party pid's
// loopback. It waits, within ctx, for the party to register and for a path
// to it. The error of a refused or disallowed port says so. The flow
// outlives the QUIC connection it starts on: when that dies, Dial's side
// resumes it on the next one (see package flow).
func (m *Mux) Dial(ctx context.Context, pid int, port uint16) (*flow.Conn, error) {
	id := rand.Uint64()
	str, l, kind, reply, err := m.open(ctx, pid, Request{Kind: KindConnect, Port: port, Flow: id})
	if err != nil {
		return nil, err
	}
	if err := reply.Err(); err != nil {
		return nil, fmt.Errorf("party %d port %d: %w", pid, port, err)
	}
	l.tr.opened.Add(1)
	log := m.log.With("peer", pid, "port", port, "dir", "out", "path", kind)
	e := m.newFlow(flowKey{pid: pid, mine: true, id: id}, port, l, log, nil)
	if e == nil { // one in 2^64: our random id is one we use already
		endStream(str)
		return nil, fmt.Errorf("party %d port %d: flow id in use, try again", pid, port)
	}
	e.c.Attach(m.flowStream(str, l), 0)
	e.attached()
	log.Info("tunnel opened")
	m.poolChanged(pid)
	return e.c, nil
}

// Ping measures the round trip of a request through the tunnel to pid, and
// names the path it took.
func (m *Mux) Ping(ctx context.Context, pid int) (rtt time.Duration, path string, addr netip.AddrPort, err error) {
	start := time.Now()
	str, l, kind, reply, err := m.open(ctx, pid, Request{Kind: KindPing})
	if err != nil {
		return 0, "", netip.AddrPort{}, err
	}
	rtt = time.Since(start)
	if err := reply.Err(); err != nil {
		return 0, "", netip.AddrPort{}, err // no stream: it was refused
	}
	endStream(str)
	return rtt, kind, l.remote, nil
}

// open opens a stream with request r to pid and reads the peer's reply. A
// connection may die under us (the peer restarted, the path broke); nothing
// has reached the client yet, so opening again is safe.
func (m *Mux) open(ctx context.Context, pid int, r Request) (*quic.Stream, *link, string, Reply, error) {
	for attempt := 0; ; attempt++ {
		p, l, err := m.waitLink(ctx, pid)
		if err != nil {
			return nil, nil, "", Reply{}, err
		}
		str, reply, err := openStream(ctx, l.conn, r)
		if err == nil && reply.Status == StatusDraining && attempt < 2 {
			// The peer replaced this connection a moment before we did:
			// open on the newer one once we have it.
			m.waitReplaced(ctx, p, l)
			continue
		}
		if err == nil {
			return str, l, m.linkKind(p, l), reply, nil
		}
		if errors.Is(err, ErrTooManyConns) {
			m.quiet.warn("streams:"+strconv.Itoa(pid), "refusing a tunnelled connection: the peer's limit of open connections is reached",
				"peer", pid, "port", r.Port, "limit", m.opts.MaxStreams)
			return nil, nil, "", Reply{}, fmt.Errorf("party %d port %d: %w", pid, r.Port, err)
		}
		if !connectionDead(l.conn, err) || ctx.Err() != nil || attempt == 2 {
			return nil, nil, "", Reply{}, fmt.Errorf("party %d port %d: %w", pid, r.Port, err)
		}
		m.dropLink(p, l, err, evLost)
	}
}

// waitReplaced waits, within ctx and a second, for l to stop being one of
// p's current connections.
func (m *Mux) waitReplaced(ctx context.Context, p *peer, l *link) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	for {
		m.mu.Lock()
		current := slices.Contains(m.linksLocked(p), l)
		changed := m.changed
		m.mu.Unlock()
		if !current {
			return
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}

// connectionDead reports whether err, from a stream of conn, means the
// connection itself is gone (closed, timed out, reset), not just the stream.
// The connection's context may be cancelled only a moment after.
func connectionDead(conn *quic.Conn, err error) bool {
	var (
		app   *quic.ApplicationError
		idle  *quic.IdleTimeoutError
		reset *quic.StatelessResetError
		trans *quic.TransportError
	)
	return conn.Context().Err() != nil || errors.As(err, &app) || errors.As(err, &idle) ||
		errors.As(err, &reset) || errors.As(err, &trans)
}

// openStream opens a stream and exchanges the request and reply. It does
// not wait for the peer to allow more streams: past the limit it fails at
// once with ErrTooManyConns. A reply other than OK closes the stream.
func openStream(ctx context.Context, conn *quic.Conn, r Request) (*quic.Stream, Reply, error) {
	str, err := conn.OpenStream()
	if err != nil {
		if _, ok := errors.AsType[*quic.StreamLimitReachedError](err); ok {
			return nil, Reply{}, ErrTooManyConns
		}
		return nil, Reply{}, fmt.Errorf("open stream: %w", err)
	}
	if dl, ok := ctx.Deadline(); ok {
		str.SetDeadline(dl)
	}
	// A caller that gives up ends the stream, and so the peer's work on it
	// (a wait for a local listener).
	stop := context.AfterFunc(ctx, func() {
		str.CancelRead(codeStreamAbort)
		str.CancelWrite(codeStreamAbort)
	})
	var hdr [replyLen]byte
	var reply Reply
	_, err = str.Write(r.Append(nil))
	if err == nil {
		_, err = io.ReadFull(str, hdr[:])
	}
	if !stop() {
		err = ctx.Err() // the stream is cancelled, whatever it answered
	}
	if err == nil {
		reply, err = ParseReply(hdr[:])
	}
	if err != nil || reply.Status != StatusOK {
		str.CancelRead(codeStreamAbort)
		str.CancelWrite(codeStreamAbort)
		return nil, reply, err
	}
	str.SetDeadline(time.Time{})
	return str, reply, nil
}

// endStream ends a stream that carried only a request and a reply.
func endStream(str *quic.Stream) {
	str.Close()
	str.CancelRead(codeStreamAbort)
}

// waitLink returns a connection to pid, waiting for one within ctx: of
// its pool, the one carrying fewest of our flows.
func (m *Mux) waitLink(ctx context.Context, pid int) (*peer, *link, error) {
	for {
		m.mu.Lock()
		p := m.peers[pid]
		var l *link
		if p != nil {
			l = m.pickLocked(p)
		}
		changed := m.changed
		m.mu.Unlock()
		if l != nil {
			return p, l, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			if p == nil {
				return nil, nil, fmt.Errorf("party %d: %w", pid, ErrUnknownPeer)
			}
			m.mu.Lock()
			lastErr := p.lastErr
			m.mu.Unlock()
			if lastErr != "" {
				return nil, nil, fmt.Errorf("party %d: %w (last error: %s)", pid, ErrNoPath, lastErr)
			}
			return nil, nil, fmt.Errorf("party %d: %w", pid, ErrNoPath)
		}
	}
}

// serveStreams accepts the streams a peer opens on l until it closes.
func (m *Mux) serveStreams(ctx context.Context, pid int, l *link) {
	for {
		str, err := l.conn.AcceptStream(ctx)
		if err != nil {
			return
		}
		m.wg.Go(func() { m.serveStream(ctx, pid, str, l) })
	}
}

// serveStream reads a stream's header and does what it asks: a new flow
// to an allowed local port, a flow resumed, a ping, a path notice, a hello.
func (m *Mux) serveStream(ctx context.Context, pid int, str *quic.Stream, l *link) {
	log := m.log.With("peer", pid)
	str.SetReadDeadline(time.Now().Add(10 * time.Second))
	var hdr [requestLen]byte
	if _, err := io.ReadFull(str, hdr[:]); err != nil {
		log.Debug("stream header not read", "err", err)
		str.CancelRead(codeStreamAbort)
		str.CancelWrite(codeStreamAbort)
		return
	}
	str.SetReadDeadline(time.Time{})
	reply := func(r Reply) error {
		_, err := str.Write(r.Append(nil))
		if r.Status != StatusOK {
			endStream(str)
		}
		return err
	}
	req, err := ParseRequest(hdr[:])
	switch {
	case err != nil:
		log.Warn("peer sent a bad stream header", "err", err)
		reply(Reply{Status: StatusBadRequest})
		return
	case req.Kind == KindPing:
		reply(Reply{})
		endStream(str)
		return
	case req.Kind == KindPathNotice:
		if !l.direct.Swap(true) {
			log.Info("path switched", "from", PathRelayed, "to", PathDirect, "by", "peer")
		}
		reply(Reply{})
		endStream(str)
		return
	case req.Kind == KindHello:
		m.hello(pid, req.Flow, l)
		reply(Reply{Rcvd: m.boot})
		endStream(str)
		return
	case req.Kind == KindResume:
		m.resumed(pid, req, str, l, log)
		return
	case m.opts.OwnPort(req.Port):
		m.quiet.warn("own:"+strconv.Itoa(pid), "peer asked for one of this sidecar's own ports (SOCKS, management API or a forward): refused",
			"peer", pid, "port", req.Port)
		reply(Reply{Status: StatusNotAllowed})
		return
	case !m.opts.AllowPort(pid, req.Port):
		log.Warn("peer asked for a port that --allow-ports does not allow", "port", req.Port)
		reply(Reply{Status: StatusNotAllowed})
		return
	case l.draining.Load():
		// A replaced connection only carries its flows to their end.
		reply(Reply{Status: StatusDraining})
		return
	}
	key := flowKey{pid: pid, id: req.Flow}
	p, fresh := m.takeFlow(key)
	if !fresh {
		log.Warn("peer opened a flow with the id of one it already has: refused", "flow", req.Flow)
		reply(Reply{Status: StatusBadRequest})
		return
	}
	if p == nil {
		m.quiet.warn("flows:"+strconv.Itoa(pid), "refusing a tunnelled connection: the peer has spent its budget of open connections here",
			"peer", pid, "port", req.Port, "limit", m.opts.MaxFlows)
		reply(Reply{Status: StatusOverBudget})
		return
	}
	tcp, err := m.dialLocal(ctx, p, str, req.Port, log)
	if err != nil {
		m.giveFlow(p)
		st := StatusUnreachable
		switch {
		case errors.Is(err, ErrOverBudget):
			st = StatusOverBudget
		case errors.Is(err, syscall.ECONNREFUSED):
			st = StatusRefused
		}
		log.Info("local port not reachable for peer", "port", req.Port, "err", err)
		reply(Reply{Status: st})
		return
	}
	// The flow is registered before the reply: the opener may move it to
	// another connection of the pool at once, and its resume may overtake
	// this stream (it waits for the attachment below).
	e := m.newFlow(key, req.Port, l, log.With("port", req.Port, "dir", "in"), p)
	if e == nil {
		tcp.Close()
		m.giveFlow(p)
		reply(Reply{Status: StatusBadRequest})
		return
	}
	if err := reply(Reply{}); err != nil {
		tcp.Close()
		e.attached()
		e.abandon(ResetPeerLostFlow)
		return
	}
	l.tr.opened.Add(1)
	e.c.Attach(m.flowStream(str, l), 0)
	e.attached()
	e.log.Info("tunnel opened")
	m.poolChanged(pid)
	pipe(tcp, e.c)
}

// dialLocal connects to the local port a peer asked for. A port that waits
// for its listener (Options.WaitPort) and finds none is dialled again, with
// backoff, until something listens, LocalWait passes, or the peer gives up
// on str; a peer has at most MaxWaiting such waits at once.
func (m *Mux) dialLocal(ctx context.Context, p *peer, str *quic.Stream, port uint16, log *slog.Logger) (*net.TCPConn, error) {
	// Loopback needs no TCP keepalive: skipping it saves syscalls per connection.
	d := net.Dialer{Timeout: 5 * time.Second, KeepAlive: -1}
	addr := netip.AddrPortFrom(m.opts.LocalHost, port).String()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err == nil {
		return c.(*net.TCPConn), nil
	}
	if !errors.Is(err, syscall.ECONNREFUSED) || !m.opts.WaitPort(p.pid, port) {
		return nil, err
	}
	if !m.startWaiting(p) {
		m.quiet.warn("waiting:"+strconv.Itoa(p.pid), "refusing a connection that would wait for a local listener: the peer has too many waiting",
			"peer", p.pid, "port", port, "limit", m.opts.MaxWaiting)
		return nil, ErrOverBudget
	}
	defer m.stopWaiting(p)
	// The wait ends with the peer's interest: its give-up cancels str.
	wctx, cancel := context.WithTimeout(ctx, m.opts.LocalWait)
	defer cancel()
	defer context.AfterFunc(str.Context(), cancel)()
	start := time.Now()
	log.Info("local port not listening yet: waiting for it", "port", port, "up_to", m.opts.LocalWait)
	bo := backoff.Backoff{Min: 20 * time.Millisecond, Max: 500 * time.Millisecond}
	for bo.Wait(wctx) == nil {
		c, err := d.DialContext(wctx, "tcp", addr)
		if err == nil {
			log.Info("local port listening: connected", "port", port, "waited", time.Since(start).Round(time.Millisecond))
			return c.(*net.TCPConn), nil
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, err
		}
	}
	if str.Context().Err() != nil {
		log.Info("peer gave up waiting for the local port", "port", port, "waited", time.Since(start).Round(time.Millisecond))
	} else {
		log.Info("local port never listened: refusing", "port", port, "waited", time.Since(start).Round(time.Millisecond))
	}
	return nil, fmt.Errorf("dial %s: %w", addr, syscall.ECONNREFUSED)
}

// startWaiting counts a connection of p's waiting for a local listener,
// if its budget allows.
func (m *Mux) startWaiting(p *peer) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if p.waiting >= m.opts.MaxWaiting {
		return false
	}
	p.waiting++
	return true
}

func (m *Mux) stopWaiting(p *peer) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p.waiting--
}

// takeFlow counts a new flow key that its peer opens here and returns the
// peer, if its budget allows; nil otherwise. giveFlow gives it back when it
// ends. fresh is false when the peer has, or had, a flow of that id: a new
// one would take the other's place.
func (m *Mux) takeFlow(key flowKey) (p *peer, fresh bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ended := m.tombLocked(key); ended || m.flows[key.pid][key] != nil {
		return nil, false
	}
	p = m.peers[key.pid]
	if p == nil || p.inFlows >= m.opts.MaxFlows {
		return nil, true
	}
	p.inFlows++
	return p, true
}

func (m *Mux) giveFlow(p *peer) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p.inFlows--
}

// logClosed logs a flow's end.
func logClosed(log *slog.Logger, start time.Time, sent, recv uint64, reset bool) {
	outcome := "ok"
	if reset {
		outcome = "reset"
	}
	log.Info("tunnel closed", "sent", sent, "received", recv, "duration", time.Since(start).Round(time.Millisecond), "outcome", outcome)
}

// pipe copies between a local TCP connection and a flow until both
// directions end. A clean end (EOF) is passed on as a half-close; an error
// resets the other side.
func pipe(tcp *net.TCPConn, fc *flow.Conn) {
	var wg sync.WaitGroup
	wg.Go(func() {
		if _, err := fc.ReadFrom(tcp); err != nil {
			fc.Reset()
			tcp.CloseRead()
			return
		}
		fc.CloseWrite()
	})
	if _, err := fc.WriteTo(tcp); err != nil {
		tcp.SetLinger(0)
		tcp.Close() // resets the local side; unblocks the other copy
		fc.Reset()
	} else {
		tcp.CloseWrite()
	}
	wg.Wait()
	tcp.Close()
	fc.Close()
}
