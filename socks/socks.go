// Package socks is the sidecar's SOCKS5 front: armon/go-socks5 with a Dial
// that sends destinations inside the peers range through the tunnel and
// every other destination straight out (or refuses it, by policy).
package socks

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
	"syscall"
	"time"

	socks5 "github.com/armon/go-socks5"

	"sfkit-proxy/config"
	"sfkit-proxy/quietlog"
	"sfkit-proxy/splice"
)

// Options configure a Server. Zero values are documented per field.
type Options struct {
	// Logger; nil discards.
	Logger *slog.Logger
	// Peers is the virtual range: its base + N is party N.
	Peers netip.Prefix
	// Self is this party's id; its own virtual address reaches 127.0.0.1.
	Self int
	// Route, if set, names the party a destination means before the
	// virtual range is asked (the MPC config's peers' listening ports).
	Route func(host string, port uint16) (pid int, ok bool)
	// DialPeer opens a tunnelled connection to port at party pid (required).
	// An error that is, by errors.Is, syscall.ECONNREFUSED is answered
	// "connection refused"; syscall.ENETUNREACH "network unreachable";
	// any other "host unreachable".
	DialPeer func(ctx context.Context, pid int, port uint16) (splice.Conn, error)
	// PeerAllows reports whether party pid publishes port as reachable; nil
	// means every port (the peer still enforces its own policy).
	PeerAllows func(pid int, port uint16) bool
	// Direct allows destinations outside Peers; false refuses them.
	Direct bool
	// HandshakeTimeout bounds a client's greeting and request; zero means 10 s.
	HandshakeTimeout time.Duration
	// ConnectTimeout bounds reaching a destination, a peer's tunnel
	// included: a CONNECT to a peer not connected yet waits that long;
	// zero means 20 s.
	ConnectTimeout time.Duration
	// OnConnect, if set, is told the outcome of every CONNECT.
	OnConnect func(dest string, pid int, err error)
	// UDP, if set, opens a UDP association through the tunnel for a
	// client's UDP ASSOCIATE (udp.go), whose answers go to recv; nil
	// answers the command "not supported".
	UDP func(recv func(pid int, port uint16, data []byte)) (UDPAssoc, error)
}

// Server serves SOCKS5.
type Server struct {
	opts Options
	log  *slog.Logger

	quiet *quietlog.Log

	mu       sync.Mutex // guards conns and udpPorts
	conns    map[net.Conn]struct{}
	udpPorts map[uint16]int // the UDP associations' sockets' ports
}

// New returns a server.
func New(opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.HandshakeTimeout == 0 {
		opts.HandshakeTimeout = 10 * time.Second
	}
	if opts.ConnectTimeout == 0 {
		opts.ConnectTimeout = 20 * time.Second
	}
	log := opts.Logger.With("component", "socks")
	return &Server{opts: opts, log: log, quiet: quietlog.New(log, time.Minute), conns: make(map[net.Conn]struct{}), udpPorts: make(map[uint16]int)}
}

// Serve accepts SOCKS clients on ln until ctx ends, then closes ln and
// every client connection and waits for their handlers.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	return s.serve(ctx, ln, s.serveConn)
}

// serve accepts on ln and runs handle for each connection until ctx ends,
// then closes ln and every connection and waits for the handlers.
func (s *Server) serve(ctx context.Context, ln net.Listener, handle func(net.Conn)) error {
	var wg sync.WaitGroup
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
	})
	defer stop()
	defer wg.Wait()
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) {
				// Too many open files and the like: back off, keep serving.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; backing off", "err", err, "delay", delay)
				time.Sleep(delay)
				continue
			}
			return fmt.Errorf("socks accept: %w", err)
		}
		delay = 0
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		wg.Go(func() {
			defer func() {
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
			}()
			handle(c)
		})
	}
}

// serveConn runs one client through go-socks5, which has no deadlines of
// its own: the handshake deadline is lifted once the request is read (in
// the rule check, which runs just before the dial). A UDP ASSOCIATE is
// taken before go-socks5 sees it (udp.go).
func (s *Server) serveConn(c net.Conn) {
	c.SetDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	srv, err := socks5.New(&socks5.Config{
		Resolver:    keepNames{},
		AuthMethods: []socks5.Authenticator{interceptor{s: s, c: c}},
		Rules:       rules{s: s, c: c},
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			target, err := s.dial(ctx, c, network, addr)
			if err != nil {
				return nil, replyError(err)
			}
			return target, nil
		},
		Logger: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	})
	if err != nil {
		s.log.Error("socks server setup failed", "err", err)
		c.Close()
		return
	}
	srv.ServeConn(clientConn{c})
}

// clientConn hides the client connection's WriteTo, so that go-socks5's
// copy toward a peer reaches the tunnel's ReadFrom (large reads while
// busy, a small buffer while idle) instead of net.TCPConn's 32 KiB copy
// loop; CloseWrite stays visible for half-close.
type clientConn struct{ net.Conn }

func (c clientConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// keepNames leaves host names unresolved, so that socks5h names reach dial.
type keepNames struct{}

func (keepNames) Resolve(ctx context.Context, _ string) (context.Context, net.IP, error) {
	return ctx, nil, nil
}

type rules struct {
	s *Server
	c net.Conn
}

// Allow lifts the handshake deadline and applies the policy: CONNECT only;
// peers' published ports; direct destinations only if allowed.
func (r rules) Allow(ctx context.Context, req *socks5.Request) (context.Context, bool) {
	r.c.SetDeadline(time.Time{})
	if req.Command != socks5.ConnectCommand {
		return ctx, true // go-socks5 answers "command not supported"
	}
	host := req.DestAddr.FQDN
	if req.DestAddr.IP != nil {
		host = req.DestAddr.IP.String()
	}
	pid, isPeer := r.s.peerOf(host, uint16(req.DestAddr.Port))
	switch {
	case host == "":
		// A zero-length name would dial the empty host: this machine.
		r.s.log.Info("refused: empty destination name in SOCKS request", "port", req.DestAddr.Port)
		r.s.report(":"+strconv.Itoa(req.DestAddr.Port), -1, ErrEmptyName)
		return ctx, false
	case isPeer && r.s.opts.PeerAllows != nil && pid != r.s.opts.Self && !r.s.opts.PeerAllows(pid, uint16(req.DestAddr.Port)):
		r.s.log.Info("refused: port not allowed by peer", "peer", pid, "port", req.DestAddr.Port)
		r.s.report(req.DestAddr.Address(), pid, ErrNotAllowed)
		return ctx, false
	case !isPeer && !r.s.opts.Direct:
		r.s.log.Info("refused: direct destinations are denied (--direct deny)", "dest", req.DestAddr.Address())
		r.s.report(req.DestAddr.Address(), -1, ErrDirectDenied)
		return ctx, false
	}
	return ctx, true
}

// The replies go-socks5 sends for a failed dial. It picks one by looking
// for "refused", then "network is unreachable", in the dial error's text;
// replyError picks by the error's value and hands go-socks5 a text that
// says the same.
const (
	replyRefused         = "connection refused"
	replyNetUnreachable  = "network is unreachable"
	replyHostUnreachable = "host unreachable"
)

// replyError is err as the dial handed to go-socks5 returns it: refused
// when err is syscall.ECONNREFUSED (by errors.Is), network unreachable when
// it is syscall.ENETUNREACH, host unreachable otherwise, whatever its text
// says. It wraps err: errors.Is and errors.As still see it.
func replyError(err error) error {
	reply := replyHostUnreachable
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		reply = replyRefused
	case errors.Is(err, syscall.ENETUNREACH):
		reply = replyNetUnreachable
	}
	return &dialError{reply: reply, err: err}
}

// dialError is a failed dial with the reply it gets. Its text is the
// reply's alone: the cause's text could name another reply. The cause is
// logged where the dial failed.
type dialError struct {
	reply string
	err   error
}

func (e *dialError) Error() string { return e.reply }
func (e *dialError) Unwrap() error { return e.err }

// Errors reported to OnConnect for requests refused by policy.
var (
	ErrNotAllowed   = errors.New("port not allowed by peer")
	ErrDirectDenied = errors.New("direct destinations denied")
	ErrEmptyName    = errors.New("empty destination name")
)

func (s *Server) report(dest string, pid int, err error) {
	if s.opts.OnConnect != nil {
		s.opts.OnConnect(dest, pid, err)
	}
}

// peerOf returns the party that host:port means: by Route, else by the
// virtual range.
func (s *Server) peerOf(host string, port uint16) (int, bool) {
	if s.opts.Route != nil {
		if pid, ok := s.opts.Route(host, port); ok {
			return pid, true
		}
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return 0, false
	}
	return config.PIDOf(s.opts.Peers, a)
}

// dial reaches addr for client: through the tunnel for a peer, directly
// otherwise. What it returns is what go-socks5 copies to and from.
func (s *Server) dial(ctx context.Context, client net.Conn, network, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, s.opts.ConnectTimeout)
	defer cancel()
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return nil, err
	}
	pid, isPeer := s.peerOf(host, uint16(port))
	if !isPeer || pid == s.opts.Self {
		target := addr
		if isPeer {
			target = net.JoinHostPort("127.0.0.1", portStr)
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, target)
		s.report(addr, -1, err)
		if err != nil {
			s.log.Debug("direct dial failed", "dest", addr, "err", err)
			return nil, err
		}
		tc := c.(*net.TCPConn)
		return &pipeConn{Conn: tcpConn{tc}, client: client, local: tc.LocalAddr().(*net.TCPAddr), remote: tc.RemoteAddr().(*net.TCPAddr)}, nil
	}
	start := time.Now()
	c, err := s.opts.DialPeer(ctx, pid, uint16(port))
	s.report(addr, pid, err)
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (waited %v: --dial-timeout)", err, time.Since(start).Round(time.Second))
		}
		s.log.Info("tunnel dial failed", "peer", pid, "port", port, "err", err)
		return nil, err
	}
	local := &net.TCPAddr{IP: config.VirtualAddr(s.opts.Peers, s.opts.Self).AsSlice()}
	remote := &net.TCPAddr{IP: config.VirtualAddr(s.opts.Peers, pid).AsSlice(), Port: int(port)}
	return &pipeConn{Conn: c, client: client, local: local, remote: remote}, nil
}

// pipeConn is the target as go-socks5 copies to and from it, with the
// client beside it. go-socks5 half-closes whichever side a copy ended on,
// error or not; here an error on one side resets the other first, so that
// a cut connection never looks complete (as splice.Splice does where this
// package does the copy itself). It also gives go-socks5 the
// *net.TCPAddr it insists on (it panics on any other LocalAddr type).
type pipeConn struct {
	splice.Conn
	client        net.Conn
	local, remote *net.TCPAddr
}

func (c *pipeConn) LocalAddr() net.Addr  { return c.local }
func (c *pipeConn) RemoteAddr() net.Addr { return c.remote }

// Read is the copy toward the client: when the target fails (it was
// reset, or the tunnel gave the connection up), the client is reset.
func (c *pipeConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err != nil && err != io.EOF {
		resetTCP(c.client)
	}
	return n, err
}

// WriteTo is the copy toward the client when the target can write
// straight to it (a tunnel does, without a copy in between); a failure
// resets the client as Read does.
func (c *pipeConn) WriteTo(w io.Writer) (int64, error) {
	wt, ok := c.Conn.(io.WriterTo)
	if !ok {
		return io.Copy(w, struct{ io.Reader }{c})
	}
	n, err := wt.WriteTo(w)
	if err != nil {
		resetTCP(c.client)
	}
	return n, err
}

// ReadFrom is the copy from the client (io.Copy uses it), passed on to the
// target's own ReadFrom when it has one: the tunnel's writes large chunks.
// When the client fails (it reset its connection), the target is reset.
func (c *pipeConn) ReadFrom(r io.Reader) (int64, error) {
	var n int64
	var err error
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(r)
	} else {
		n, err = io.Copy(struct{ io.Writer }{c.Conn}, r)
	}
	if err != nil {
		c.Conn.Reset()
	}
	return n, err
}

// tcpConn is a direct target as a splice.Conn.
type tcpConn struct{ *net.TCPConn }

func (c tcpConn) Reset() error { return resetTCP(c.TCPConn) }

// resetTCP closes c with a reset (RST) where it is TCP.
func resetTCP(c net.Conn) error {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	return c.Close()
}
