package testkit

import (
	"net"
	"sync"
	"time"
)

// DelayConn is a UDP socket at the end of a long path: every packet it
// writes leaves d later, in order. Reads are the socket's own.
type DelayConn struct {
	net.PacketConn
	d    time.Duration
	q    chan delayed
	done chan struct{}
	once sync.Once
}

type delayed struct {
	b   []byte
	to  net.Addr
	due time.Time
}

// NewDelayConn wraps pc; Close stops it and closes pc.
func NewDelayConn(pc net.PacketConn, d time.Duration) *DelayConn {
	c := &DelayConn{PacketConn: pc, d: d, q: make(chan delayed, 4096), done: make(chan struct{})}
	go c.run()
	return c
}

func (c *DelayConn) run() {
	for {
		select {
		case <-c.done:
			return
		case p := <-c.q:
			time.Sleep(time.Until(p.due))
			c.PacketConn.WriteTo(p.b, p.to)
		}
	}
}

// WriteTo queues b for addr; a full queue drops it, as a router would.
func (c *DelayConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	select {
	case c.q <- delayed{b: append([]byte(nil), b...), to: addr, due: time.Now().Add(c.d)}:
	default:
	}
	return len(b), nil
}

// Close stops the delayed writes and closes the socket.
func (c *DelayConn) Close() error {
	c.once.Do(func() { close(c.done) })
	return c.PacketConn.Close()
}
