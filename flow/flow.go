// Package flow carries one tunnelled TCP connection over streams that may
// die under it: a flow numbers the bytes it sends, the receiver
// acknowledges what it took in, and the sender keeps what is not yet
// acknowledged (bounded: a full buffer stops the writer, never drops). When
// a stream dies, the flow waits, detached, for its owner to attach a new
// one (on whatever connection works) and both sides go on exactly where
// the other's data stopped: nothing lost, nothing twice. A flow that is
// not resumed within its resume timeout is reset; a reset is carried as a
// reset, never as an end of stream.
//
// A flow knows nothing of QUIC: it is handed a Stream and told what the
// peer has received; the owner does the handshake (see Conn.Attach).
package flow

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// Stream is one attachment of a flow: a reliable, ordered byte stream both
// ways while it lives, such as a QUIC stream.
type Stream interface {
	io.Reader
	io.Writer
	// Close ends our writes after what was written.
	Close() error
	// Abort ends the stream at once, both ways.
	Abort()
}

// ErrReset is what Read and Write return once the flow is reset: the far
// side reset its connection, or the flow could not be resumed in time.
var ErrReset = errors.New("connection reset by the far end of the tunnel")

// Options configure a Conn. Zero values are documented per field.
type Options struct {
	// MaxSend bounds the bytes kept until the peer acknowledges them; a
	// Write waits while it is full. Zero means 4 MiB.
	MaxSend int
	// MaxRecv bounds the bytes received and not yet read; the stream is
	// not read while it is full. Zero means 1 MiB.
	MaxRecv int
	// ResumeTimeout is how long the flow waits detached before it resets;
	// zero means 10 minutes.
	ResumeTimeout time.Duration
	// OnDetach, if set, is called when the stream is lost and the flow
	// waits for a new one.
	OnDetach func()
	// OnDone, if set, is called once when the flow ends: reset or not.
	OnDone func(reset bool)
}

// Status is how a flow answers a resume.
type Status int

// Statuses of Conn.State.
const (
	Live  Status = iota // resumable
	Done                // ended cleanly: everything was delivered both ways
	Reset               // ended by a reset
)

// Conn is a flow, used as a net.Conn by its local end. CloseWrite sends an
// end of stream after what was written; Reset resets both ends.
type Conn struct {
	opts          Options
	local, remote net.Addr

	mu   sync.Mutex // guards everything below
	cond *sync.Cond

	// Send side: the bytes of [sbase, sbase+len(sbuf)) are written and not
	// yet acknowledged; sent is how far the current stream was given them.
	sbuf     []byte
	sbase    uint64
	sent     uint64
	wclosed  bool // CloseWrite: an end of stream follows sbuf
	finSent  bool // on the current stream
	finAcked bool // the peer has our end of stream

	// Receive side: rcvd counts what arrived (its end counting one), acked
	// what we acknowledged on the current stream.
	rbuf  []byte
	rcvd  uint64
	acked uint64
	rfin  bool

	stream    Stream // nil while detached
	gen       uint64 // attachment generation
	resetting bool   // a reset is to be sent
	state     Status
	appClosed bool
	deadlines [2]time.Time // read, write
	timer     *time.Timer  // the resume timeout, while detached
}

// New returns a flow that is detached until Attach.
func New(opts Options, local, remote net.Addr) *Conn {
	if opts.MaxSend == 0 {
		opts.MaxSend = 4 << 20
	}
	if opts.MaxRecv == 0 {
		opts.MaxRecv = 1 << 20
	}
	if opts.ResumeTimeout == 0 {
		opts.ResumeTimeout = 10 * time.Minute
	}
	c := &Conn{opts: opts, local: local, remote: remote}
	c.cond = sync.NewCond(&c.mu)
	return c
}

// State reports whether the flow can be resumed, and what it received:
// the offset a resume tells the peer.
func (c *Conn) State() (Status, uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state, c.rcvd
}

// Detach lets go of the current stream (aborting it), so that a resume
// can read a stable State; it is what a lost stream does too.
func (c *Conn) Detach() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.detachLocked()
}

func (c *Conn) detachLocked() {
	if c.stream != nil {
		c.stream.Abort()
		c.stream = nil
	}
	c.gen++
	c.cond.Broadcast()
}

// Attach carries the flow over s from now on. peerRcvd is how much of our
// data (and end of stream) the peer has received: the flow resends from
// there. A peer that claims to have lost acknowledged data, or received
// more than was sent, breaks the protocol: the flow resets.
func (c *Conn) Attach(s Stream, peerRcvd uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state != Live {
		s.Abort()
		return
	}
	c.detachLocked()
	if c.timer != nil {
		c.timer.Stop()
		c.timer = nil
	}
	end := c.sbase + uint64(len(c.sbuf))
	if peerRcvd < c.sbase || peerRcvd > end+1 || peerRcvd == end+1 && !c.wclosed {
		c.resetting = true
	} else {
		c.ackLocked(peerRcvd)
	}
	c.stream, c.sent, c.finSent, c.acked = s, c.sbase, c.finAcked, c.rcvd
	g := c.gen
	go c.writeLoop(s, g)
	go c.readLoop(s, g)
}

// ackLocked takes in that the peer received our bytes up to off.
func (c *Conn) ackLocked(off uint64) {
	if off > c.sbase {
		n := min(off-c.sbase, uint64(len(c.sbuf)))
		c.sbuf = c.sbuf[n:]
		c.sbase += n
		if len(c.sbuf) == 0 {
			c.sbuf = nil // an idle flow holds no buffer
		}
		if off > c.sbase && c.wclosed {
			c.finAcked = true
		}
		c.cond.Broadcast()
	}
}

// lost detaches the flow from stream generation g, if still attached to
// it, and starts the resume timeout.
func (c *Conn) lost(g uint64) {
	c.mu.Lock()
	if c.gen != g || c.state != Live {
		c.mu.Unlock()
		return
	}
	c.detachLocked()
	c.timer = time.AfterFunc(c.opts.ResumeTimeout, func() {
		c.mu.Lock()
		if c.stream == nil && c.state == Live {
			c.endLocked(Reset)
		}
		c.mu.Unlock()
	})
	c.mu.Unlock()
	if c.opts.OnDetach != nil {
		c.opts.OnDetach()
	}
}

// endLocked ends the flow; OnDone runs without the lock.
func (c *Conn) endLocked(s Status) {
	if c.state != Live {
		return
	}
	c.state = s
	if s == Reset {
		c.rbuf, c.sbuf = nil, nil
	}
	if c.timer != nil {
		c.timer.Stop()
	}
	c.cond.Broadcast()
	if c.opts.OnDone != nil {
		go c.opts.OnDone(s == Reset)
	}
}

// doneLocked reports whether both directions are complete: our end of
// stream acknowledged, theirs received and acknowledged.
func (c *Conn) doneLocked() bool {
	return c.finAcked && c.rfin && c.acked == c.rcvd
}

// writeLoop sends data, end of stream, acknowledgements and resets on s
// while it is the flow's stream.
func (c *Conn) writeLoop(s Stream, g uint64) {
	hdr := make([]byte, 0, 9)
	for {
		c.mu.Lock()
		var data []byte
		hdr = hdr[:0]
		closeAfter, resetAfter := false, false
		for {
			if c.gen != g {
				c.mu.Unlock()
				return
			}
			if c.resetting {
				hdr = append(hdr, frameReset)
				resetAfter = true
				break
			}
			if c.state == Reset {
				c.mu.Unlock()
				s.Abort()
				return
			}
			if c.acked < c.rcvd {
				hdr = appendAck(hdr, c.rcvd)
				c.acked = c.rcvd
			}
			if end := c.sbase + uint64(len(c.sbuf)); c.sent < end {
				from := c.sent - c.sbase
				data = c.sbuf[from : from+min(end-c.sent, MaxData)]
				hdr = appendData(hdr, len(data))
				c.sent += uint64(len(data))
				break
			}
			if c.wclosed && !c.finSent {
				hdr = append(hdr, frameFin)
				c.finSent = true
				break
			}
			if len(hdr) > 0 {
				break
			}
			if c.doneLocked() {
				c.endLocked(Done)
				closeAfter = true
				break
			}
			c.cond.Wait()
		}
		c.mu.Unlock()
		var err error
		if len(hdr) > 0 {
			_, err = s.Write(hdr)
		}
		if err == nil && len(data) > 0 {
			_, err = s.Write(data)
		}
		switch {
		case err != nil:
			c.lost(g)
			return
		case resetAfter:
			s.Close()
			c.mu.Lock()
			c.endLocked(Reset)
			c.mu.Unlock()
			return
		case closeAfter:
			s.Close()
			return
		}
	}
}

// readLoop takes in frames from s while it is the flow's stream.
func (c *Conn) readLoop(s Stream, g uint64) {
	var scratch [9]byte
	for {
		f, err := readFrame(s, &scratch)
		if err != nil {
			c.mu.Lock()
			if err == io.EOF && c.gen == g && c.doneLocked() {
				// The peer closed its side after our last acknowledgement.
				c.endLocked(Done)
			}
			live := c.state == Live
			c.mu.Unlock()
			if live {
				c.lost(g)
			}
			return
		}
		var data []byte
		if f.typ == frameData {
			data = make([]byte, f.n)
			if _, err := io.ReadFull(s, data); err != nil {
				c.lost(g)
				return
			}
		}
		c.mu.Lock()
		if c.gen != g {
			c.mu.Unlock()
			return
		}
		switch f.typ {
		case frameData:
			if c.rfin {
				c.resetting = true // data after the end: a broken peer
				break
			}
			for len(c.rbuf) >= c.opts.MaxRecv && c.gen == g && c.state == Live && !c.appClosed {
				c.cond.Wait()
			}
			if c.gen != g {
				c.mu.Unlock()
				return
			}
			if c.appClosed {
				c.resetting = true // data for a closed connection: as TCP, reset
				break
			}
			c.rbuf = append(c.rbuf, data...)
			c.rcvd += uint64(len(data))
		case frameAck:
			c.ackLocked(f.ack)
		case frameFin:
			if !c.rfin {
				c.rfin = true
				c.rcvd++
			}
		case frameReset:
			c.endLocked(Reset)
			c.mu.Unlock()
			s.Abort()
			return
		}
		c.cond.Broadcast()
		c.mu.Unlock()
	}
}

// Read reads what the peer sent: io.EOF after its end of stream, ErrReset
// once the flow is reset.
func (c *Conn) Read(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(c.rbuf) == 0 && !c.rfin && c.state != Reset && !c.appClosed {
		if err := c.waitLocked(0); err != nil {
			return 0, err
		}
	}
	switch {
	case len(c.rbuf) > 0:
		n := copy(b, c.rbuf)
		c.rbuf = c.rbuf[n:]
		if len(c.rbuf) == 0 {
			c.rbuf = nil
		}
		c.cond.Broadcast()
		return n, nil
	case c.state == Reset:
		return 0, ErrReset
	case c.appClosed:
		return 0, net.ErrClosed
	}
	return 0, io.EOF
}

// Write queues b for the peer, waiting while the buffer of unacknowledged
// bytes is full.
func (c *Conn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for len(b) > 0 {
		switch {
		case c.state == Reset:
			return n, ErrReset
		case c.wclosed:
			return n, net.ErrClosed
		}
		room := c.opts.MaxSend - len(c.sbuf)
		if room <= 0 {
			if err := c.waitLocked(1); err != nil {
				return n, err
			}
			continue
		}
		k := min(room, len(b))
		c.sbuf = append(c.sbuf, b[:k]...)
		b, n = b[k:], n+k
		c.cond.Broadcast()
	}
	return n, nil
}

// waitLocked waits for a change, or for deadline i (0 read, 1 write).
func (c *Conn) waitLocked(i int) error {
	dl := c.deadlines[i]
	if dl.IsZero() {
		c.cond.Wait()
		return nil
	}
	d := time.Until(dl)
	if d <= 0 {
		return os.ErrDeadlineExceeded
	}
	t := time.AfterFunc(d, func() {
		c.mu.Lock()
		c.cond.Broadcast()
		c.mu.Unlock()
	})
	c.cond.Wait()
	t.Stop()
	return nil
}

// CloseWrite sends an end of stream after what was written.
func (c *Conn) CloseWrite() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.wclosed = true
	c.cond.Broadcast()
	return nil
}

// Reset resets the flow: the peer's connection is reset, not closed.
func (c *Conn) Reset() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == Live {
		c.resetting = true
		c.rbuf = nil
		c.cond.Broadcast()
	}
	return nil
}

// Close ends the flow as closing a TCP socket does: what was written is
// still delivered, then an end of stream; unread data, or data that
// arrives later, resets the flow.
func (c *Conn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.appClosed, c.wclosed = true, true
	if len(c.rbuf) > 0 && c.state == Live {
		c.resetting = true
	}
	c.rbuf = nil
	c.cond.Broadcast()
	return nil
}

func (c *Conn) LocalAddr() net.Addr  { return c.local }
func (c *Conn) RemoteAddr() net.Addr { return c.remote }

func (c *Conn) SetDeadline(t time.Time) error {
	c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

func (c *Conn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deadlines[0] = t
	c.cond.Broadcast()
	return nil
}

func (c *Conn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deadlines[1] = t
	c.cond.Broadcast()
	return nil
}

// Counts are the bytes written to the flow and received from the peer.
func (c *Conn) Counts() (sent, rcvd uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	rcvd = c.rcvd
	if c.rfin {
		rcvd--
	}
	return c.sbase + uint64(len(c.sbuf)), rcvd
}

// PeerDone ends a detached flow whose peer ended cleanly (it answered a
// resume so), having received our bytes up to peerRcvd: cleanly if that
// was everything, with a reset otherwise.
func (c *Conn) PeerDone(peerRcvd uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ackLocked(peerRcvd)
	if c.finAcked && c.rfin {
		c.endLocked(Done)
		return
	}
	c.endLocked(Reset)
}

// Abandon resets the flow here without telling the peer (it restarted, or
// no longer has the flow): reads and writes fail with ErrReset.
func (c *Conn) Abandon() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.detachLocked()
	c.endLocked(Reset)
}
