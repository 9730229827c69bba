package testkit

import (
	"net"
	"net/netip"
	"sync"
)

// FilterConn is a UDP socket as a test double of the network beyond it,
// in the manner of wireguard-go's bindtest: per remote address it drops
// packets both ways (a firewall that blocks UDP), or holds every write
// until released (a stalled network, or a kernel queue that never drains).
// Everything else passes. The code under test gets it where it takes a
// net.PacketConn; no production struct carries a knob for it.
type FilterConn struct {
	net.PacketConn

	mu      sync.Mutex // guards dropped, stalled
	dropped map[netip.AddrPort]bool
	stalled map[netip.AddrPort]<-chan struct{}
}

// NewFilterConn wraps pc; it passes everything until told otherwise.
func NewFilterConn(pc net.PacketConn) *FilterConn {
	return &FilterConn{PacketConn: pc, dropped: make(map[netip.AddrPort]bool), stalled: make(map[netip.AddrPort]<-chan struct{})}
}

// Drop drops every packet to and from ap while on.
func (f *FilterConn) Drop(ap netip.AddrPort, on bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if on {
		f.dropped[ap] = true
	} else {
		delete(f.dropped, ap)
	}
}

// Stall holds every write to ap until release is closed; the writes then
// go out.
func (f *FilterConn) Stall(ap netip.AddrPort, release <-chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stalled[ap] = release
}

func addrPort(a net.Addr) netip.AddrPort {
	if ua, ok := a.(*net.UDPAddr); ok {
		ap := ua.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// WriteTo sends b to addr unless addr is dropped; it waits first while
// addr is stalled.
func (f *FilterConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	ap := addrPort(addr)
	f.mu.Lock()
	drop, release := f.dropped[ap], f.stalled[ap]
	f.mu.Unlock()
	if release != nil {
		<-release
	}
	if drop {
		return len(b), nil
	}
	return f.PacketConn.WriteTo(b, addr)
}

// ReadFrom returns the next packet that is not from a dropped address.
func (f *FilterConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		n, addr, err := f.PacketConn.ReadFrom(b)
		if err != nil {
			return n, addr, err
		}
		f.mu.Lock()
		drop := f.dropped[addrPort(addr)]
		f.mu.Unlock()
		if !drop {
			return n, addr, nil
		}
	}
}
