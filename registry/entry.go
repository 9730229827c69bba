// Package registry is the client of the website API where the parties of a
// study publish their candidates and key pins and watch each other's, and a
// reference server of that API for self-hosting, the demo and tests.
package registry

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"time"

	"sfkit-proxy/config"
)

// Candidate kinds, as in ICE.
const (
	KindHost  = "host"  // an address of a local interface
	KindSrflx = "srflx" // the address a STUN server saw (server-reflexive)
	KindRelay = "relay" // a relayed address
)

// Candidate is an address where a party may be reached.
type Candidate struct {
	Kind string         `json:"kind"`
	Addr netip.AddrPort `json:"addr"`
}

// Entry is what one party publishes.
type Entry struct {
	PID int `json:"pid"`
	// Pin is the unpadded base64url SHA-256 of the party's certificate
	// SubjectPublicKeyInfo; peers accept only that key.
	Pin string `json:"pin"`
	// CheckKey is the public half of the party's X25519 check key
	// (unpadded base64url): checks between two parties carry integrity
	// under a key derived from both parties' check keys.
	CheckKey string `json:"check_key"`
	// Instance changes whenever the party restarts.
	Instance   string      `json:"instance"`
	Candidates []Candidate `json:"candidates"`
	NAT        string      `json:"nat,omitempty"`
	AllowPorts string      `json:"allow_ports,omitempty"`
	// Updated is set by the server whenever the party publishes, changed
	// or not: an entry whose party stopped refreshing it goes stale.
	Updated time.Time `json:"updated"`
}

// List is the answer to a GET of a study's parties.
type List struct {
	Version uint64  `json:"version"`
	Parties []Entry `json:"parties"`
	// Now is the server's clock when it answered, to judge Updated by.
	Now time.Time `json:"now,omitzero"`
}

// Fresh returns the entries that their parties refreshed within ttl, by
// the server's clock (all of them when the server does not tell its time).
func (l List) Fresh(ttl time.Duration) []Entry {
	if l.Now.IsZero() {
		return l.Parties
	}
	var out []Entry
	for _, e := range l.Parties {
		if l.Now.Sub(e.Updated) <= ttl {
			out = append(out, e)
		}
	}
	return out
}

// MaxBody limits what an entry's JSON may weigh.
const MaxBody = 16 << 10

// Validate reports the first thing wrong with e, in words a client can act on.
func (e *Entry) Validate() error {
	if e.PID < 0 {
		return errors.New("pid must be 0 or more")
	}
	if b, err := base64.RawURLEncoding.DecodeString(e.Pin); err != nil || len(b) != 32 {
		return errors.New("pin must be the unpadded base64url SHA-256 of the key (43 characters)")
	}
	if b, err := base64.RawURLEncoding.DecodeString(e.CheckKey); err != nil || len(b) != 32 {
		return errors.New("check_key must be the unpadded base64url X25519 public key (43 characters)")
	}
	if len(e.Instance) == 0 || len(e.Instance) > 64 || !printable(e.Instance) {
		return errors.New("instance must be 1 to 64 printable ASCII characters")
	}
	if len(e.Candidates) > config.MaxCandidates {
		return fmt.Errorf("at most %d candidates", config.MaxCandidates)
	}
	for i, c := range e.Candidates {
		switch c.Kind {
		case KindHost, KindSrflx, KindRelay:
		default:
			return fmt.Errorf("candidates[%d].kind %q: want host, srflx or relay", i, c.Kind)
		}
		if !c.Addr.IsValid() || c.Addr.Port() == 0 || c.Addr.Addr().IsUnspecified() {
			return fmt.Errorf("candidates[%d].addr %v: want a concrete IP:PORT", i, c.Addr)
		}
	}
	if len(e.NAT) > 32 || !printable(e.NAT) {
		return errors.New("nat must be at most 32 printable characters")
	}
	if e.AllowPorts != "" {
		if len(e.AllowPorts) > 1024 {
			return errors.New("allow_ports is too long")
		}
		if _, err := config.ParsePorts(e.AllowPorts); err != nil {
			return fmt.Errorf("allow_ports: %v", err)
		}
	}
	return nil
}

// CheckAddrs reports the first candidate that p refuses.
func (e *Entry) CheckAddrs(p config.AddrPolicy) error {
	for i, c := range e.Candidates {
		if err := p.CheckCandidate(c.Addr); err != nil {
			return fmt.Errorf("candidates[%d].addr %w", i, err)
		}
	}
	return nil
}

// DecodeEntry reads one JSON entry, strictly: unknown fields and trailing
// data are errors.
func DecodeEntry(r io.Reader) (Entry, error) {
	var e Entry
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		return Entry{}, fmt.Errorf("bad json: %w", err)
	}
	if dec.More() {
		return Entry{}, errors.New("bad json: trailing data after the object")
	}
	if err := e.Validate(); err != nil {
		return Entry{}, err
	}
	return e, nil
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}
