// Package header is the wire format of quicmux's streams: the request
// the opener of a stream writes, and the reply the acceptor answers with.
// It is pure: no sockets, no goroutines; every field is checked before it
// is used (a version, a kind this version knows, whole lengths).
package header

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"syscall"
)

// The stream protocol. The opener of a stream writes a request, the
// acceptor answers with a reply; then a connect or resume stream carries
// the flow's frames (package flow), and the other kinds end.
//
//	request: version (1 byte, 2) | kind (1) | port (2, big endian) | flow (8) | rcvd (8)
//	reply:   version (1 byte, 2) | status (1) | rcvd (8)
//
// flow is the flow's id (connect, resume) or the sender's boot id (hello);
// rcvd is how much of the flow the sender has received (resume), or the
// acceptor's boot id in a hello's reply. A relay or offer request holds a
// party id in port and a session id in flow and rcvd.
const (
	headerVersion = 2
	// RequestLen and ReplyLen are the encoded sizes.
	RequestLen = 20
	ReplyLen   = 10
)

// Kind is what a stream is for.
type Kind byte

// Kinds.
const (
	KindConnect    Kind = 0 // a new flow: a tunnelled TCP connection to the port
	KindPing       Kind = 1 // answered at once, to measure the round trip
	KindPathNotice Kind = 2 // the dialer moved the connection to the direct path
	KindResume     Kind = 3 // a flow goes on over this stream
	KindHello      Kind = 4 // the first stream of a connection: who is here (boot ids)
	// KindRelay asks the acceptor to relay a session (flow and rcvd: its
	// id) to party port; KindRelayOffer offers the acceptor a session with
	// party port, relayed by the opener (quicmux's peerrelay.go).
	KindRelay      Kind = 5
	KindRelayOffer Kind = 6
	// KindRelayVia asks the acceptor for its hop of a route of two relays
	// to party port (flow and rcvd: the session's id); a Route follows the
	// request on the stream.
	KindRelayVia Kind = 7
)

// RouteLen is the size of a Route.
const RouteLen = 20

// Route follows a KindRelayVia request: Next is the relay after the
// acceptor (the far end itself when the acceptor is the last relay, or
// is the far end), Origin the party the session is for, and MAC the
// origin's proof to the far end that it asked for this session (keyed
// with a key only the two ends hold; the relays pass it on).
type Route struct {
	Next, Origin uint16
	MAC          [16]byte
}

// Append appends r's encoding to b.
func (r Route) Append(b []byte) []byte {
	b = binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(b, r.Next), r.Origin)
	return append(b, r.MAC[:]...)
}

// ParseRoute reads a Route.
func ParseRoute(b []byte) (Route, error) {
	if len(b) < RouteLen {
		return Route{}, io.ErrUnexpectedEOF
	}
	return Route{Next: binary.BigEndian.Uint16(b[0:2]), Origin: binary.BigEndian.Uint16(b[2:4]), MAC: [16]byte(b[4:20])}, nil
}

// Request is a stream's header.
type Request struct {
	Kind Kind
	Port uint16
	Flow uint64
	Rcvd uint64
}

// Status is the acceptor's answer to a stream request.
type Status byte

// Statuses.
const (
	StatusOK          Status = 0
	StatusRefused     Status = 1 // nothing listens on that port
	StatusNotAllowed  Status = 2 // the port is not in the acceptor's --allow-ports
	StatusUnreachable Status = 3 // the local dial failed otherwise
	StatusBadRequest  Status = 4 // unknown header version
	StatusUnknownFlow Status = 5 // resume of a flow the acceptor does not have (it restarted)
	StatusFlowDone    Status = 6 // resume of a flow that ended cleanly
	StatusFlowReset   Status = 7 // resume of a flow that was reset
	StatusOverBudget  Status = 8 // the acceptor's budget for this peer is spent
	StatusDraining    Status = 9 // a new flow on a connection being replaced: open it on the newer one
)

func (s Status) String() string {
	switch s {
	case StatusOK:
		return "ok"
	case StatusRefused:
		return "connection refused"
	case StatusNotAllowed:
		return "port not allowed"
	case StatusUnreachable:
		return "host unreachable"
	case StatusBadRequest:
		return "bad request"
	case StatusUnknownFlow:
		return "unknown flow"
	case StatusFlowDone:
		return "flow done"
	case StatusFlowReset:
		return "flow reset"
	case StatusOverBudget:
		return "over budget"
	case StatusDraining:
		return "connection draining"
	}
	return fmt.Sprintf("status %d", byte(s))
}

// Reply is the acceptor's answer.
type Reply struct {
	Status Status
	Rcvd   uint64
}

// Errors of the stream protocol.
var (
	ErrVersion = errors.New("unsupported stream header version")
	// ErrRefused and ErrOverBudget are refusals: they match
	// syscall.ECONNREFUSED with errors.Is, as a refused local dial does.
	ErrRefused     error = Refusal("connection refused by peer's local port")
	ErrNotAllowed        = errors.New("port not allowed by peer")
	ErrUnreachable       = errors.New("peer could not reach its local port")
	ErrOverBudget  error = Refusal("this party has spent its budget at the peer (too many tunnelled connections open or waiting there); new ones are refused until some close")
	// ErrKind is returned for a request kind this version does not know.
	ErrKind = errors.New("unknown stream kind")
)

// Append appends the request's encoding.
func (r Request) Append(b []byte) []byte {
	b = append(b, headerVersion, byte(r.Kind), byte(r.Port>>8), byte(r.Port))
	return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(b, r.Flow), r.Rcvd)
}

// ParseRequest decodes a request header.
func ParseRequest(b []byte) (Request, error) {
	if len(b) < 1 {
		return Request{}, io.ErrUnexpectedEOF
	}
	if b[0] != headerVersion {
		return Request{}, fmt.Errorf("%w %d", ErrVersion, b[0])
	}
	if len(b) < RequestLen {
		return Request{}, io.ErrUnexpectedEOF
	}
	r := Request{Kind: Kind(b[1]), Port: binary.BigEndian.Uint16(b[2:4]),
		Flow: binary.BigEndian.Uint64(b[4:12]), Rcvd: binary.BigEndian.Uint64(b[12:20])}
	if r.Kind > KindRelayVia {
		return Request{}, fmt.Errorf("%w %d", ErrKind, b[1])
	}
	return r, nil
}

// Append appends the reply's encoding.
func (r Reply) Append(b []byte) []byte {
	return binary.BigEndian.AppendUint64(append(b, headerVersion, byte(r.Status)), r.Rcvd)
}

// ParseReply decodes a reply.
func ParseReply(b []byte) (Reply, error) {
	if len(b) < 1 {
		return Reply{}, io.ErrUnexpectedEOF
	}
	if b[0] != headerVersion {
		return Reply{}, fmt.Errorf("%w %d", ErrVersion, b[0])
	}
	if len(b) < ReplyLen {
		return Reply{}, io.ErrUnexpectedEOF
	}
	return Reply{Status: Status(b[1]), Rcvd: binary.BigEndian.Uint64(b[2:10])}, nil
}

// Err is nil for StatusOK, else the error the status stands for.
func (r Reply) Err() error {
	switch r.Status {
	case StatusOK:
		return nil
	case StatusRefused:
		return ErrRefused
	case StatusNotAllowed:
		return ErrNotAllowed
	case StatusUnreachable:
		return ErrUnreachable
	case StatusOverBudget:
		return ErrOverBudget
	}
	return fmt.Errorf("peer answered %v", r.Status)
}

// Refusal is an error that means a connection was refused: it matches
// syscall.ECONNREFUSED with errors.Is, so that whoever reports it (a SOCKS
// front) answers "connection refused" at once, as for a refused local
// dial.
type Refusal string

func (r Refusal) Error() string        { return string(r) }
func (r Refusal) Is(target error) bool { return target == syscall.ECONNREFUSED }
