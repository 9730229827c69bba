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
	"slices"
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
	// MaxRecv bounds the memory that received, unread data holds (its
	// buffers, not only its bytes, so that tiny frames cannot pin more);
	// the stream is not read while it is full. Zero means 1 MiB.
	MaxRecv int
	// ResumeTimeout is how long the flow waits detached before it resets;
	// zero means DefaultResumeTimeout.
	ResumeTimeout time.Duration
	// OnDetach, if set, is called when the stream is lost and the flow
	// waits for a new one.
	OnDetach func()
	// OnDone, if set, is called once when the flow ends, with how: EndDone,
	// EndReset, EndProtocol, EndTimeout or EndAbandoned. It runs on the
	// goroutine that ended the flow, without the flow's lock: it may call
	// the flow, and must not block.
	OnDone func(how End)
	// Buffers hands out the buffers received data waits in, shared by the
	// flows of one owner; nil means a pool of the flow's own.
	Buffers *Buffers
	// Budget, if set, is the memory this flow shares with the other flows
	// of its peer (see Budget); nil bounds it by MaxSend and MaxRecv only.
	Budget *Budget
}

// DefaultResumeTimeout is how long a flow waits, detached, for a path to its
// peer to come back before it is reset, unless configured otherwise: the one
// place this default is written.
const DefaultResumeTimeout = 10 * time.Minute

// Buffers pools the buffers of received data and of large reads, in
// classes of smallFrame, twice that, and so on up to MaxData: a frame
// waits in the smallest that holds it, so that a mid-sized frame does not
// hold (and count as) a MaxData buffer.
type Buffers struct{ p [bufClasses]sync.Pool }

// bufClasses is how many sizes Buffers has: smallFrame << i, i <
// bufClasses, the last MaxData.
const bufClasses = 4

// class is the smallest class that holds n bytes (n <= MaxData).
func class(n int) int {
	i := 0
	for smallFrame<<i < n {
		i++
	}
	return i
}

// get returns a buffer of at least n bytes.
func (b *Buffers) get(n int) *[]byte {
	i := class(n)
	if v, ok := b.p[i].Get().(*[]byte); ok {
		return v
	}
	v := make([]byte, smallFrame<<i)
	return &v
}

func (b *Buffers) put(v *[]byte) {
	if v != nil {
		b.p[class(cap(*v))].Put(v)
	}
}

// Received data below smallFrame waits in small buffers of the flow's own
// rather than pooled MaxData ones: the first holds minSmall, each next one
// twice the last, up to smallFrame, and small frames fill them one after
// the other. chunkCost is what a chunk costs beyond its buffer (its place
// in the queue, the allocator's share), counted against MaxRecv.
const (
	smallFrame = 32 << 10
	minSmall   = 4 << 10
	chunkCost  = 128
)

// chunk is received data waiting to be read.
type chunk struct {
	buf  *[]byte // the pooled buffer, or nil for a small one
	data []byte  // the unread part; a small buffer's room follows it
	size int     // the capacity of its buffer
}

// landing is where a data frame's bytes are read to, outside the lock.
type landing struct {
	buf  *[]byte // a pooled buffer, or nil
	data []byte  // the frame's bytes
	size int     // the capacity of the buffer data is in
	room bool    // data is the room of rq's last chunk (c.filling)
}

// End is how a flow ended.
type End string

// Ends.
const (
	EndDone      End = "done"      // everything delivered both ways
	EndReset     End = "reset"     // a reset, from either end
	EndProtocol  End = "protocol"  // the peer broke the flow protocol: we reset it
	EndTimeout   End = "timeout"   // not resumed within the resume timeout
	EndAbandoned End = "abandoned" // its owner gave it up (Abandon, PeerDone)
)

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

	// Send side: the bytes of [sbase, sbase+slen) are written and not yet
	// acknowledged, in chunks (the first one's first sskip bytes are
	// acknowledged already); sent is how far the current stream was given
	// them. A chunk is never written to again once it is full. Chunks of
	// smallFrame or more come from Buffers and go back once acknowledged,
	// unless a writeLoop is still sending from one (sbusy): then when it
	// is done (sfreed). sfill is ReadFrom reading into the last chunk's
	// room: that chunk stays the last, and Write waits.
	sq       [][]byte
	sskip    int
	slen     int
	smem     int // the capacity of sq's chunks
	sbusy    []*byte
	sfreed   [][]byte
	sfill    bool
	sbase    uint64
	sent     uint64
	wclosed  bool // CloseWrite: an end of stream follows sbuf
	finSent  bool // on the current stream
	finAcked bool // the peer has our end of stream

	// Receive side: rcvd counts what arrived (its end counting one), acked
	// what we acknowledged on the current stream. rmem is what MaxRecv
	// bounds: the capacity of rq's buffers and chunkCost per chunk.
	rq      []chunk // received, not yet read
	rlen    int     // bytes in rq
	rmem    int     // memory rq holds
	rpend   int     // memory of received data being read in, not yet in rq
	held    int     // what the flow holds of its budget (budget.go)
	filling bool    // a readLoop reads into the room of rq's last chunk
	lent    *[]byte // the buffer WriteTo is writing from, not to be pooled yet
	rcvd    uint64
	acked   uint64
	rfin    bool

	stream    Stream // nil while detached
	gen       uint64 // attachment generation
	resetting bool   // a reset is to be sent
	state     Status
	appClosed bool
	deadlines [2]time.Time // read, write
	timer     *time.Timer  // the resume timeout, while detached
	ended     End          // set when the flow ends, until unlock tells OnDone
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
		opts.ResumeTimeout = DefaultResumeTimeout
	}
	if opts.Buffers == nil {
		opts.Buffers = new(Buffers)
	}
	c := &Conn{opts: opts, local: local, remote: remote}
	c.cond = sync.NewCond(&c.mu)
	return c
}

// State reports whether the flow can be resumed, and what it received:
// the offset a resume tells the peer.
func (c *Conn) State() (Status, uint64) {
	c.mu.Lock()
	defer c.unlock()
	return c.state, c.rcvd
}

// Detach lets go of the current stream (aborting it), so that a resume
// can read a stable State; it is what a lost stream does too.
func (c *Conn) Detach() {
	c.mu.Lock()
	defer c.unlock()
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
// more than was sent, breaks the protocol: the flow resets (EndProtocol),
// the reset sent on s.
func (c *Conn) Attach(s Stream, peerRcvd uint64) {
	c.mu.Lock()
	defer c.unlock()
	if c.state != Live {
		s.Abort()
		return
	}
	c.detachLocked()
	if c.timer != nil {
		c.timer.Stop()
		c.timer = nil
	}
	bad := !c.peerRcvdOKLocked(peerRcvd)
	if !bad {
		c.ackLocked(peerRcvd)
	}
	c.stream, c.sent, c.finSent, c.acked = s, c.sbase, c.finAcked, c.rcvd
	if bad {
		c.peerBrokeLocked()
	}
	g := c.gen
	go c.writeLoop(s, g)
	go c.readLoop(s, g)
}

// peerRcvdOKLocked reports whether a resume's claim that the peer received
// our bytes up to r fits what we hold: not behind what it acknowledged,
// not past what we have (our end of stream counting one, once we closed).
func (c *Conn) peerRcvdOKLocked(r uint64) bool {
	end := c.sbase + uint64(c.slen)
	return r >= c.sbase && (r <= end || r == end+1 && c.wclosed)
}

// ackOKLocked reports whether an acknowledgement of off fits what was
// sent on the current stream: not behind an earlier one, not past what
// was sent (the end of stream counting one, once it was sent).
func (c *Conn) ackOKLocked(off uint64) bool {
	lo, hi := c.sbase, c.sent
	if c.finAcked {
		lo++
	}
	if c.finSent {
		hi++
	}
	return lo <= off && off <= hi
}

// ackLocked takes in that the peer received our bytes up to off, which a
// stream's acknowledgement was checked for (ackOKLocked).
func (c *Conn) ackLocked(off uint64) {
	if off > c.sbase {
		n := min(off-c.sbase, uint64(c.slen))
		c.sbase += n
		c.slen -= int(n)
		c.sskip += int(n)
		for len(c.sq) > 0 && c.sskip >= len(c.sq[0]) && (len(c.sq) > 1 || c.sskip == len(c.sq[0]) && !c.sfill) {
			c.sskip -= len(c.sq[0])
			c.smem -= cap(c.sq[0])
			c.recycleLocked(c.sq[0])
			c.sq[0] = nil
			c.sq = c.sq[1:]
		}
		if len(c.sq) == 0 {
			c.sq = nil // an idle flow holds no buffer
		}
		c.settleLocked()
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
		if c.gen == g {
			c.detachLocked() // ended: nothing more goes over s
		}
		c.unlock()
		return
	}
	c.detachLocked()
	c.timer = time.AfterFunc(c.opts.ResumeTimeout, func() {
		c.mu.Lock()
		if c.stream == nil && c.state == Live {
			c.endLocked(Reset, EndTimeout)
		}
		c.unlock()
	})
	c.unlock()
	if c.opts.OnDetach != nil {
		c.opts.OnDetach()
	}
}

// peerBrokeLocked ends the flow because the peer broke the protocol: it is
// reset, and the reset sent to the peer on the current stream.
func (c *Conn) peerBrokeLocked() {
	if c.state != Live {
		return
	}
	c.resetting = true
	c.endLocked(Reset, EndProtocol)
	// A peer that does not read keeps the writer stuck before the reset:
	// the stream is let go of after resetGrace whatever happens.
	if c.stream != nil {
		g := c.gen
		time.AfterFunc(resetGrace, func() {
			c.mu.Lock()
			if c.gen == g {
				c.detachLocked()
			}
			c.unlock()
		})
	}
}

// resetGrace is how long a flow that the peer broke keeps its stream for
// the reset to get out.
const resetGrace = 2 * time.Second

// endLocked ends the flow; unlock tells OnDone.
func (c *Conn) endLocked(s Status, how End) {
	if c.state != Live {
		return
	}
	c.state = s
	if s == Reset {
		c.sq, c.sskip, c.slen, c.smem = nil, 0, 0, 0
		c.dropRecvLocked()
	}
	if c.timer != nil {
		c.timer.Stop()
	}
	c.cond.Broadcast()
	c.ended = how
}

// unlock lets go of the lock and then, if the flow just ended, tells
// OnDone: it runs without the lock, on the goroutine that ended the flow.
func (c *Conn) unlock() {
	how := c.ended
	c.ended = ""
	c.mu.Unlock()
	if how != "" && c.opts.OnDone != nil {
		c.opts.OnDone(how)
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
		var base *byte // of the chunk data is in
		hdr = hdr[:0]
		closeAfter, resetAfter := false, false
		for {
			if c.gen != g {
				c.unlock()
				return
			}
			if c.resetting {
				hdr = append(hdr, frameReset)
				resetAfter = true
				break
			}
			if c.state == Reset {
				c.unlock()
				s.Abort()
				return
			}
			if c.acked < c.rcvd {
				hdr = appendAck(hdr, c.rcvd)
				c.acked = c.rcvd
			}
			if end := c.sbase + uint64(c.slen); c.sent < end {
				data, base = c.unsentLocked()
				hdr = appendData(hdr, len(data))
				c.sent += uint64(len(data))
				c.sbusy = append(c.sbusy, base)
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
				c.endLocked(Done, EndDone)
				closeAfter = true
				break
			}
			c.cond.Wait()
		}
		c.unlock()
		var err error
		if len(hdr) > 0 {
			_, err = s.Write(hdr)
		}
		if len(data) > 0 {
			if err == nil {
				_, err = s.Write(data)
			}
			c.mu.Lock()
			c.releaseLocked(base)
			c.mu.Unlock()
		}
		switch {
		case err != nil:
			c.lost(g)
			return
		case resetAfter:
			s.Close()
			c.mu.Lock()
			c.endLocked(Reset, EndReset)
			c.unlock()
			return
		case closeAfter:
			s.Close()
			return
		}
	}
}

// readLoop takes in frames from s while it is the flow's stream. Each is
// checked against the flow's state first: one that breaks the protocol
// resets the flow (peerBrokeLocked), and nothing more that s carries is
// looked at.
func (c *Conn) readLoop(s Stream, g uint64) {
	var scratch [9]byte
	for {
		f, err := readFrame(s, &scratch)
		if err != nil {
			c.mu.Lock()
			bad := c.gen == g && errors.Is(err, ErrFrame)
			switch {
			case bad:
				c.peerBrokeLocked()
			case err == io.EOF && c.gen == g && c.doneLocked():
				// The peer closed its side after our last acknowledgement.
				c.endLocked(Done, EndDone)
			}
			live := c.state == Live
			c.unlock()
			switch {
			case bad:
				drain(s)
			case live:
				c.lost(g)
			}
			return
		}
		if f.typ == frameData {
			if !c.recvData(s, g, int(f.n)) {
				return
			}
			continue
		}
		c.mu.Lock()
		if c.gen != g {
			c.unlock()
			return
		}
		bad := false
		switch {
		case f.typ == frameReset:
			c.endLocked(Reset, EndReset)
			c.unlock()
			s.Abort()
			return
		case c.state != Live:
			// Ended: what else arrives changes nothing.
		case f.typ == frameAck:
			// Not past what this stream carried, never back.
			bad = !c.ackOKLocked(f.ack)
			if !bad {
				c.ackLocked(f.ack)
			}
		case f.typ == frameFin:
			bad = c.rfin // a second end
			if !bad {
				c.rfin = true
				c.rcvd++
			}
		}
		if bad {
			c.peerBrokeLocked()
		}
		c.cond.Broadcast()
		c.unlock()
		if bad {
			drain(s)
			return
		}
	}
}

// recvData takes in a data frame of n bytes from s, its header read, and
// reports whether to go on reading s. While received data fills MaxRecv,
// or the flow's budget is spent, it waits before it reads more bytes: a
// frame may be taken in in pieces (landWithinLocked).
func (c *Conn) recvData(s Stream, g uint64, n int) bool {
	for n > 0 {
		c.mu.Lock()
		var l landing
		for {
			live := c.gen == g && c.state == Live && !c.appClosed && !c.rfin
			if !live {
				break
			}
			if c.rmem < c.opts.MaxRecv {
				var ok bool
				if l, ok = c.landWithinLocked(n); ok {
					break
				}
			}
			c.cond.Wait()
		}
		switch {
		case c.gen != g:
			c.unlock()
			return false
		case c.state == Live && c.rfin:
			c.peerBrokeLocked() // data after the end
			c.unlock()
			drain(s)
			return false
		case c.state != Live || c.appClosed:
			if c.state == Live {
				c.resetting = true // data for a closed connection: as TCP, reset
				c.cond.Broadcast()
			}
			c.unlock()
			if _, err := io.CopyN(io.Discard, s, int64(n)); err != nil {
				c.lost(g)
				return false
			}
			return true
		}
		c.unlock()
		_, err := io.ReadFull(s, l.data)
		c.mu.Lock()
		if l.room {
			c.filling = false
		}
		c.rpend -= l.grow()
		keep := err == nil && c.gen == g
		switch {
		case !keep || c.state != Live:
			c.opts.Buffers.put(l.buf)
		case c.appClosed:
			c.opts.Buffers.put(l.buf)
			c.resetting = true // closed while the bytes came in
		default:
			c.pushLocked(l)
		}
		c.settleLocked()
		c.cond.Broadcast()
		c.unlock()
		if err != nil {
			c.lost(g)
		}
		if !keep {
			return false
		}
		n -= len(l.data)
	}
	return true
}

// freePiece is the most of a frame a flow takes in at once while its
// budget is spent: it fits in the flow's FreeBytes with a chunk's cost.
const freePiece = 8 << 10

// landWithinLocked is where the next bytes of a frame with n left are to
// be read, within the flow's budget: all n if the budget has room, else a
// piece of at most freePiece (which fits in the flow's own FreeBytes while
// its queue is short), else nothing yet (ok false: the budget wakes the
// flow when it has room). The landing's memory is counted as pending
// until it is queued.
func (c *Conn) landWithinLocked(n int) (l landing, ok bool) {
	for _, k := range []int{n, min(n, freePiece)} {
		l = c.landLocked(k)
		if c.growLocked(l.grow(), 0) {
			c.rpend += l.grow()
			return l, true
		}
		if l.room {
			c.filling = false
		} else {
			c.opts.Buffers.put(l.buf)
		}
		if k == freePiece || k == n && n <= freePiece {
			break
		}
	}
	return landing{}, false
}

// grow is the memory queueing l adds: none in the room of the last chunk.
func (l landing) grow() int {
	if l.room {
		return 0
	}
	return l.size + chunkCost
}

// landLocked is where the n bytes of a data frame are to be read: a large
// frame gets a pooled buffer; a small one the room of rq's last chunk, if
// that is small with room to spare (and no other readLoop fills it), or
// else a new small buffer, larger than the last.
func (c *Conn) landLocked(n int) landing {
	if n >= smallFrame {
		b := c.opts.Buffers.get(n)
		return landing{buf: b, data: (*b)[:n], size: cap(*b)}
	}
	size := minSmall
	if len(c.rq) > 0 {
		if t := c.rq[len(c.rq)-1]; t.buf == nil {
			if end := len(t.data); !c.filling && cap(t.data)-end >= n {
				c.filling = true
				return landing{data: t.data[end : end+n], size: t.size, room: true}
			}
			size = 2 * t.size
		}
	}
	size = min(max(size, n), smallFrame)
	return landing{data: make([]byte, n, size), size: size}
}

// pushLocked queues the bytes of l, read: onto rq's last chunk if they
// are its room, else as a chunk of their own (the last chunk may have been
// read and dropped meanwhile: its room is then a chunk of its own, in the
// same buffer).
func (c *Conn) pushLocked(l landing) {
	n := len(l.data)
	c.rlen += n
	c.rcvd += uint64(n)
	if l.room && len(c.rq) > 0 {
		t := &c.rq[len(c.rq)-1]
		if end := len(t.data); cap(t.data) > end && &t.data[:end+1][end] == &l.data[0] {
			t.data = t.data[:end+n]
			return
		}
	}
	c.rq = append(c.rq, chunk{buf: l.buf, data: l.data, size: l.size})
	c.rmem += l.size + chunkCost
}

// popLocked drops rq's first chunk, read to its end.
func (c *Conn) popLocked() {
	ch := c.rq[0]
	c.opts.Buffers.put(ch.buf)
	c.rmem -= ch.size + chunkCost
	c.rq[0] = chunk{}
	c.rq = c.rq[1:]
	if len(c.rq) == 0 {
		c.rq = nil // an idle flow holds no queue
	}
	c.settleLocked()
}

// drain reads s to its end, unlooked at: a peer that broke the protocol
// is sent a reset, and what it sends meanwhile is not kept. It ends when
// the peer ends s or the flow lets go of it.
func drain(s Stream) { io.Copy(io.Discard, s) }

// Read reads what the peer sent: io.EOF after its end of stream, ErrReset
// once the flow is reset.
func (c *Conn) Read(b []byte) (int, error) {
	c.mu.Lock()
	defer c.unlock()
	for c.rlen == 0 && !c.rfin && c.state != Reset && !c.appClosed {
		if err := c.waitLocked(0); err != nil {
			return 0, err
		}
	}
	switch {
	case c.rlen > 0:
		n := 0
		for n < len(b) && len(c.rq) > 0 {
			k := copy(b[n:], c.rq[0].data)
			n += k
			c.rq[0].data = c.rq[0].data[k:]
			if len(c.rq[0].data) == 0 {
				c.popLocked()
			}
		}
		c.rlen -= n
		c.cond.Broadcast()
		return n, nil
	case c.state == Reset:
		return 0, ErrReset
	case c.appClosed:
		return 0, net.ErrClosed
	}
	return 0, io.EOF
}

// WriteTo writes what the peer sends to w until its end of stream (nil) or
// a reset (ErrReset), without a copy in between: io.Copy uses it.
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		c.mu.Lock()
		for c.rlen == 0 && !c.rfin && c.state != Reset && !c.appClosed {
			if err := c.waitLocked(0); err != nil {
				c.unlock()
				return total, err
			}
		}
		if c.rlen == 0 {
			var err error
			switch {
			case c.state == Reset:
				err = ErrReset
			case c.appClosed:
				err = net.ErrClosed
			}
			c.unlock()
			return total, err
		}
		ch := c.rq[0]
		c.lent = ch.buf
		c.unlock()
		// Only this reader takes chunks off the queue: ch stays ours, and
		// small frames that arrive meanwhile go past the end of ch.data,
		// into its buffer's room, not into the bytes written.
		n, err := w.Write(ch.data)
		total += int64(n)
		c.mu.Lock()
		c.lent = nil
		if len(c.rq) > 0 && &c.rq[0].data[0] == &ch.data[0] {
			c.rq[0].data = c.rq[0].data[n:]
			c.rlen -= n
			if len(c.rq[0].data) == 0 {
				c.popLocked()
			}
			c.cond.Broadcast()
		}
		c.unlock()
		if err != nil {
			return total, err
		}
	}
}

// smallRead is the buffer ReadFrom waits for data with.
const smallRead = 2 << 10

// ReadFrom writes what r reads until its end (nil) or an error (io.Copy
// uses it). It waits for data with a small buffer, so that an idle
// connection holds little; while data keeps coming it reads straight into
// the room of the send buffer's last chunk (chunks grow to MaxData), so
// that a busy one is read in large pieces with no copy in between.
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	small := make([]byte, smallRead)
	busy := false
	var total int64
	for {
		var n int
		var err error
		if busy {
			dst, base, rerr := c.room()
			if rerr != nil {
				return total, rerr
			}
			n, err = r.Read(dst)
			if werr := c.filled(base, n); werr != nil {
				return total, werr
			}
			total += int64(n)
		} else {
			n, err = r.Read(small)
			if n > 0 {
				w, werr := c.Write(small[:n])
				total += int64(w)
				if werr != nil {
					return total, werr
				}
			}
		}
		if err != nil {
			if err == io.EOF {
				return total, nil
			}
			return total, err
		}
		busy = n >= smallRead
	}
}

// room waits for room in the send buffer and returns it: the free end of
// its last chunk (and that chunk's first byte), where ReadFrom reads, and
// filled then keeps.
func (c *Conn) room() ([]byte, *byte, error) {
	c.mu.Lock()
	defer c.unlock()
	for {
		switch {
		case c.state == Reset:
			return nil, nil, ErrReset
		case c.wclosed:
			return nil, nil, net.ErrClosed
		}
		room := c.opts.MaxSend - c.slen
		if room > 0 && !c.sfill && c.tailLocked(MaxData) {
			t := c.sq[len(c.sq)-1]
			base := &t[:1][0]
			c.sfill = true
			c.sbusy = append(c.sbusy, base)
			return t[len(t):min(cap(t), len(t)+room)], base, nil
		}
		if err := c.waitLocked(1); err != nil {
			return nil, nil, err
		}
	}
}

// filled keeps n bytes read into the room that room returned, in the
// chunk whose first byte is base.
func (c *Conn) filled(base *byte, n int) error {
	c.mu.Lock()
	defer c.unlock()
	c.sfill = false
	c.releaseLocked(base)
	c.cond.Broadcast()
	switch {
	case c.state == Reset:
		return ErrReset
	case c.wclosed:
		return net.ErrClosed
	}
	t := &c.sq[len(c.sq)-1] // the chunk room returned: it stays the last
	*t = (*t)[:len(*t)+n]
	c.slen += n
	return nil
}

// tailLocked makes sure that the send buffer's last chunk has room, for a
// write of k bytes: a new chunk grows from k's size (or twice the last
// one's) to MaxData. It reports false when the budget is spent: the
// caller waits for acknowledgements (or another flow's) to give some back.
func (c *Conn) tailLocked(k int) bool {
	if n := len(c.sq); n > 0 && len(c.sq[n-1]) < cap(c.sq[n-1]) {
		return true
	}
	size := max(k, minChunk)
	if n := len(c.sq); n > 0 {
		size = max(size, 2*cap(c.sq[n-1]))
	}
	size = min(MaxData, size)
	if size >= smallFrame {
		size = smallFrame << class(size) // a pooled buffer's size
	}
	if !c.growLocked(0, size) {
		// The budget is spent: a small chunk, if the flow's own free
		// bytes hold it.
		if size == minChunk || !c.growLocked(0, minChunk) {
			return false
		}
		size = minChunk
	}
	c.smem += size
	ch := make([]byte, 0, size)
	if size >= smallFrame {
		ch = (*c.opts.Buffers.get(size))[:0]
	}
	c.sq = append(c.sq, ch)
	return true
}

// recycleLocked gives an acknowledged chunk back to Buffers: now, or when
// the writeLoop sending from it is done.
func (c *Conn) recycleLocked(ch []byte) {
	if cap(ch) < smallFrame {
		return
	}
	base := &ch[:1][0]
	if slices.Contains(c.sbusy, base) {
		c.sfreed = append(c.sfreed, ch)
		return
	}
	ch = ch[:cap(ch)]
	c.opts.Buffers.put(&ch)
}

// releaseLocked ends one use of the chunk whose first byte is at p,
// giving it back if it was acknowledged meanwhile and is used no more.
func (c *Conn) releaseLocked(p *byte) {
	for i, b := range c.sbusy {
		if b == p {
			c.sbusy = slices.Delete(c.sbusy, i, i+1)
			break
		}
	}
	for i, ch := range c.sfreed {
		if &ch[:1][0] == p && !slices.Contains(c.sbusy, p) {
			c.sfreed = slices.Delete(c.sfreed, i, i+1)
			ch = ch[:cap(ch)]
			c.opts.Buffers.put(&ch)
			return
		}
	}
}

// Write queues b for the peer, waiting while the buffer of unacknowledged
// bytes is full.
func (c *Conn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.unlock()
	n := 0
	for len(b) > 0 {
		switch {
		case c.state == Reset:
			return n, ErrReset
		case c.wclosed:
			return n, net.ErrClosed
		}
		room := c.opts.MaxSend - c.slen
		// Chunks grow from the size of the write to MaxData, so that a
		// busy flow sends large frames and an idle one holds little.
		if room <= 0 || c.sfill || !c.tailLocked(min(room, len(b))) {
			if err := c.waitLocked(1); err != nil {
				return n, err
			}
			continue
		}
		k := min(room, len(b))
		tail := &c.sq[len(c.sq)-1]
		k = min(k, cap(*tail)-len(*tail))
		*tail = append(*tail, b[:k]...)
		c.slen += k
		b, n = b[k:], n+k
		c.cond.Broadcast()
	}
	return n, nil
}

// minChunk is the smallest chunk of data to send.
const minChunk = 4 << 10

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
		c.unlock()
	})
	c.cond.Wait()
	t.Stop()
	return nil
}

// CloseWrite sends an end of stream after what was written.
func (c *Conn) CloseWrite() error {
	c.mu.Lock()
	defer c.unlock()
	c.wclosed = true
	c.cond.Broadcast()
	return nil
}

// Reset resets the flow: the peer's connection is reset, not closed.
func (c *Conn) Reset() error {
	c.mu.Lock()
	defer c.unlock()
	if c.state == Live {
		c.resetting = true
		c.dropRecvLocked()
		c.cond.Broadcast()
	}
	return nil
}

// Close ends the flow as closing a TCP socket does: what was written is
// still delivered, then an end of stream; unread data, or data that
// arrives later, resets the flow.
func (c *Conn) Close() error {
	c.mu.Lock()
	defer c.unlock()
	c.appClosed, c.wclosed = true, true
	if c.rlen > 0 && c.state == Live {
		c.resetting = true
	}
	c.dropRecvLocked()
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
	defer c.unlock()
	c.deadlines[0] = t
	c.cond.Broadcast()
	return nil
}

func (c *Conn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.unlock()
	c.deadlines[1] = t
	c.cond.Broadcast()
	return nil
}

// unsentLocked is the next run of bytes to send, from offset sent, and
// the first byte of its chunk: within one chunk, and the slice stays valid
// after the lock is let go (a full chunk's bytes never change; later
// appends go past its length), while the chunk is marked busy.
func (c *Conn) unsentLocked() ([]byte, *byte) {
	rel := int(c.sent-c.sbase) + c.sskip
	for _, ch := range c.sq {
		if rel < len(ch) {
			return ch[rel:min(len(ch), rel+MaxData)], &ch[0]
		}
		rel -= len(ch)
	}
	return nil, nil
}

// dropRecvLocked gives back what was received and not read.
func (c *Conn) dropRecvLocked() {
	for _, ch := range c.rq {
		if ch.buf != c.lent {
			c.opts.Buffers.put(ch.buf)
		}
	}
	c.rq, c.rlen, c.rmem = nil, 0, 0
	c.settleLocked()
}

// Owes reports whether the flow gave its stream bytes (or its end) that
// the peer has not acknowledged yet: something should come back.
func (c *Conn) Owes() bool {
	c.mu.Lock()
	defer c.unlock()
	return c.state == Live && c.stream != nil && (c.sent > c.sbase || c.finSent && !c.finAcked)
}

// Counts are the bytes written to the flow and received from the peer.
func (c *Conn) Counts() (sent, rcvd uint64) {
	c.mu.Lock()
	defer c.unlock()
	rcvd = c.rcvd
	if c.rfin {
		rcvd--
	}
	return c.sbase + uint64(c.slen), rcvd
}

// PeerDone ends a detached flow whose peer ended cleanly (it answered a
// resume so), having received our bytes up to peerRcvd: cleanly if that
// was everything, with a reset otherwise.
func (c *Conn) PeerDone(peerRcvd uint64) {
	c.mu.Lock()
	defer c.unlock()
	if !c.peerRcvdOKLocked(peerRcvd) {
		c.endLocked(Reset, EndProtocol) // it claims what was never sent
		return
	}
	c.ackLocked(peerRcvd)
	if c.finAcked && c.rfin {
		c.endLocked(Done, EndDone)
		return
	}
	c.endLocked(Reset, EndAbandoned)
}

// Abandon resets the flow here without telling the peer (it restarted, or
// no longer has the flow): reads and writes fail with ErrReset.
func (c *Conn) Abandon() {
	c.mu.Lock()
	defer c.unlock()
	c.detachLocked()
	c.endLocked(Reset, EndAbandoned)
}
