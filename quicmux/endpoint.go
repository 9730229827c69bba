package quicmux

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/identity"
	"sfkit-proxy/stun"
)

// endpoint is a local socket peers are reached through: the main UDP socket
// or a relay allocation, each with its QUIC transport, listener and STUN
// transactions. It hands each connectivity check to its peer.
type endpoint struct {
	relay  bool
	server string // the relay's name
	// addr is the relayed address peers send to (a relay's; invalid until
	// allocated): a *netip.AddrPort, replaced when the relay re-allocates.
	addr atomic.Pointer[netip.AddrPort]
	conn net.PacketConn
	tr   *quic.Transport
	ln   *quic.Listener
	stun *stun.Client // nil on a session
	// session, when not nil, is the peer relay session the endpoint runs
	// on (peerrelay.go): its connections are with session.peer only.
	session *sessionEnd
}

// newEndpoint runs a QUIC transport and listener on conn. It does not
// close conn when it fails.
func (m *Mux) newEndpoint(conn net.PacketConn, relay bool, server string) (*endpoint, error) {
	ep := &endpoint{relay: relay, server: server, conn: conn, tr: &quic.Transport{Conn: conn,
		VerifySourceAddress: m.guard.verifySource, ConnContext: m.guard.admit}}
	ep.stun = stun.NewClient(ep.tr)
	// Turn on the non-QUIC packet queue before anything is sent, so that no
	// early STUN answer is dropped.
	done, cancel := context.WithCancel(context.Background())
	cancel()
	ep.tr.ReadNonQUICPacket(done, nil)
	var err error
	if ep.ln, err = ep.tr.Listen(m.serverTLS(), m.qc); err != nil {
		ep.tr.Close()
		return nil, fmt.Errorf("quic listen: %w", err)
	}
	return ep, nil
}

// relayed is the relayed address peers send to (a relay's), invalid until
// there is one.
func (ep *endpoint) relayed() netip.AddrPort {
	if a := ep.addr.Load(); a != nil {
		return *a
	}
	return netip.AddrPort{}
}

// close closes the listener, the transport and the socket.
func (ep *endpoint) close() error {
	return errors.Join(ep.ln.Close(), ep.tr.Close(), ep.conn.Close())
}

// readLoop takes every non-QUIC packet off an endpoint: STUN responses go
// to its STUN client, binding requests are peers' connectivity checks.
func (m *Mux) readLoop(ctx context.Context, ep *endpoint) error {
	buf := make([]byte, 1500)
	for {
		n, addr, err := ep.tr.ReadNonQUICPacket(ctx, buf)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("read stun: %w", err)
		}
		ua, ok := addr.(*net.UDPAddr)
		if !ok {
			continue
		}
		from := ua.AddrPort()
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		if n > 0 && (buf[0] == rawHeard || buf[0] == rawUnheard) && ep == m.main {
			m.rawIn(from, slices.Clone(buf[:n]))
			continue
		}
		msg, err := stun.Parse(buf[:n])
		if err != nil {
			m.log.Debug("ignoring non-quic packet", "from", from, "err", err)
			continue
		}
		if !msg.Request {
			ep.stun.Handle(msg, from)
			continue
		}
		m.answerCheck(ep, msg, from)
	}
}

// answerCheck answers a peer's connectivity check if it carries our study,
// our pid and integrity with the key of the pair it claims to come from;
// anything else is ignored. Only such a check teaches us an address.
func (m *Mux) answerCheck(ep *endpoint, msg *stun.Message, from netip.AddrPort) {
	study, rest, ok1 := strings.Cut(msg.Username, ":")
	to, fromPID, ok2 := strings.Cut(rest, ":")
	pid, err := strconv.Atoi(fromPID)
	if !ok1 || !ok2 || err != nil || study != m.opts.Study || to != strconv.Itoa(m.opts.PID) {
		m.log.Debug("ignoring stranger's binding request", "from", from)
		return
	}
	p := m.peer(pid)
	key := ""
	if p != nil {
		p.mu.Lock()
		key = p.key
		p.mu.Unlock()
	}
	if key == "" {
		m.log.Debug("ignoring check from a party we cannot check", "from", from, "peer", pid)
		return
	}
	resp := stun.Answer(msg, from, key)
	if resp == nil {
		m.log.Debug("ignoring check with bad integrity", "from", from, "peer", pid)
		return
	}
	// The peer's own goroutine writes it: a write that waits (a full
	// socket buffer toward that peer) holds up no one else's checks.
	select {
	case p.answersOut <- checkAnswer{ep, resp, from}:
	default:
		m.log.Debug("check answer dropped: answers to the peer are backed up", "to", from)
	}
	if !ep.relay {
		p.learn(from)
	}
}

// acceptLoop accepts connections from peers with a lower pid; the TLS
// handshake has already checked their pin.
func (m *Mux) acceptLoop(ctx context.Context, ep *endpoint) error {
	for {
		conn, err := ep.ln.Accept(ctx)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, quic.ErrServerClosed) {
				return ctx.Err()
			}
			return fmt.Errorf("accept: %w", err)
		}
		cs := conn.ConnectionState().TLS
		p, member, err := m.claimed(cs.ServerName, identity.PinOf(cs.PeerCertificates[0]))
		switch {
		case err == nil && ep.session != nil && p.pid != ep.session.peer:
			err = fmt.Errorf("party %d dialled through a session with party %d", p.pid, ep.session.peer)
		case err == nil && ep.session != nil && member:
			err = fmt.Errorf("party %d opened a pool connection through a peer relay", p.pid)
		}
		if err != nil {
			m.count.acceptsRejected.Add(1)
			m.closeLater(codeRejected, "unknown peer", conn)
			continue
		}
		m.count.acceptsOK.Add(1)
		if member {
			p.mu.Lock()
			primary := p.pool.primary
			p.mu.Unlock()
			p.installMember(ctx, primary, conn, ep)
			continue
		}
		p.installConn(ctx, conn, ep)
		notify(p.connCh)
	}
}

// handshakeName is the TLS server name a dialer sends: who dials whom.
// The acceptor checks the pin of the party it names, so a member can claim
// only itself.
func handshakeName(from, to int) string {
	return "p" + strconv.Itoa(from) + ".to.p" + strconv.Itoa(to) + ".sfkit-proxy"
}

// parseHandshakeName reads a handshakeName, with memberName after it for a
// pool member; anything else is not ok.
func parseHandshakeName(s string) (from, to int, member, ok bool) {
	s, member = strings.CutSuffix(s, memberName)
	rest, ok1 := strings.CutSuffix(s, ".sfkit-proxy")
	a, b, ok2 := strings.Cut(rest, ".to.")
	num := func(s string) int {
		n, err := strconv.Atoi(strings.TrimPrefix(s, "p"))
		if err != nil || n < 0 || "p"+strconv.Itoa(n) != s {
			return -1
		}
		return n
	}
	from, to = num(a), num(b)
	return from, to, member, ok1 && ok2 && from >= 0 && to >= 0
}

// claimed finds the peer that a handshake's server name claims dialled us,
// and checks that it dials (a lower pid) and holds that peer's pinned key.
// A member is refused when the peer has no connection for it to join, or
// already has as many as its pool holds.
func (m *Mux) claimed(serverName, pin string) (p *peer, member bool, err error) {
	from, to, member, ok := parseHandshakeName(serverName)
	if !ok || to != m.opts.PID {
		return nil, false, fmt.Errorf("handshake names no party dialling party %d (server name %q)", m.opts.PID, serverName)
	}
	p = m.peer(from)
	if p == nil {
		return nil, false, fmt.Errorf("party %d is not in the registry", from)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case from >= m.opts.PID:
		return nil, false, fmt.Errorf("party %d dialled, but the lower party id dials", from)
	case p.info.Pin != pin:
		return nil, false, fmt.Errorf("party %d presented key %s, but pinned is %s", from, pin, p.info.Pin)
	case member && p.pool.primary == nil:
		return nil, false, fmt.Errorf("party %d opened a pool connection with no connection to pool with", from)
	case member && len(p.pool.members) >= p.pool.limit-1:
		return nil, false, fmt.Errorf("party %d opened more than %d connections", from, p.pool.limit)
	}
	return p, member, nil
}

func (m *Mux) serverTLS() *tls.Config {
	c := m.baseTLS()
	c.ClientAuth = tls.RequireAnyClientCert
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("peer sent no certificate")
		}
		pin := identity.PinOf(cs.PeerCertificates[0])
		if _, _, err := m.claimed(cs.ServerName, pin); err != nil {
			m.count.acceptsRejected.Add(1)
			m.quiet.Warn("reject:"+pin, "rejected handshake", "pin", pin, "err", err)
			return err
		}
		return nil
	}
	return c
}

func (m *Mux) clientTLS(pid int, pin string) *tls.Config {
	c := m.baseTLS()
	c.ServerName = handshakeName(m.opts.PID, pid)
	// Chain verification is replaced by the pin check below; TLS 1.3 still
	// proves that the peer holds the pinned key.
	c.InsecureSkipVerify = true
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("peer sent no certificate")
		}
		if got := identity.PinOf(cs.PeerCertificates[0]); got != pin {
			return fmt.Errorf("party %d presented key %s, but pinned is %s", pid, got, pin)
		}
		return nil
	}
	return c
}
