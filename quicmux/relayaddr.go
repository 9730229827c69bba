package quicmux

import "net/netip"

// relayUp reports whether this party has a TURN allocation now.
func (m *Mux) relayUp() bool { return m.relay != nil && m.relay.relayed().IsValid() }

// SetRelayAddr takes the TURN relay's new relayed address, after it
// allocated again (relay.Renewing: its old allocation was lost, or the
// first came late). Checks through the relay go from it at once; the
// connections that used the old one move as on any path change (their
// paths die and are repaired, the flows resuming), and peers learn the
// new candidate from the registry.
func (m *Mux) SetRelayAddr(addr netip.AddrPort, server string) {
	if m.relay == nil {
		return
	}
	old := m.relay.relayed()
	m.relay.addr.Store(&addr)
	m.log.Info("relayed address changed", "relay", server, "addr", addr, "was", old)
	for _, p := range m.peerList() {
		notify(p.infoCh) // a round of checks now, from the new address too
	}
}
