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
	"syscall"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/backoff"
	"sfkit-proxy/flow"
	"sfkit-proxy/quicmux/header"
	"sfkit-proxy/splice"
)

// Errors of Dial.
var (
	ErrUnknownPeer = errors.New("party is not in the registry")
	ErrNoPath      = errors.New("no path to party yet")
	// ErrTooManyConns is a refusal (header.Refusal): this side holds the
	// peer's limit of open streams.
	ErrTooManyConns error = header.Refusal("too many open tunnelled connections to this party; new ones are refused until some close")
)

// Dial opens a tunnelled TCP connection (a flow) to port on party pid's
// loopback. It waits, within ctx, for the party to register and for a path
// to it. The error of a refused or disallowed port says so. The flow
// outlives the QUIC connection it starts on: when that dies, Dial's side
// resumes it on the next one (see package flow).
func (m *Mux) Dial(ctx context.Context, pid int, port uint16) (*flow.Conn, error) {
	id := rand.Uint64()
	str, l, kind, reply, err := m.open(ctx, pid, header.Request{Kind: header.KindConnect, Port: port, Flow: id})
	if err != nil {
		return nil, err
	}
	if err := reply.Err(); err != nil {
		return nil, fmt.Errorf("party %d port %d: %w", pid, port, err)
	}
	l.tr.opened.Add(1)
	log := m.log.With("peer", pid, "port", port, "dir", "out", "path", kind)
	e := m.newFlow(flowKey{pid: pid, mine: true, id: id}, port, l, log)
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
// names the path it took: its kind, and where it goes (the peer's address,
// a TURN relay's, or "peer R" for a session through party R, whose inner
// connection has no address of its own).
func (m *Mux) Ping(ctx context.Context, pid int) (rtt time.Duration, path PathKind, where string, err error) {
	start := time.Now()
	str, l, kind, reply, err := m.open(ctx, pid, header.Request{Kind: header.KindPing})
	if err != nil {
		return 0, PathNone, "", err
	}
	rtt = time.Since(start)
	if err := reply.Err(); err != nil {
		return 0, PathNone, "", err // no stream: it was refused
	}
	endStream(str)
	where = l.remote.String()
	if s := l.ep.session; s != nil {
		where = s.where()
	}
	return rtt, kind, where, nil
}

// open opens a stream with request r to pid and reads the peer's reply. A
// connection may die under us (the peer restarted, the path broke); nothing
// has reached the client yet, so opening again is safe.
func (m *Mux) open(ctx context.Context, pid int, r header.Request) (*quic.Stream, *link, PathKind, header.Reply, error) {
	for attempt := 0; ; attempt++ {
		p, l, err := m.waitLink(ctx, pid)
		if err != nil {
			return nil, nil, PathNone, header.Reply{}, err
		}
		str, reply, err := openStream(ctx, l.conn, r)
		if err == nil && reply.Status == header.StatusDraining && attempt < 2 {
			// The peer replaced this connection a moment before we did:
			// open on the newer one once we have it.
			p.waitReplaced(ctx, l)
			continue
		}
		if err == nil {
			return str, l, p.kindOf(l), reply, nil
		}
		if errors.Is(err, ErrTooManyConns) {
			m.quiet.Warn("streams:"+strconv.Itoa(pid), "refusing a tunnelled connection: the peer's limit of open connections is reached",
				"peer", pid, "port", r.Port, "limit", m.opts.MaxStreams)
			return nil, nil, PathNone, header.Reply{}, fmt.Errorf("party %d port %d: %w", pid, r.Port, err)
		}
		if !connectionDead(l.conn, err) || ctx.Err() != nil || attempt == 2 {
			return nil, nil, PathNone, header.Reply{}, fmt.Errorf("party %d port %d: %w", pid, r.Port, err)
		}
		p.dropLink(l, err, evLost)
	}
}

// waitReplaced waits, within ctx and a second, for l to stop being one of
// p's current connections.
func (p *peer) waitReplaced(ctx context.Context, l *link) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	for {
		changed := p.m.changed.wait()
		p.mu.Lock()
		current := slices.Contains(p.pool.live(), l)
		p.mu.Unlock()
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
// once with ErrTooManyConns. A reply other than OK closes the stream. The
// trailer, if any, follows the request (a KindRelayVia's Route).
func openStream(ctx context.Context, conn *quic.Conn, r header.Request, trailer ...byte) (*quic.Stream, header.Reply, error) {
	str, err := conn.OpenStream()
	if err != nil {
		if _, ok := errors.AsType[*quic.StreamLimitReachedError](err); ok {
			return nil, header.Reply{}, ErrTooManyConns
		}
		return nil, header.Reply{}, fmt.Errorf("open stream: %w", err)
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
	var hdr [header.ReplyLen]byte
	var reply header.Reply
	_, err = str.Write(append(r.Append(nil), trailer...))
	if err == nil {
		_, err = io.ReadFull(str, hdr[:])
	}
	if !stop() {
		err = ctx.Err() // the stream is cancelled, whatever it answered
	}
	if err == nil {
		reply, err = header.ParseReply(hdr[:])
	}
	if err != nil || reply.Status != header.StatusOK {
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
		changed := m.changed.wait()
		p := m.peer(pid)
		var l *link
		if p != nil {
			p.mu.Lock()
			l = p.pickLocked()
			p.mu.Unlock()
		}
		if l != nil {
			return p, l, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			if p == nil {
				return nil, nil, fmt.Errorf("party %d: %w", pid, ErrUnknownPeer)
			}
			p.mu.Lock()
			lastErr := p.lastErr
			p.mu.Unlock()
			if lastErr != nil {
				return nil, nil, fmt.Errorf("party %d: %w (last error: %v)", pid, ErrNoPath, lastErr)
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
	var hdr [header.RequestLen]byte
	if _, err := io.ReadFull(str, hdr[:]); err != nil {
		log.Debug("stream header not read", "err", err)
		str.CancelRead(codeStreamAbort)
		str.CancelWrite(codeStreamAbort)
		return
	}
	str.SetReadDeadline(time.Time{})
	reply := func(r header.Reply) error {
		_, err := str.Write(r.Append(nil))
		if r.Status != header.StatusOK {
			endStream(str)
		}
		return err
	}
	req, err := header.ParseRequest(hdr[:])
	switch {
	case err != nil:
		log.Warn("peer sent a bad stream header", "err", err)
		reply(header.Reply{Status: header.StatusBadRequest})
		return
	case req.Kind == header.KindPing:
		reply(header.Reply{})
		endStream(str)
		return
	case req.Kind == header.KindPathNotice:
		if !l.direct.Load() {
			if p := m.peer(pid); p != nil {
				p.switched(l)
			}
			log.Info("path switched", "from", PathRelayed, "to", PathDirect, "by", "peer")
		}
		reply(header.Reply{})
		endStream(str)
		return
	case req.Kind == header.KindHello:
		if p := m.peer(pid); p != nil {
			p.hello(req.Flow, l)
		}
		reply(header.Reply{Rcvd: m.boot})
		endStream(str)
		return
	case req.Kind == header.KindResume:
		m.resumed(pid, req, str, l)
		return
	case req.Kind == header.KindRelay:
		rep := header.Reply{Status: m.relayRequest(ctx, pid, int(req.Port), sessionOf(req))}
		if rep.Status == header.StatusOK {
			rep.Rcvd = m.hopRTT(int(req.Port))
		}
		reply(rep)
		endStream(str)
		return
	case req.Kind == header.KindRelayVia:
		var rb [header.RouteLen]byte
		str.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := io.ReadFull(str, rb[:])
		str.SetReadDeadline(time.Time{})
		route, perr := header.ParseRoute(rb[:])
		if err != nil || perr != nil {
			reply(header.Reply{Status: header.StatusBadRequest})
			return
		}
		reply(header.Reply{Status: m.relayVia(ctx, pid, int(req.Port), route, sessionOf(req))})
		endStream(str)
		return
	case req.Kind == header.KindRelayOffer:
		reply(header.Reply{Status: m.relayOffer(pid, int(req.Port), sessionOf(req))})
		endStream(str)
		return
	case m.opts.OwnPort(req.Port):
		m.quiet.Warn("own:"+strconv.Itoa(pid), "peer asked for one of this sidecar's own ports (SOCKS, management API or a gateway): refused",
			"peer", pid, "port", req.Port)
		reply(header.Reply{Status: header.StatusNotAllowed})
		return
	case !m.opts.AllowPort(pid, req.Port):
		log.Warn("peer asked for a port that --allow-ports does not allow", "port", req.Port)
		reply(header.Reply{Status: header.StatusNotAllowed})
		return
	case l.draining.Load():
		// A replaced connection only carries its flows to their end.
		reply(header.Reply{Status: header.StatusDraining})
		return
	}
	key := flowKey{pid: pid, id: req.Flow}
	pf := m.flows.of(pid)
	ok, fresh := pf.take(key, m.opts.MaxFlows)
	if !fresh {
		log.Warn("peer opened a flow with the id of one it already has: refused", "flow", req.Flow)
		reply(header.Reply{Status: header.StatusBadRequest})
		return
	}
	if !ok {
		m.quiet.Warn("flows:"+strconv.Itoa(pid), "refusing a tunnelled connection: the peer has spent its budget of open connections here",
			"peer", pid, "port", req.Port, "limit", m.opts.MaxFlows)
		reply(header.Reply{Status: header.StatusOverBudget})
		return
	}
	tcp, err := m.dialLocal(ctx, pid, pf, str, req.Port, log)
	if err != nil {
		pf.give()
		st := header.StatusUnreachable
		switch {
		case errors.Is(err, header.ErrOverBudget):
			st = header.StatusOverBudget
		case errors.Is(err, syscall.ECONNREFUSED):
			st = header.StatusRefused
		}
		log.Info("local port not reachable for peer", "port", req.Port, "err", err)
		reply(header.Reply{Status: st})
		return
	}
	// The flow is registered before the reply: the opener may move it to
	// another connection of the pool at once, and its resume may overtake
	// this stream (it waits for the attachment below).
	e := m.newFlow(key, req.Port, l, log.With("port", req.Port, "dir", "in"))
	if e == nil {
		tcp.Close()
		pf.give()
		reply(header.Reply{Status: header.StatusBadRequest})
		return
	}
	if err := reply(header.Reply{}); err != nil {
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
	e.local.Store(tcp) // reset before this, Splice resets it at once
	splice.Splice(tcp, e.c)
}

// dialLocal connects to the local port a peer asked for. A port that waits
// for its listener (Options.WaitPort) and finds none is dialled again, with
// backoff, until something listens, LocalWait passes, or the peer gives up
// on str; a peer has at most MaxWaiting such waits at once.
func (m *Mux) dialLocal(ctx context.Context, pid int, pf *peerFlows, str *quic.Stream, port uint16, log *slog.Logger) (*net.TCPConn, error) {
	// Loopback needs no TCP keepalive: skipping it saves syscalls per
	// connection. Its buffers are fixed, not grown by the kernel: what a
	// peer sends that the local program does not read waits in the flow,
	// within the peer's budget, not in kernel memory beyond it.
	d := net.Dialer{Timeout: 5 * time.Second, KeepAlive: -1, Control: localBuffers}
	addr := netip.AddrPortFrom(m.opts.LocalHost, port).String()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err == nil {
		return c.(*net.TCPConn), nil
	}
	if !errors.Is(err, syscall.ECONNREFUSED) || !m.opts.WaitPort(pid, port) {
		return nil, err
	}
	if !pf.startWaiting(m.opts.MaxWaiting) {
		m.quiet.Warn("waiting:"+strconv.Itoa(pid), "refusing a connection that would wait for a local listener: the peer has too many waiting",
			"peer", pid, "port", port, "limit", m.opts.MaxWaiting)
		return nil, header.ErrOverBudget
	}
	defer pf.stopWaiting()
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
			if wctx.Err() != nil {
				break // the wait ran out during this dial: still not listening
			}
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

// logClosed logs a flow's end.
func logClosed(log *slog.Logger, start time.Time, sent, recv uint64, reset bool) {
	outcome := "ok"
	if reset {
		outcome = "reset"
	}
	log.Info("tunnel closed", "sent", sent, "received", recv, "duration", time.Since(start).Round(time.Millisecond), "outcome", outcome)
}

// localSocketBuffer is the kernel's buffer each way of a local connection
// a peer opened (the kernel doubles it, to 256 KiB). It must hold several
// of loopback's segments (its MTU is 64 KiB): at 32 KiB the send buffer
// held one, the local program's kernel delayed its ack of each lone
// segment by 40 ms, and what a peer sent reached a local port at 2 MB/s.
const localSocketBuffer = 128 << 10

// localBuffers fixes a local connection's socket buffers.
func localBuffers(_, _ string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = errors.Join(syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, localSocketBuffer),
			syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, localSocketBuffer))
	})
	return errors.Join(err, serr)
}
