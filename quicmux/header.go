package quicmux

import (
	"errors"
	"fmt"
	"io"
)

// The stream protocol. The opener of a stream writes a request header, the
// acceptor answers with a reply; then a connect stream carries the TCP bytes
// and a ping stream ends.
//
//	request: version (1 byte, 1) | kind (1 byte) | port (2 bytes, big endian)
//	reply:   version (1 byte, 1) | status (1 byte)
const (
	headerVersion = 1
	requestLen    = 4
	replyLen      = 2
)

// Kind is what a stream is for.
type Kind byte

// Kinds.
const (
	KindConnect    Kind = 0 // a tunnelled TCP connection to the port
	KindPing       Kind = 1 // answered at once, to measure the round trip
	KindPathNotice Kind = 2 // the dialer moved the connection to the direct path
)

// Status is the acceptor's answer to a stream request.
type Status byte

// Statuses.
const (
	StatusOK          Status = 0
	StatusRefused     Status = 1 // nothing listens on that port
	StatusNotAllowed  Status = 2 // the port is not in the acceptor's --allow-ports
	StatusUnreachable Status = 3 // the local dial failed otherwise
	StatusBadRequest  Status = 4 // unknown header version
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
	}
	return fmt.Sprintf("status %d", byte(s))
}

// Errors of the stream protocol.
var (
	ErrVersion = errors.New("unsupported stream header version")
	// ErrRefused carries "refused" in its text: armon/go-socks5 maps dial
	// errors to reply codes by their text.
	ErrRefused     = errors.New("connection refused by peer's local port")
	ErrNotAllowed  = errors.New("port not allowed by peer")
	ErrUnreachable = errors.New("peer could not reach its local port")
)

// AppendRequest appends a request header.
func AppendRequest(b []byte, k Kind, port uint16) []byte {
	return append(b, headerVersion, byte(k), byte(port>>8), byte(port))
}

// ErrKind is returned for a request kind this version does not know.
var ErrKind = errors.New("unknown stream kind")

// ParseRequest decodes a request header.
func ParseRequest(b []byte) (k Kind, port uint16, err error) {
	if len(b) < requestLen {
		return 0, 0, io.ErrUnexpectedEOF
	}
	if b[0] != headerVersion {
		return 0, 0, fmt.Errorf("%w %d", ErrVersion, b[0])
	}
	k = Kind(b[1])
	if k > KindPathNotice {
		return 0, 0, fmt.Errorf("%w %d", ErrKind, b[1])
	}
	return k, uint16(b[2])<<8 | uint16(b[3]), nil
}

// AppendReply appends a reply.
func AppendReply(b []byte, s Status) []byte { return append(b, headerVersion, byte(s)) }

// ParseReply decodes a reply into nil (ok) or the error it stands for.
func ParseReply(b []byte) error {
	if len(b) < replyLen {
		return io.ErrUnexpectedEOF
	}
	if b[0] != headerVersion {
		return fmt.Errorf("%w %d", ErrVersion, b[0])
	}
	switch Status(b[1]) {
	case StatusOK:
		return nil
	case StatusRefused:
		return ErrRefused
	case StatusNotAllowed:
		return ErrNotAllowed
	case StatusUnreachable:
		return ErrUnreachable
	}
	return fmt.Errorf("peer answered %v", Status(b[1]))
}
