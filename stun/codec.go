// Package stun speaks the STUN binding protocol (RFC 8489) over a socket that
// it does not own: it learns the external address of the shared UDP socket,
// keeps the NAT mapping alive, checks connectivity to peers with short-term
// integrity keys, and answers peers' checks.
//
// The codec functions in this file are pure: no sockets, no goroutines.
package stun

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	pion "github.com/pion/stun/v3"
)

// TxID is a STUN transaction ID.
type TxID [pion.TransactionIDSize]byte

// NewTxID returns a random transaction ID.
func NewTxID() TxID { return TxID(pion.NewTransactionID()) }

// Is reports whether b looks like a STUN message (RFC 8489 section 6: first
// two bits zero, magic cookie present).
func Is(b []byte) bool { return pion.IsMessage(b) }

// Request encodes a plain binding request, as sent to a STUN server.
func Request(tx TxID) []byte {
	m := pion.MustBuild(pion.BindingRequest, pion.NewTransactionIDSetter(tx), pion.Fingerprint)
	return m.Raw
}

// CheckRequest encodes a connectivity check: a binding request carrying
// USERNAME and a MESSAGE-INTEGRITY keyed with the receiver's check key, as in
// ICE (RFC 8445 section 7.2.2).
func CheckRequest(tx TxID, username, key string) []byte {
	m := pion.MustBuild(pion.BindingRequest, pion.NewTransactionIDSetter(tx),
		pion.NewUsername(username), pion.NewShortTermIntegrity(key), pion.Fingerprint)
	return m.Raw
}

// Response encodes a binding success response telling the requester the
// address its request came from. A non-empty key adds MESSAGE-INTEGRITY.
func Response(tx TxID, mapped netip.AddrPort, key string) []byte {
	setters := []pion.Setter{pion.BindingSuccess, pion.NewTransactionIDSetter(tx),
		&pion.XORMappedAddress{IP: mapped.Addr().AsSlice(), Port: int(mapped.Port())}}
	if key != "" {
		setters = append(setters, pion.NewShortTermIntegrity(key))
	}
	setters = append(setters, pion.Fingerprint)
	return pion.MustBuild(setters...).Raw
}

// Message is a decoded STUN message, reduced to what this package uses.
type Message struct {
	TxID      TxID
	Request   bool           // a binding request; otherwise a success response
	Username  string         // USERNAME, if present
	Mapped    netip.AddrPort // XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS) of a response
	integrity bool           // whether MESSAGE-INTEGRITY is present
	raw       *pion.Message
}

// Errors returned by Parse and Verify.
var (
	ErrNotSTUN      = errors.New("not a stun message")
	ErrUnsupported  = errors.New("unsupported stun message type")
	ErrIntegrity    = errors.New("stun message integrity check failed")
	ErrNoMappedAddr = errors.New("stun response has no mapped address")
)

// Parse decodes a binding request or binding success response. It checks the
// FINGERPRINT when present; integrity is checked separately by Verify, since
// the key depends on who sent the message.
func Parse(b []byte) (*Message, error) {
	if !pion.IsMessage(b) {
		return nil, ErrNotSTUN
	}
	raw := &pion.Message{Raw: append([]byte(nil), b...)}
	if err := raw.Decode(); err != nil {
		return nil, fmt.Errorf("decode stun: %w", err)
	}
	if raw.Contains(pion.AttrFingerprint) {
		if err := pion.Fingerprint.Check(raw); err != nil {
			return nil, fmt.Errorf("stun fingerprint: %w", err)
		}
	}
	m := &Message{TxID: TxID(raw.TransactionID), raw: raw, integrity: raw.Contains(pion.AttrMessageIntegrity)}
	switch raw.Type {
	case pion.BindingRequest:
		m.Request = true
		var u pion.Username
		if err := u.GetFrom(raw); err == nil {
			m.Username = u.String()
		}
	case pion.BindingSuccess:
		var xa pion.XORMappedAddress
		if err := xa.GetFrom(raw); err == nil {
			m.Mapped = addrPort(xa.IP, xa.Port)
		} else {
			var ma pion.MappedAddress
			if err := ma.GetFrom(raw); err == nil {
				m.Mapped = addrPort(ma.IP, ma.Port)
			}
		}
		if !m.Mapped.IsValid() {
			return nil, ErrNoMappedAddr
		}
	default:
		return nil, fmt.Errorf("%w: %v", ErrUnsupported, raw.Type)
	}
	return m, nil
}

// Verify checks the message's MESSAGE-INTEGRITY against key. A message
// without integrity fails.
func (m *Message) Verify(key string) error {
	if !m.integrity {
		return ErrIntegrity
	}
	if err := pion.NewShortTermIntegrity(key).Check(m.raw); err != nil {
		return ErrIntegrity
	}
	return nil
}

func addrPort(ip net.IP, port int) netip.AddrPort {
	a, ok := netip.AddrFromSlice(ip)
	if !ok || port < 0 || port > 65535 {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(a.Unmap(), uint16(port))
}
