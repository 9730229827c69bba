package gateway

import (
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"time"
)

// udpClient is one client address of a UDP gateway and its association.
type udpClient struct {
	*connMeter
	assoc UDPAssoc
	last  atomic.Int64 // unix nanoseconds of the last datagram either way
}

func (c *udpClient) touch() { c.last.Store(time.Now().UnixNano()) }

// serveUDP carries the datagrams of g's clients to its peer's port, each
// client address through an association of its own, until g stops.
func (m *Manager) serveUDP(g *gw) {
	buf := make([]byte, 65535)
	for {
		n, from, err := g.pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			select {
			case <-g.stopped:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			m.log.Debug("gateway read failed", "gateway", g.key, "err", err)
			continue
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		cl, why := g.udpClient(from, m.opts.UDP)
		if cl == nil && why == reasonStopped {
			return
		}
		if cl == nil {
			g.refused[why].Add(1)
			m.log.Debug("gateway refused a UDP client", "gateway", g.key, "from", from, "reason", reasonNames[why])
			continue
		}
		cl.touch()
		if err := cl.assoc.Send(g.spec.PID, g.spec.Port, buf[:n]); err == nil {
			g.toPeer.Add(uint64(n))
			cl.to.Add(uint64(n))
		}
	}
}

// udpClient is from's association, opened when from is new and the
// gateway's limits allow it; else nil and the reason.
func (g *gw) udpClient(from netip.AddrPort, open func(func(int, uint16, []byte)) (UDPAssoc, error)) (*udpClient, int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if cl := g.clients[from]; cl != nil {
		return cl, 0
	}
	select {
	case <-g.stopped: // read as it was removed: stop did not see it
		return nil, reasonStopped
	default:
	}
	if why, ok := g.allowLocked(from.Addr(), len(g.clients)); !ok {
		return nil, why
	}
	cl := &udpClient{connMeter: newConnMeter(from)}
	cl.touch() // not idle before its first datagram
	assoc, err := open(func(pid int, port uint16, data []byte) {
		// Counted before the write: a client that has the datagram sees it
		// counted; one the socket refuses is taken back.
		n := uint64(len(data))
		g.fromPeer.Add(n)
		cl.from.Add(n)
		if _, err := g.pc.WriteToUDPAddrPort(data, from); err != nil {
			g.fromPeer.Add(-n)
			cl.from.Add(-n)
			return
		}
		cl.touch()
	})
	if err != nil {
		return nil, reasonTunnel
	}
	cl.assoc = assoc
	g.clients[from] = cl
	g.total.Add(1)
	g.open.Add(1)
	return cl, 0
}

// expireUDP ends the associations idle past the gateway's idle timeout.
func (g *gw) expireUDP(now time.Time) {
	idle := g.spec.IdleTimeout
	if idle == 0 {
		idle = DefaultUDPIdle
	}
	var ended []*udpClient
	g.mu.Lock()
	for a, cl := range g.clients {
		if now.Sub(time.Unix(0, cl.last.Load())) >= idle {
			delete(g.clients, a)
			ended = append(ended, cl)
		}
	}
	g.mu.Unlock()
	for _, cl := range ended {
		cl.assoc.Close()
		g.open.Add(^uint64(0))
	}
}
