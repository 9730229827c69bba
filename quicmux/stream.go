package quicmux

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
)

// Errors of Dial.
var (
	ErrUnknownPeer = errors.New("party is not in the registry")
	ErrNoPath      = errors.New("no path to party yet")
)

// Dial opens a tunnelled TCP connection to port on party pid's loopback. It
// waits, within ctx, for the party to register and for a path to it. The
// error of a refused or disallowed port says so.
func (m *Mux) Dial(ctx context.Context, pid int, port uint16) (*StreamConn, error) {
	// A connection may die under us (the peer restarted, the path broke);
	// nothing has reached the client yet, so opening again is safe.
	for attempt := 0; ; attempt++ {
		conn, err := m.waitConn(ctx, pid)
		if err != nil {
			return nil, err
		}
		c, err := m.openStream(ctx, conn, pid, port)
		if err == nil || conn.Context().Err() == nil || ctx.Err() != nil || attempt == 2 {
			return c, err
		}
		m.mu.Lock()
		p := m.peers[pid]
		m.mu.Unlock()
		if p != nil {
			m.dropConn(p, conn, context.Cause(conn.Context()))
		}
	}
}

func (m *Mux) openStream(ctx context.Context, conn *quic.Conn, pid int, port uint16) (*StreamConn, error) {
	str, err := conn.OpenStreamSync(ctx)
	if err != nil {
		return nil, fmt.Errorf("open stream to party %d: %w", pid, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		str.SetDeadline(dl)
	}
	var hdr [replyLen]byte
	_, err = str.Write(AppendRequest(nil, port))
	if err == nil {
		_, err = io.ReadFull(str, hdr[:])
	}
	if err == nil {
		err = ParseReply(hdr[:])
	}
	if err != nil {
		str.CancelRead(codeStreamAbort)
		str.CancelWrite(codeStreamAbort)
		return nil, fmt.Errorf("party %d port %d: %w", pid, port, err)
	}
	str.SetDeadline(time.Time{})
	return &StreamConn{str: str, local: conn.LocalAddr(), remote: conn.RemoteAddr()}, nil
}

// waitConn returns the connection to pid, waiting for one within ctx.
func (m *Mux) waitConn(ctx context.Context, pid int) (*quic.Conn, error) {
	for {
		m.mu.Lock()
		p := m.peers[pid]
		var conn *quic.Conn
		var lastErr string
		if p != nil {
			conn, lastErr = p.conn, p.lastErr
		}
		changed := m.changed
		m.mu.Unlock()
		if conn != nil {
			return conn, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			m.mu.Lock()
			if p != nil {
				lastErr = p.lastErr
			}
			m.mu.Unlock()
			if p == nil {
				return nil, fmt.Errorf("party %d: %w", pid, ErrUnknownPeer)
			}
			if lastErr != "" {
				return nil, fmt.Errorf("party %d: %w (last error: %s)", pid, ErrNoPath, lastErr)
			}
			return nil, fmt.Errorf("party %d: %w", pid, ErrNoPath)
		}
	}
}

// serveStreams accepts the streams a peer opens on conn until it closes.
func (m *Mux) serveStreams(ctx context.Context, pid int, conn *quic.Conn) {
	for {
		str, err := conn.AcceptStream(ctx)
		if err != nil {
			return
		}
		m.wg.Go(func() { m.serveStream(ctx, pid, str) })
	}
}

// serveStream reads a stream's header, dials the allowed local port and
// pipes bytes both ways.
func (m *Mux) serveStream(ctx context.Context, pid int, str *quic.Stream) {
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
	port, err := ParseRequest(hdr[:])
	if err != nil {
		log.Warn("peer sent a bad stream header", "err", err)
		reply(StatusBadRequest)
		return
	}
	if !m.opts.AllowPort(port) {
		log.Warn("peer asked for a port that --allow-ports does not allow", "port", port)
		reply(StatusNotAllowed)
		return
	}
	d := net.Dialer{Timeout: 5 * time.Second}
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
	pipe(tcp, str)
}

// pipe copies between a local TCP connection and a stream until both
// directions end. A clean end (EOF) is passed on as a half-close; an error
// resets the other side.
func pipe(tcp *net.TCPConn, str *quic.Stream) {
	var wg sync.WaitGroup
	wg.Go(func() {
		buf := make([]byte, 64<<10)
		_, err := io.CopyBuffer(str, readerOnly{tcp}, buf)
		if err != nil {
			str.CancelWrite(codeStreamAbort)
			tcp.CloseRead()
			return
		}
		str.Close()
	})
	buf := make([]byte, 64<<10)
	_, err := io.CopyBuffer(tcp, readerOnly{str}, buf)
	if err != nil {
		tcp.SetLinger(0)
		tcp.Close() // resets the local side; unblocks the other copy
		str.CancelRead(codeStreamAbort)
	} else {
		tcp.CloseWrite()
	}
	wg.Wait()
}

// readerOnly hides WriterTo/ReaderFrom so that io.CopyBuffer uses the buffer.
type readerOnly struct{ io.Reader }

// StreamConn is a tunnelled TCP connection: a net.Conn over one QUIC stream.
// CloseWrite sends FIN; Close ends both directions.
type StreamConn struct {
	str           *quic.Stream
	local, remote net.Addr
}

func (c *StreamConn) Read(b []byte) (int, error)  { return c.str.Read(b) }
func (c *StreamConn) Write(b []byte) (int, error) { return c.str.Write(b) }

// CloseWrite half-closes: the peer's local connection reads EOF.
func (c *StreamConn) CloseWrite() error { return c.str.Close() }

// Close stops reading and finishes writing what was written.
func (c *StreamConn) Close() error {
	c.str.CancelRead(codeStreamAbort)
	return c.str.Close()
}

// Abort resets both directions, for errors.
func (c *StreamConn) Abort() {
	c.str.CancelRead(codeStreamAbort)
	c.str.CancelWrite(codeStreamAbort)
}

func (c *StreamConn) LocalAddr() net.Addr                { return c.local }
func (c *StreamConn) RemoteAddr() net.Addr               { return c.remote }
func (c *StreamConn) SetDeadline(t time.Time) error      { return c.str.SetDeadline(t) }
func (c *StreamConn) SetReadDeadline(t time.Time) error  { return c.str.SetReadDeadline(t) }
func (c *StreamConn) SetWriteDeadline(t time.Time) error { return c.str.SetWriteDeadline(t) }
