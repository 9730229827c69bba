package config

import (
	"errors"
	"fmt"
	"net/netip"
)

// DefaultPeersCIDR is the virtual range whose base + N is party N.
const DefaultPeersCIDR = "10.0.0.0/24"

// MaxCandidates is how many addresses a party may publish.
const MaxCandidates = 16

// IsLoopbackHost reports whether a URL's host name is this machine:
// localhost or a loopback address.
func IsLoopbackHost(h string) bool {
	if h == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(h)
	return err == nil && a.IsLoopback()
}

// AddrPolicy says which addresses may stand as a party's candidates.
type AddrPolicy struct {
	// Loopback allows loopback addresses: only where every party runs on
	// one machine (a registry or a socket on loopback), as in the demo.
	Loopback bool
	// Virtual is the virtual range of the sidecar (--peers-cidr): its
	// addresses never leave the process, so a candidate inside it is bogus.
	Virtual netip.Prefix
}

// ErrBadCandidate is wrapped by every refusal of CheckCandidate.
var ErrBadCandidate = errors.New("not usable as a candidate")

// CheckCandidate reports why a is not an address peers should send to:
// a member who publishes loopback, multicast, broadcast, link-local (cloud
// metadata at 169.254.169.254 among them) or virtual addresses would turn
// every other party's checks into a packet cannon aimed at its own machine
// or network.
func (p AddrPolicy) CheckCandidate(a netip.AddrPort) error {
	ip := a.Addr().Unmap()
	why := ""
	switch {
	case !a.IsValid() || a.Port() == 0:
		why = "want a concrete IP:PORT"
	case ip.IsUnspecified():
		why = "unspecified address"
	case ip.IsLoopback() && !p.Loopback:
		why = "loopback address"
	case ip.IsMulticast():
		why = "multicast address"
	case ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		why = "broadcast address"
	case ip.IsLinkLocalUnicast():
		why = "link-local address"
	case p.Virtual.IsValid() && p.Virtual.Contains(ip):
		why = fmt.Sprintf("inside the virtual range %v", p.Virtual)
	default:
		return nil
	}
	return fmt.Errorf("%v: %s: %w", a, why, ErrBadCandidate)
}
