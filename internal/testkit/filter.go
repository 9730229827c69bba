package testkit

import (
	"net"
	"net/netip"
	"sync"
)

// FilterConn is a UDP socket as a test double of the network beyond it,
// in the manner of wireguard-go's bindtest: per remote address it drops
// packets both ways (a firewall that blocks UDP), drops those larger than
// a size both ways (a path whose MTU shrank, with no ICMP), drops those
// that begin with a byte (a middlebox that passes only QUIC), or holds every
// write until released (a stalled network, or a kernel queue that never
// drains).
// Everything else passes. The code under test gets it where it takes a
// net.PacketConn; no production struct carries a knob for it.
type FilterConn struct {
	net.PacketConn

	mu      sync.Mutex // guards dropped, leading, stalled, maxSize, largest
	largest int        // the largest packet written or read
	dropped map[netip.AddrPort]bool
	leading [256]uint8 // dropOut, dropIn
	stalled map[netip.AddrPort]<-chan struct{}
	maxSize map[netip.AddrPort]int
}

// NewFilterConn wraps pc; it passes everything until told otherwise.
func NewFilterConn(pc net.PacketConn) *FilterConn {
	return &FilterConn{PacketConn: pc, dropped: make(map[netip.AddrPort]bool), stalled: make(map[netip.AddrPort]<-chan struct{}),
		maxSize: make(map[netip.AddrPort]int)}
}

// MaxSize drops every packet to and from ap larger than n bytes of UDP
// payload; zero lifts it.
func (f *FilterConn) MaxSize(ap netip.AddrPort, n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if n == 0 {
		delete(f.maxSize, ap)
	} else {
		f.maxSize[ap] = n
	}
}

// Largest is the size of the largest packet written or read so far.
func (f *FilterConn) Largest() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.largest
}

// Directions of DropLeading.
const (
	dropOut = 1 << iota
	dropIn
)

// passes reports whether packet b to or from ap (way: dropOut or dropIn)
// goes through.
func (f *FilterConn) passes(ap netip.AddrPort, b []byte, way uint8) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	max := f.maxSize[ap]
	return !f.dropped[ap] && (max == 0 || len(b) <= max) && (len(b) == 0 || f.leading[b[0]]&way == 0)
}

// DropLeading drops every packet whose first byte is first, written and
// read, while on.
func (f *FilterConn) DropLeading(first byte, on bool) { f.dropLeading(first, dropOut|dropIn, on) }

// DropLeadingOut drops every packet written whose first byte is first,
// while on (a one-way filter).
func (f *FilterConn) DropLeadingOut(first byte, on bool) { f.dropLeading(first, dropOut, on) }

func (f *FilterConn) dropLeading(first, way byte, on bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if on {
		f.leading[first] |= way
	} else {
		f.leading[first] &^= way
	}
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

// WriteTo sends b to addr unless the filter drops it; it waits first while
// addr is stalled.
func (f *FilterConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	ap := addrPort(addr)
	f.mu.Lock()
	release := f.stalled[ap]
	f.largest = max(f.largest, len(b))
	f.mu.Unlock()
	if release != nil {
		<-release
	}
	if !f.passes(ap, b, dropOut) {
		return len(b), nil
	}
	return f.PacketConn.WriteTo(b, addr)
}

// ReadFrom returns the next packet the filter lets through.
func (f *FilterConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		n, addr, err := f.PacketConn.ReadFrom(b)
		if err != nil {
			return n, addr, err
		}
		f.mu.Lock()
		f.largest = max(f.largest, n)
		f.mu.Unlock()
		if f.passes(addrPort(addr), b[:n], dropIn) {
			return n, addr, nil
		}
	}
}
