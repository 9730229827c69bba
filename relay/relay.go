// Package relay allocates a relayed address on a TURN server (RFC 8656),
// such as coturn, reached over UDP, TCP or TLS, for the parties that no
// direct path reaches (symmetric NATs, blocked UDP). The relay carries only
// QUIC packets between pinned parties: encryption stays end to end.
package relay

import (
	"context"
	"crypto/hmac"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/pion/logging"
	"github.com/pion/turn/v4"
)

// URL is a TURN server address: turn:HOST[:PORT][?transport=udp|tcp] or
// turns:HOST[:PORT] (TLS over TCP).
type URL struct {
	Secure    bool   // turns:
	Host      string // name or IP
	Port      uint16
	Transport string // udp, tcp or tls
}

func (u URL) String() string {
	scheme := "turn"
	if u.Secure {
		scheme = "turns"
	}
	s := scheme + ":" + net.JoinHostPort(u.Host, strconv.Itoa(int(u.Port)))
	if !u.Secure {
		s += "?transport=" + u.Transport
	}
	return s
}

// ParseURL parses a TURN URL (RFC 7065).
func ParseURL(s string) (URL, error) {
	scheme, rest, ok := strings.Cut(s, ":")
	if !ok || (scheme != "turn" && scheme != "turns") {
		return URL{}, fmt.Errorf("relay %q: want turn:HOST:PORT?transport=udp|tcp or turns:HOST:PORT", s)
	}
	u := URL{Secure: scheme == "turns", Port: 3478, Transport: "udp"}
	if u.Secure {
		u.Port, u.Transport = 5349, "tls"
	}
	hostport, query, _ := strings.Cut(rest, "?")
	if q, err := url.ParseQuery(query); err != nil {
		return URL{}, fmt.Errorf("relay %q: bad query: %v", s, err)
	} else if t := q.Get("transport"); t != "" {
		switch {
		case t == "udp" && !u.Secure:
			u.Transport = "udp"
		case t == "tcp" && u.Secure:
			u.Transport = "tls"
		case t == "tcp":
			u.Transport = "tcp"
		default:
			return URL{}, fmt.Errorf("relay %q: transport=%s: want udp or tcp (turns: is always TLS over TCP)", s, t)
		}
	}
	host := hostport
	if h, p, err := net.SplitHostPort(hostport); err == nil {
		n, err := strconv.ParseUint(p, 10, 16)
		if err != nil || n == 0 {
			return URL{}, fmt.Errorf("relay %q: bad port", s)
		}
		host, u.Port = h, uint16(n)
	}
	if !validHost(host) {
		return URL{}, fmt.Errorf("relay %q: missing or bad host", s)
	}
	u.Host = host
	return u, nil
}

// validHost reports whether h is an IP address or a DNS name.
func validHost(h string) bool {
	if _, err := netip.ParseAddr(h); err == nil {
		return true
	}
	if h == "" || len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return false
			}
		}
	}
	return true
}

// RESTCredentials returns the username and password of coturn's shared
// secret scheme (--use-auth-secret, the "TURN REST API"): the username is
// "EXPIRY:USER" and the password base64(HMAC-SHA1(secret, username)).
func RESTCredentials(secret, user string, expiry time.Time) (username, password string) {
	username = strconv.FormatInt(expiry.Unix(), 10)
	if user != "" {
		username += ":" + user
	}
	mac := hmac.New(sha1.New, []byte(secret))
	mac.Write([]byte(username))
	return username, base64.StdEncoding.EncodeToString(mac.Sum(nil))
}

// Options configure Allocate.
type Options struct {
	URLs []URL
	// User and Password are long-term credentials; with Secret set, the
	// REST scheme is used instead (User, if set, names the party in it).
	User, Password, Secret string
	// RootCAs verify turns: servers; nil means the system roots.
	RootCAs *x509.CertPool
	// Logger; nil discards.
	Logger *slog.Logger
	// Timeout bounds each server's attempt; zero means 5 s.
	Timeout time.Duration
}

// Allocation is a relayed address and the socket that uses it. Closing
// Conn releases the allocation and the connection to the server.
type Allocation struct {
	Conn   net.PacketConn
	Addr   netip.AddrPort // the relayed address peers send to
	Server string         // the URL of the server

	client *turn.Client
	// mapped is the address the server saw the client's socket come from
	// when it allocated (invalid if it did not say): Renewing compares.
	mapped netip.AddrPort
	// granted is set once the server granted a permission that held
	// asked for (Renewing's goroutine only); asking is set while such a
	// request is under way (one that is not answered outlives held).
	granted bool
	asking  atomic.Bool
}

// Allocate tries each server in turn and returns the first allocation.
func Allocate(ctx context.Context, opts Options) (*Allocation, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Timeout == 0 {
		opts.Timeout = 5 * time.Second
	}
	if len(opts.URLs) == 0 {
		return nil, errors.New("no relay configured")
	}
	var errs []error
	for _, u := range opts.URLs {
		actx, cancel := context.WithTimeout(ctx, opts.Timeout)
		a, err := allocate(actx, u, opts)
		cancel()
		if err == nil {
			return a, nil
		}
		opts.Logger.Warn("relay allocation failed", "relay", u.String(), "err", err)
		errs = append(errs, fmt.Errorf("%v: %w", u, err))
		if ctx.Err() != nil {
			break
		}
	}
	return nil, errors.Join(errs...)
}

func allocate(ctx context.Context, u URL, opts Options) (*Allocation, error) {
	server := net.JoinHostPort(u.Host, strconv.Itoa(int(u.Port)))
	var base net.PacketConn
	switch u.Transport {
	case "udp":
		pc, err := net.ListenPacket("udp4", "0.0.0.0:0")
		if err != nil {
			return nil, err
		}
		base = pc
	case "tcp":
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", server)
		if err != nil {
			return nil, err
		}
		base = turn.NewSTUNConn(c)
	case "tls":
		d := tls.Dialer{Config: &tls.Config{ServerName: u.Host, RootCAs: opts.RootCAs, MinVersion: tls.VersionTLS12}}
		c, err := d.DialContext(ctx, "tcp", server)
		if err != nil {
			return nil, err
		}
		base = turn.NewSTUNConn(c)
	}
	user, pass := opts.User, opts.Password
	if opts.Secret != "" {
		user, pass = RESTCredentials(opts.Secret, opts.User, time.Now().Add(24*time.Hour))
	}
	client, err := turn.NewClient(&turn.ClientConfig{
		STUNServerAddr: server, TURNServerAddr: server, Username: user, Password: pass,
		Conn: base, LoggerFactory: loggerFactory{opts.Logger.With("component", "turn", "relay", u.String())},
	})
	if err != nil {
		base.Close()
		return nil, err
	}
	type result struct {
		pc  net.PacketConn
		err error
	}
	done := make(chan result, 1)
	go func() {
		if err := client.Listen(); err != nil {
			done <- result{nil, err}
			return
		}
		pc, err := client.Allocate()
		done <- result{pc, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		base.Close() // unblocks the allocation
		r = <-done
		if r.err == nil {
			r.pc.Close()
		}
		r.err = ctx.Err()
	}
	if r.err != nil {
		client.Close()
		base.Close()
		return nil, fmt.Errorf("allocate: %w", r.err)
	}
	ua, ok := r.pc.LocalAddr().(*net.UDPAddr)
	if !ok {
		r.pc.Close()
		client.Close()
		base.Close()
		return nil, fmt.Errorf("allocate: relayed address %v is not UDP", r.pc.LocalAddr())
	}
	ap := ua.AddrPort()
	a := &Allocation{
		Conn:   &allocConn{PacketConn: r.pc, client: client, base: base},
		Addr:   netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()),
		Server: u.String(),
		client: client,
	}
	a.mapped, _ = a.check(ctx)
	return a, nil
}

// allocConn closes the allocation, the client and its connection together.
type allocConn struct {
	net.PacketConn
	client *turn.Client
	base   net.PacketConn
}

func (c *allocConn) Close() error {
	err := c.PacketConn.Close()
	c.client.Close()
	return errors.Join(err, c.base.Close())
}

// loggerFactory sends pion's logs to slog: its errors and warnings at
// Warn, the rest at Debug.
type loggerFactory struct{ log *slog.Logger }

func (f loggerFactory) NewLogger(scope string) logging.LeveledLogger {
	return leveled{f.log.With("scope", scope)}
}

type leveled struct{ log *slog.Logger }

func (l leveled) Trace(msg string)                  {}
func (l leveled) Tracef(format string, args ...any) {}
func (l leveled) Debug(msg string)                  { l.log.Debug(msg) }
func (l leveled) Debugf(format string, args ...any) { l.log.Debug(fmt.Sprintf(format, args...)) }
func (l leveled) Info(msg string)                   { l.log.Debug(msg) }
func (l leveled) Infof(format string, args ...any)  { l.log.Debug(fmt.Sprintf(format, args...)) }
func (l leveled) Warn(msg string)                   { l.log.Warn(msg) }
func (l leveled) Warnf(format string, args ...any)  { l.log.Warn(fmt.Sprintf(format, args...)) }
func (l leveled) Error(msg string)                  { l.log.Warn(msg) }
func (l leveled) Errorf(format string, args ...any) { l.log.Warn(fmt.Sprintf(format, args...)) }
