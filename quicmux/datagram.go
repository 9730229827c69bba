package quicmux

import "fmt"

// The datagram kinds carried for Options.Datagram (UDP through the tunnel,
// package dgram); the kinds below are quicmux's own.
const (
	DatagramKindMin = 0x10
	DatagramKindMax = 0x1f
)

// SendDatagram sends b, whose first byte is a kind from DatagramKindMin to
// DatagramKindMax, to peer pid as one QUIC datagram on its primary
// connection, direct or relayed: unreliable, as UDP is. It does not wait:
// with no connection that carries datagrams it fails with ErrNoPath, and a datagram larger than
// the connection carries fails with a *quic.DatagramTooLargeError.
func (m *Mux) SendDatagram(pid int, b []byte) error {
	if len(b) == 0 || b[0] < DatagramKindMin || b[0] > DatagramKindMax {
		return fmt.Errorf("quicmux: datagram kind %#x is not an application kind", firstByte(b))
	}
	p := m.peer(pid)
	if p == nil {
		return fmt.Errorf("peer %d: %w", pid, ErrNoPath)
	}
	l := p.dg.get(m.datagramLink, pid)
	if l == nil {
		return fmt.Errorf("peer %d: %w", pid, ErrNoPath)
	}
	return l.conn.SendDatagram(b)
}

func firstByte(b []byte) byte {
	if len(b) == 0 {
		return 0
	}
	return b[0]
}

// datagramLink is peer pid's connection that carries datagrams now: its
// primary, direct or relayed; nil when there is none.
func (m *Mux) datagramLink(pid int) *link {
	p := m.peer(pid)
	if p == nil {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	l := p.pool.primary
	if l == nil || !l.datagrams || !p.path.state.Connected() {
		return nil
	}
	return l
}
