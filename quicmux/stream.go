package quicmux

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
)

// Errors of Dial.
var (
	ErrUnknownPeer = errors.New("party is not in the registry")
	ErrNoPath      = errors.New("no path to party yet")
	// ErrTooManyConns carries "refused" in its text, so that go-socks5
	// answers "connection refused" at once.
	ErrTooManyConns = errors.New("too many open tunnelled connections to this party: connection refused until some close")
)

// Dial opens a tunnelled TCP connection to port on party pid's loopback. It
// waits, within ctx, for the party to register and for a path to it. The
// error of a refused or disallowed port says so.
func (m *Mux) Dial(ctx context.Context, pid int, port uint16) (*StreamConn, error) {
	str, l, kind, err := m.open(ctx, pid, KindConnect, port)
	if err != nil {
		return nil, err
	}
	l.tr.opened.Add(1)
	l.tr.open.Add(1)
	l.open.Add(1)
	c := &StreamConn{str: str, l: l, bufs: &m.bufs, local: net.UDPAddrFromAddrPort(l.local), remote: net.UDPAddrFromAddrPort(l.remote),
		start: time.Now(), log: m.log.With("peer", pid, "port", port, "dir", "out", "path", kind)}
	c.log.Info("tunnel opened")
	return c, nil
}

// Ping measures the round trip of a request through the tunnel to pid, and
// names the path it took.
func (m *Mux) Ping(ctx context.Context, pid int) (rtt time.Duration, path string, addr netip.AddrPort, err error) {
	start := time.Now()
	str, l, kind, err := m.open(ctx, pid, KindPing, 0)
	if err != nil {
		return 0, "", netip.AddrPort{}, err
	}
	rtt = time.Since(start)
	str.Close()
	str.CancelRead(codeStreamAbort)
	return rtt, kind, l.remote, nil
}

// open opens a stream of kind k to pid and reads the peer's reply. A
// connection may die under us (the peer restarted, the path broke); nothing
// has reached the client yet, so opening again is safe.
func (m *Mux) open(ctx context.Context, pid int, k Kind, port uint16) (*quic.Stream, *link, string, error) {
	for attempt := 0; ; attempt++ {
		p, l, err := m.waitLink(ctx, pid)
		if err != nil {
			return nil, nil, "", err
		}
		str, err := openStream(ctx, l.conn, k, port)
		if err == nil {
			return str, l, m.linkKind(p, l), nil
		}
		if errors.Is(err, ErrTooManyConns) {
			m.quiet.warn("streams:"+strconv.Itoa(pid), "refusing a tunnelled connection: the peer's limit of open connections is reached",
				"peer", pid, "port", port, "limit", m.opts.MaxStreams)
			return nil, nil, "", fmt.Errorf("party %d port %d: %w", pid, port, err)
		}
		if !connectionDead(l.conn, err) || ctx.Err() != nil || attempt == 2 {
			return nil, nil, "", fmt.Errorf("party %d port %d: %w", pid, port, err)
		}
		m.dropLink(p, l, err)
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

// openStream opens a stream and exchanges the header and reply. It does not
// wait for the peer to allow more streams: past the limit it fails at once
// with ErrTooManyConns.
func openStream(ctx context.Context, conn *quic.Conn, k Kind, port uint16) (*quic.Stream, error) {
	str, err := conn.OpenStream()
	if err != nil {
		if _, ok := errors.AsType[*quic.StreamLimitReachedError](err); ok {
			return nil, ErrTooManyConns
		}
		return nil, fmt.Errorf("open stream: %w", err)
	}
	if dl, ok := ctx.Deadline(); ok {
		str.SetDeadline(dl)
	}
	var hdr [replyLen]byte
	_, err = str.Write(AppendRequest(nil, k, port))
	if err == nil {
		_, err = io.ReadFull(str, hdr[:])
	}
	if err == nil {
		err = ParseReply(hdr[:])
	}
	if err != nil {
		str.CancelRead(codeStreamAbort)
		str.CancelWrite(codeStreamAbort)
		return nil, err
	}
	str.SetDeadline(time.Time{})
	return str, nil
}

// waitLink returns the link to pid, waiting for one within ctx.
func (m *Mux) waitLink(ctx context.Context, pid int) (*peer, *link, error) {
	for {
		m.mu.Lock()
		p := m.peers[pid]
		var l *link
		if p != nil {
			l = p.link
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

// serveStream reads a stream's header, dials the allowed local port and
// pipes bytes both ways.
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
	reply := func(s Status) error {
		_, err := str.Write(AppendReply(nil, s))
		if s != StatusOK {
			str.Close()
			str.CancelRead(codeStreamAbort)
		}
		return err
	}
	kind, port, err := ParseRequest(hdr[:])
	switch {
	case err != nil:
		log.Warn("peer sent a bad stream header", "err", err)
		reply(StatusBadRequest)
		return
	case kind == KindPing:
		reply(StatusOK)
		str.Close()
		str.CancelRead(codeStreamAbort)
		return
	case kind == KindPathNotice:
		if !l.direct.Swap(true) {
			log.Info("path switched", "from", PathRelayed, "to", PathDirect, "by", "peer")
		}
		reply(StatusOK)
		str.Close()
		str.CancelRead(codeStreamAbort)
		return
	case !m.opts.AllowPort(port):
		log.Warn("peer asked for a port that --allow-ports does not allow", "port", port)
		reply(StatusNotAllowed)
		return
	}
	// Loopback needs no TCP keepalive: skipping it saves syscalls per connection.
	d := net.Dialer{Timeout: 5 * time.Second, KeepAlive: -1}
	c, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(m.opts.LocalHost, port).String())
	if err != nil {
		st := StatusUnreachable
		if errors.Is(err, syscall.ECONNREFUSED) {
			st = StatusRefused
		}
		log.Info("local port not reachable for peer", "port", port, "err", err)
		reply(st)
		return
	}
	tcp := c.(*net.TCPConn)
	defer tcp.Close()
	if err := reply(StatusOK); err != nil {
		return
	}
	l.tr.opened.Add(1)
	l.tr.open.Add(1)
	l.open.Add(1)
	defer l.tr.open.Add(-1)
	defer l.open.Add(-1)
	start := time.Now()
	log = log.With("port", port, "dir", "in")
	log.Info("tunnel opened")
	sent, recv, perr := pipe(tcp, str, l.tr, &m.bufs)
	logClosed(log, start, sent, recv, perr)
}

func logClosed(log *slog.Logger, start time.Time, sent, recv uint64, err error) {
	outcome := "ok"
	if err != nil {
		outcome = "reset"
	}
	log.Info("tunnel closed", "sent", sent, "received", recv, "duration", time.Since(start).Round(time.Millisecond),
		"outcome", outcome, "err", err)
}

// pipe copies between a local TCP connection and a stream until both
// directions end. A clean end (EOF) is passed on as a half-close; an error
// resets the other side. It returns the bytes sent to the peer and received
// from it, and the first error.
func pipe(tcp *net.TCPConn, str *quic.Stream, tr *traffic, bufs *bufferPool) (sent, recv uint64, err error) {
	var wg sync.WaitGroup
	var upErr error
	wg.Go(func() {
		n, err := copyAdaptive(countingWriter{str, &tr.sent}, tcp, bufs)
		sent = uint64(n)
		if err != nil {
			upErr = err
			str.CancelWrite(codeStreamAbort)
			tcp.CloseRead()
			return
		}
		str.Close()
	})
	n, downErr := copyAdaptive(tcp, countingReader{str, &tr.recv}, bufs)
	recv = uint64(n)
	if downErr != nil {
		tcp.SetLinger(0)
		tcp.Close() // resets the local side; unblocks the other copy
		str.CancelRead(codeStreamAbort)
	} else {
		tcp.CloseWrite()
	}
	wg.Wait()
	return sent, recv, errors.Join(downErr, upErr)
}

// bufferPool hands out the large copy buffers, reused across connections.
type bufferPool struct{ p sync.Pool }

const (
	smallBuf = 2 << 10   // what an idle connection holds while it waits
	largeBuf = 256 << 10 // what a busy one copies with
)

func (bp *bufferPool) get() *[]byte {
	if b, ok := bp.p.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, largeBuf)
	return &b
}

func (bp *bufferPool) put(b *[]byte) { bp.p.Put(b) }

// copyAdaptive copies src to dst until EOF. It waits for data with a small
// buffer, so that idle connections cost little memory, and copies with a
// large pooled one while data keeps coming, so that a busy stream gets
// large writes (quic-go's Write blocks until a chunk is packed; small
// chunks leave the sender idle between them).
func copyAdaptive(dst io.Writer, src io.Reader, bufs *bufferPool) (int64, error) {
	small := make([]byte, smallBuf)
	var total int64
	for {
		n, err := src.Read(small)
		if n > 0 {
			w, werr := dst.Write(small[:n])
			total += int64(w)
			if werr != nil {
				return total, werr
			}
		}
		if err != nil {
			if err == io.EOF {
				return total, nil
			}
			return total, err
		}
		if n < len(small) {
			continue
		}
		// Busy: copy with the large buffer until a read comes back small.
		big := bufs.get()
		for {
			n, err = src.Read(*big)
			if n > 0 {
				w, werr := dst.Write((*big)[:n])
				total += int64(w)
				if werr != nil {
					bufs.put(big)
					return total, werr
				}
			}
			if err != nil {
				bufs.put(big)
				if err == io.EOF {
					return total, nil
				}
				return total, err
			}
			if n < smallBuf {
				break
			}
		}
		bufs.put(big)
	}
}

type countingReader struct {
	r io.Reader
	n *atomic.Uint64
}

func (c countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n.Add(uint64(n))
	return n, err
}

type countingWriter struct {
	w io.Writer
	n *atomic.Uint64
}

func (c countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n.Add(uint64(n))
	return n, err
}

// StreamConn is a tunnelled TCP connection: a net.Conn over one QUIC stream.
// CloseWrite sends FIN; Close ends both directions.
type StreamConn struct {
	str           *quic.Stream
	l             *link
	bufs          *bufferPool
	local, remote net.Addr
	start         time.Time
	log           *slog.Logger
	sent, recv    atomic.Uint64
	readErr       atomic.Pointer[error] // first non-EOF read error, for the close log
	closed        atomic.Bool
}

func (c *StreamConn) Read(b []byte) (int, error) {
	n, err := c.str.Read(b)
	c.recv.Add(uint64(n))
	c.l.tr.recv.Add(uint64(n))
	if err != nil && err != io.EOF {
		c.readErr.CompareAndSwap(nil, &err)
	}
	return n, err
}

func (c *StreamConn) Write(b []byte) (int, error) {
	n, err := c.str.Write(b)
	c.sent.Add(uint64(n))
	c.l.tr.sent.Add(uint64(n))
	return n, err
}

// ReadFrom copies r into the stream until EOF, with large writes while r is
// busy (see copyAdaptive); io.Copy uses it.
func (c *StreamConn) ReadFrom(r io.Reader) (int64, error) {
	return copyAdaptive(writerOnly{c}, r, c.bufs)
}

// writerOnly hides ReadFrom, so that copyAdaptive writes.
type writerOnly struct{ io.Writer }

// errReset is the read error a StreamConn logs when it was reset here.
var errReset = errors.New("reset by the local client")

// Reset ends both directions abruptly: the peer's local connection is
// reset, never closed as if complete.
func (c *StreamConn) Reset() error {
	c.readErr.CompareAndSwap(nil, &errReset)
	c.str.CancelWrite(codeStreamAbort)
	c.str.CancelRead(codeStreamAbort)
	return nil
}

// CloseWrite half-closes: the peer's local connection reads EOF.
func (c *StreamConn) CloseWrite() error { return c.str.Close() }

// Close stops reading and finishes writing what was written.
func (c *StreamConn) Close() error {
	c.str.CancelRead(codeStreamAbort)
	err := c.str.Close()
	if c.closed.CompareAndSwap(false, true) {
		c.l.tr.open.Add(-1)
		c.l.open.Add(-1)
		var rerr error
		if p := c.readErr.Load(); p != nil {
			rerr = *p
		}
		logClosed(c.log, c.start, c.sent.Load(), c.recv.Load(), rerr)
	}
	return err
}

func (c *StreamConn) LocalAddr() net.Addr                { return c.local }
func (c *StreamConn) RemoteAddr() net.Addr               { return c.remote }
func (c *StreamConn) SetDeadline(t time.Time) error      { return c.str.SetDeadline(t) }
func (c *StreamConn) SetReadDeadline(t time.Time) error  { return c.str.SetReadDeadline(t) }
func (c *StreamConn) SetWriteDeadline(t time.Time) error { return c.str.SetWriteDeadline(t) }
