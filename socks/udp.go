package socks

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	socks5 "github.com/armon/go-socks5"
)

// UDP ASSOCIATE (RFC 1928 §7). go-socks5 answers the command "not
// supported"; the Server takes it first. Its authenticator (go-socks5's
// one hook between the greeting and the request) answers "no
// authentication" as go-socks5's own does, then peeks at the request: an
// associate is served here, anything else goes on to go-socks5.
//
// An association is a UDP socket on the address the client reached SOCKS
// on. It takes datagrams only from the client's IP (and port, when the
// request named one; after the first datagram, only from that datagram's
// source), each with RFC 1928's header naming a destination: a peer's
// virtual address (or a name Route knows) and port. What the peer's port
// answers comes back with the header of the destination as the client
// wrote it. The association ends with the TCP connection that asked for
// it. Fragments (FRAG != 0) are dropped, as the RFC allows; destinations
// outside the peers are dropped too: only peers are carried.

// UDPAssoc is a UDP association through the tunnel (dgram.Assoc).
type UDPAssoc interface {
	Send(pid int, port uint16, data []byte) error
	Close()
}

// errAssociated ends go-socks5's handling of a connection the Server
// served as an association.
var errAssociated = errors.New("served as a UDP association")

// interceptor is the Server's authenticator for one client connection.
type interceptor struct {
	s *Server
	c net.Conn
}

func (interceptor) GetCode() uint8 { return socks5.NoAuth }

func (a interceptor) Authenticate(r io.Reader, w io.Writer) (*socks5.AuthContext, error) {
	if _, err := w.Write([]byte{5, socks5.NoAuth}); err != nil {
		return nil, err
	}
	ctx := &socks5.AuthContext{Method: socks5.NoAuth, Payload: map[string]string{}}
	br, ok := r.(*bufio.Reader)
	if !ok {
		return ctx, nil
	}
	head, err := br.Peek(2)
	if err != nil {
		return nil, err
	}
	if head[0] == 5 && head[1] == socks5.AssociateCommand {
		a.s.associate(a.c, br)
		return nil, errAssociated
	}
	return ctx, nil
}

// SOCKS replies (RFC 1928 §6).
const (
	repSucceeded    = 0
	repFailure      = 1
	repNotSupported = 7
)

// reply writes a SOCKS reply with bound address bnd (0.0.0.0:0 when not
// valid).
func reply(w io.Writer, rep byte, bnd netip.AddrPort) error {
	b := []byte{5, rep, 0}
	if !bnd.IsValid() {
		bnd = netip.AddrPortFrom(netip.IPv4Unspecified(), 0)
	}
	if a := bnd.Addr(); a.Is6() && !a.Is4In6() {
		b = append(append(b, 4), a.AsSlice()...)
	} else {
		a4 := a.Unmap().As4()
		b = append(append(b, 1), a4[:]...)
	}
	_, err := w.Write(binary.BigEndian.AppendUint16(b, bnd.Port()))
	return err
}

// associate serves one UDP ASSOCIATE on client connection c, its request
// still unread in br, until c ends.
func (s *Server) associate(c net.Conn, br *bufio.Reader) {
	req, err := socks5.NewRequest(br)
	if err != nil {
		s.log.Info("bad SOCKS UDP ASSOCIATE request", "err", err)
		return
	}
	if s.opts.UDP == nil {
		s.log.Info("refused: UDP ASSOCIATE is not served here")
		reply(c, repNotSupported, netip.AddrPort{})
		return
	}
	local, _ := c.LocalAddr().(*net.TCPAddr)
	remote, _ := c.RemoteAddr().(*net.TCPAddr)
	if local == nil || remote == nil {
		reply(c, repFailure, netip.AddrPort{})
		return
	}
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: local.IP})
	if err != nil {
		s.log.Warn("UDP ASSOCIATE: could not open its socket", "err", err)
		reply(c, repFailure, netip.AddrPort{})
		return
	}
	defer pc.Close()
	bnd := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	u := &udpAssoc{s: s, pc: pc, clientIP: remote.AddrPort().Addr().Unmap(), hdrs: make(map[dest][]byte)}
	if req.DestAddr != nil && req.DestAddr.Port != 0 {
		u.clientPort = uint16(req.DestAddr.Port)
	}
	assoc, err := s.opts.UDP(u.answer)
	if err != nil {
		s.log.Warn("UDP ASSOCIATE: could not open the association", "err", err)
		reply(c, repFailure, netip.AddrPort{})
		return
	}
	defer assoc.Close()
	u.assoc = assoc
	s.mu.Lock()
	s.udpPorts[bnd.Port()]++
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		if s.udpPorts[bnd.Port()]--; s.udpPorts[bnd.Port()] <= 0 {
			delete(s.udpPorts, bnd.Port())
		}
		s.mu.Unlock()
	}()
	c.SetDeadline(time.Time{})
	if err := reply(c, repSucceeded, bnd); err != nil {
		return
	}
	s.log.Debug("UDP association open", "client", remote, "relay", bnd)
	done := make(chan struct{})
	go func() { // the association lives as long as its TCP connection
		defer close(done)
		io.Copy(io.Discard, br)
		pc.Close()
	}()
	u.serve()
	c.Close()
	<-done
}

// ListensUDP reports whether a UDP association's socket is on port: a
// peer's datagrams to that local port would speak as this party's client.
func (s *Server) ListensUDP(port uint16) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.udpPorts[port] > 0
}

// dest is a destination of an association's datagrams.
type dest struct {
	pid  int
	port uint16
}

// udpAssoc is one client's association.
type udpAssoc struct {
	s          *Server
	pc         *net.UDPConn
	assoc      UDPAssoc
	clientIP   netip.Addr
	clientPort uint16 // 0 until known

	mu     sync.Mutex // guards client and hdrs
	client netip.AddrPort
	hdrs   map[dest][]byte // each destination's header, as the client wrote it
}

// serve carries the client's datagrams until the socket closes.
func (u *udpAssoc) serve() {
	buf := make([]byte, 65535)
	for {
		n, from, err := u.pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		if from.Addr() != u.clientIP || u.clientPort != 0 && from.Port() != u.clientPort { // serve alone writes clientPort
			continue // RFC 1928: only the client's datagrams
		}
		host, port, hlen, err := parseUDPHeader(buf[:n])
		if err != nil {
			u.s.quiet.Warn("udp-header", "dropped a SOCKS UDP datagram", "err", err)
			continue
		}
		pid, isPeer := u.s.peerOf(host, port)
		switch {
		case !isPeer:
			u.s.quiet.Warn("udp-direct", "dropped a SOCKS UDP datagram to a destination outside the peers: only peers' UDP is carried", "dest", net.JoinHostPort(host, strconv.Itoa(int(port))))
			continue
		case pid != u.s.opts.Self && u.s.opts.PeerAllows != nil && !u.s.opts.PeerAllows(pid, port):
			u.s.quiet.Warn("udp-allow:"+strconv.Itoa(pid)+":"+strconv.Itoa(int(port)), "dropped a SOCKS UDP datagram: the peer does not allow the port", "peer", pid, "port", port)
			continue
		}
		d := dest{pid, port}
		u.mu.Lock()
		u.client, u.clientPort = from, from.Port()
		if _, ok := u.hdrs[d]; !ok && len(u.hdrs) < maxUDPDests {
			u.hdrs[d] = append([]byte{0, 0, 0}, buf[3:hlen]...)
		}
		u.mu.Unlock()
		if err := u.assoc.Send(pid, port, buf[hlen:n]); err != nil {
			u.s.log.Debug("SOCKS UDP datagram not sent", "peer", pid, "port", port, "err", err)
		}
	}
}

// maxUDPDests bounds an association's remembered headers (dgram.MaxDests
// bounds its destinations).
const maxUDPDests = 256

// answer sends a peer port's datagram to the client, with the header of
// that destination.
func (u *udpAssoc) answer(pid int, port uint16, data []byte) {
	u.mu.Lock()
	hdr, client := u.hdrs[dest{pid, port}], u.client
	u.mu.Unlock()
	if hdr == nil || !client.IsValid() {
		return
	}
	b := make([]byte, 0, len(hdr)+len(data))
	u.pc.WriteToUDPAddrPort(append(append(b, hdr...), data...), client)
}

// Errors of parseUDPHeader.
var (
	errUDPShort    = errors.New("SOCKS UDP datagram shorter than its header")
	errUDPFragment = errors.New("SOCKS UDP fragments are not supported (FRAG is not 0)")
	errUDPAddrType = errors.New("SOCKS UDP datagram with an unknown address type")
	errUDPPort     = errors.New("SOCKS UDP datagram to port 0")
)

// parseUDPHeader reads RFC 1928 §7's header: RSV (2) | FRAG | ATYP |
// DST.ADDR | DST.PORT, and returns the destination and the header's length.
func parseUDPHeader(b []byte) (host string, port uint16, n int, err error) {
	if len(b) < 4 {
		return "", 0, 0, errUDPShort
	}
	if b[2] != 0 {
		return "", 0, 0, errUDPFragment
	}
	switch b[3] {
	case 1:
		n = 4 + 4
		if len(b) < n+2 {
			return "", 0, 0, errUDPShort
		}
		host = netip.AddrFrom4([4]byte(b[4:8])).String()
	case 4:
		n = 4 + 16
		if len(b) < n+2 {
			return "", 0, 0, errUDPShort
		}
		host = netip.AddrFrom16([16]byte(b[4:20])).Unmap().String()
	case 3:
		if len(b) < 5 {
			return "", 0, 0, errUDPShort
		}
		n = 5 + int(b[4])
		if len(b) < n+2 {
			return "", 0, 0, errUDPShort
		}
		host = string(b[5:n])
		if host == "" {
			return "", 0, 0, fmt.Errorf("%w: an empty name", errUDPAddrType)
		}
	default:
		return "", 0, 0, fmt.Errorf("%w: %d", errUDPAddrType, b[3])
	}
	port = binary.BigEndian.Uint16(b[n : n+2])
	if port == 0 {
		return "", 0, 0, errUDPPort
	}
	return host, port, n + 2, nil
}
