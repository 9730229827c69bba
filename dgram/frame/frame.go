// Package frame is the wire format of UDP carried through the tunnel: each
// datagram rides one QUIC datagram (RFC 9221) on the authenticated
// connection to the peer, with a header naming its association and the
// peer's local port.
//
//	kind (1) | association (8) | port (2) | payload
//
// KindTo goes to the party whose port it names; KindBack is a datagram
// that port sent back; KindRefused (no payload but a reason byte) says the
// party will not carry the association to that port; KindClose (no
// payload) says the association ended, so its socket there can close.
package frame

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Frame kinds. quicmux hands this range (0x10 to 0x1f) to its
// Options.Datagram.
const (
	KindTo      = 0x10
	KindBack    = 0x11
	KindRefused = 0x12
	KindClose   = 0x13
)

// HeaderLen is the header's size before the payload.
const HeaderLen = 11

// Reasons of a KindRefused frame.
const (
	RefusedNotAllowed = 1 // the port is not open to this peer (--allow-ports)
	RefusedOverBudget = 2 // the peer has as many associations here as it may
)

// Frame is one carried datagram.
type Frame struct {
	Kind  byte
	Assoc uint64
	Port  uint16
	Data  []byte // the payload; for KindRefused, one reason byte
}

// Errors of Parse.
var (
	ErrShort = errors.New("datagram frame shorter than its header")
	ErrKind  = errors.New("not a datagram frame kind")
	ErrPort  = errors.New("datagram frame for port 0")
)

// Append appends f's encoding to b.
func Append(b []byte, f Frame) []byte {
	b = append(b, f.Kind)
	b = binary.BigEndian.AppendUint64(b, f.Assoc)
	b = binary.BigEndian.AppendUint16(b, f.Port)
	return append(b, f.Data...)
}

// Parse reads a frame from b; its Data aliases b.
func Parse(b []byte) (Frame, error) {
	if len(b) < HeaderLen {
		return Frame{}, fmt.Errorf("%w: %d bytes", ErrShort, len(b))
	}
	f := Frame{Kind: b[0], Assoc: binary.BigEndian.Uint64(b[1:9]), Port: binary.BigEndian.Uint16(b[9:11]), Data: b[HeaderLen:]}
	switch {
	case f.Kind < KindTo || f.Kind > KindClose:
		return Frame{}, fmt.Errorf("%w: %#x", ErrKind, f.Kind)
	case f.Port == 0:
		return Frame{}, ErrPort
	case f.Kind == KindRefused && len(f.Data) != 1:
		return Frame{}, fmt.Errorf("%w: a refusal carries one reason byte, not %d", ErrShort, len(f.Data))
	case f.Kind == KindClose && len(f.Data) != 0:
		return Frame{}, fmt.Errorf("%w: a close carries nothing, not %d bytes", ErrKind, len(f.Data))
	}
	return f, nil
}
