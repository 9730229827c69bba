package flow

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"sfkit-proxy/internal/testkit"
)

// farEnd is the far end of a flow's stream, spoken by hand: a peer with a
// valid key that sends what it likes.
type farEnd struct {
	s    pipeStream
	skip int64 // the payload of the last data frame, not read yet
}

// next reads the next frame the flow sent, dropping data payloads. It
// takes any length, so that it sees what a broken flow would send.
func (p *farEnd) next() (frame, error) {
	if p.skip > 0 {
		if _, err := io.CopyN(io.Discard, p.s, p.skip); err != nil {
			return frame{}, err
		}
		p.skip = 0
	}
	var b [9]byte
	if _, err := io.ReadFull(p.s, b[:1]); err != nil {
		return frame{}, err
	}
	f := frame{typ: b[0]}
	switch f.typ {
	case frameData:
		if _, err := io.ReadFull(p.s, b[1:5]); err != nil {
			return frame{}, noEOF(err)
		}
		f.n = binary.BigEndian.Uint32(b[1:5])
		p.skip = int64(f.n)
	case frameAck:
		if _, err := io.ReadFull(p.s, b[1:9]); err != nil {
			return frame{}, noEOF(err)
		}
		f.ack = binary.BigEndian.Uint64(b[1:9])
	}
	return f, nil
}

// checkFlow reports what is wrong with c's state: the receive counts must
// match the queue, the memory it holds stay within MaxRecv and one buffer
// more, and a live flow must have sent only what it holds.
func checkFlow(c *Conn) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, mem := 0, 0
	for i, ch := range c.rq {
		if len(ch.data) == 0 || cap(ch.data) > ch.size {
			return fmt.Errorf("chunk %d of %d: %d bytes, room %d, in a buffer of %d", i, len(c.rq), len(ch.data), cap(ch.data), ch.size)
		}
		n += len(ch.data)
		mem += ch.size + chunkCost
	}
	if n != c.rlen || mem != c.rmem {
		return fmt.Errorf("queue holds %d bytes in %d of memory; counted %d in %d", n, mem, c.rlen, c.rmem)
	}
	if limit := c.opts.MaxRecv + MaxData + chunkCost; c.rmem >= limit {
		return fmt.Errorf("received data holds %d of memory; want less than %d", c.rmem, limit)
	}
	if end := c.sbase + uint64(c.slen); c.state == Live && (c.sent < c.sbase || c.sent > end) {
		return fmt.Errorf("sent %d, outside the %d buffered from %d", c.sent, c.slen, c.sbase)
	}
	return nil
}

// TestHostilePeer: a peer that breaks the protocol (acknowledges what was
// never sent, goes back, ends twice, sends after its end, sends a frame
// that is none) gets its flow reset: the flow never panics nor spins, it
// sends the peer a reset, and ends, once, with EndProtocol.
func TestHostilePeer(t *testing.T) {
	ack := func(off uint64) []byte { return appendAck(nil, off) }
	fin := []byte{frameFin}
	tests := []struct {
		name     string
		write    int    // bytes the application writes first
		midWrite bool   // the peer reads only the first frame's header: the flow's writer is stuck in that frame
		send     []byte // what the peer sends then
	}{
		{"ack past what was sent, writer blocked", 2 << 20, true, ack(1 << 20)},
		{"ack past everything buffered, writer blocked", 2 << 20, true, ack(1 << 40)},
		{"ack past everything sent", 1000, false, ack(1 << 40)},
		{"ack of an end never sent", 1000, false, ack(1001)},
		{"ack backwards", 1000, false, append(ack(1000), ack(500)...)},
		{"second end", 0, false, append(fin, fin...)},
		{"data after the end", 0, false, append(append(fin, appendData(nil, 3)...), "abc"...)},
		{"bad frame type", 0, false, []byte{0x09}},
		{"empty data frame", 0, false, []byte{frameData, 0, 0, 0, 0}},
		{"data frame too long", 0, false, appendData(nil, MaxData+1)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, done, remote := attachedFlow()
			p := &farEnd{s: remote}
			t.Cleanup(func() {
				remote.Abort()
				c.Abandon()
			})
			if _, err := c.Write(make([]byte, tt.write)); err != nil {
				t.Fatal(err)
			}
			for got := 0; got < tt.write; {
				f, err := p.next()
				if err != nil {
					t.Fatalf("reading what the flow sent: %v", err)
				}
				if f.typ == frameData {
					got += int(f.n)
					if tt.midWrite {
						break
					}
				}
			}
			// Sent before anything more is read: the flow's reader takes it in
			// while its writer is still where the test left it.
			remote.Write(tt.send)
			const most = 64
			frames, reset := 0, false
			read := make(chan struct{})
			go func() {
				defer close(read)
				for !reset && frames < most {
					f, err := p.next()
					if err != nil {
						return
					}
					frames++
					reset = f.typ == frameReset
				}
			}()
			select {
			case <-read:
			case <-time.After(10 * time.Second):
				remote.Abort() // the flow sends nothing more
				<-read
			}
			switch {
			case frames == most:
				t.Fatalf("the flow sent %d frames and no reset: it spins", frames)
			case !reset:
				t.Errorf("the flow sent %d frames and no reset; want a reset", frames)
			}
			wantEnd(t, done, EndProtocol)
			if _, err := c.Read(make([]byte, 1)); !errors.Is(err, ErrReset) {
				t.Errorf("Read = %v; want ErrReset", err)
			}
			if _, err := c.Write([]byte("x")); !errors.Is(err, ErrReset) {
				t.Errorf("Write = %v; want ErrReset", err)
			}
			if _, err := p.next(); err != io.EOF {
				t.Errorf("after the reset, the flow's stream gave %v; want its end", err)
			}
			select {
			case how := <-done:
				t.Errorf("OnDone called again, with %s", how)
			default:
			}
		})
	}
}

// TestAttachChecksPeerRcvd: a resume whose peer claims to have received
// less than it acknowledged, or more than was sent, resets the flow as a
// broken protocol, and the new stream carries the reset; one that fits
// resends from there.
func TestAttachChecksPeerRcvd(t *testing.T) {
	tests := []struct {
		name   string
		closed bool // the application ended its writes
		rcvd   uint64
		bad    bool
	}{
		{"what was acknowledged", false, 5, false},
		{"everything", false, 10, false},
		{"everything and the end", true, 11, false},
		{"less than acknowledged", false, 4, true},
		{"an end never written", false, 11, true},
		{"more than sent", true, 12, true},
		{"far more than sent", false, 1 << 40, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, done, remote := attachedFlow()
			var wg sync.WaitGroup
			t.Cleanup(func() {
				c.Abandon()
				wg.Wait()
			})
			c.Write([]byte("0123456789"))
			if tt.closed {
				c.CloseWrite()
			}
			p := &farEnd{s: remote}
			for got, fin := 0, false; got < 10 || tt.closed && !fin; {
				f, err := p.next()
				if err != nil {
					t.Fatalf("reading what the flow sent: %v", err)
				}
				got += int(f.n)
				fin = fin || f.typ == frameFin
			}
			wg.Go(func() { remote.Write(appendAck(nil, 5)) })
			testkit.Eventually(t, "the acknowledgement", func() bool {
				c.mu.Lock()
				defer c.mu.Unlock()
				return c.sbase == 5
			})
			c.Detach()
			var local pipeStream
			local, remote = streamPair()
			c.Attach(local, tt.rcvd)
			p = &farEnd{s: remote}
			st, _ := c.State()
			if !tt.bad {
				if st != Live {
					t.Fatalf("State() = %v after Attach(%d); want Live", st, tt.rcvd)
				}
				if err := checkFlow(c); err != nil {
					t.Error(err)
				}
				return
			}
			if st != Reset {
				t.Errorf("State() = %v after Attach(%d); want Reset", st, tt.rcvd)
			}
			if f, err := p.next(); err != nil || f.typ != frameReset {
				t.Errorf("the new stream carried %+v, %v; want a reset", f, err)
			}
			wantEnd(t, done, EndProtocol)
		})
	}
}

// bufStream reads a pipeStream through a buffer, as a QUIC stream reads
// what arrived: tiny frames cost no pipe round trip each.
type bufStream struct {
	pipeStream
	br *bufio.Reader
}

func (b bufStream) Read(p []byte) (int, error) { return b.br.Read(p) }

// pattern checks that what it is written is byte i%251 at offset i.
type pattern struct {
	n   int
	bad int // offset of the first wrong byte, or -1
}

func (p *pattern) Write(b []byte) (int, error) {
	for _, v := range b {
		if v != byte(p.n%251) && p.bad < 0 {
			p.bad = p.n
		}
		p.n++
	}
	return len(b), nil
}

// TestReceiveMemoryIsBounded: a peer sends several times MaxRecv to an
// application that does not read yet, in frames of any size down to a
// byte: the flow stops reading its stream while the memory it holds is
// near MaxRecv (tiny frames share buffers, in a few chunks), and delivers
// everything once the application reads.
func TestReceiveMemoryIsBounded(t *testing.T) {
	const maxRecv = 256 << 10
	tests := []struct {
		name    string
		frame   int  // bytes a data frame
		minHeld int  // payload held once full, at least
		writeTo bool // the application reads with WriteTo, else Read
	}{
		{"1 byte", 1, maxRecv / 2, false},
		{"1 byte, WriteTo", 1, maxRecv / 2, true},
		{"100 bytes", 100, maxRecv / 2, true},
		{"half a small buffer and one", smallFrame/2 + 1, maxRecv / 4, false},
		{"largest small", smallFrame - 1, maxRecv / 2, true},
		{"smallest pooled", smallFrame, smallFrame, false},
		{"largest", MaxData, MaxData, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			frames := (3*maxRecv + tt.frame - 1) / tt.frame
			total := frames * tt.frame
			// What the peer writes with, made before the heap is measured.
			src := make([]byte, 251+tt.frame)
			for i := range src {
				src[i] = byte(i % 251)
			}
			batch := make([]byte, 0, max(64<<10, 5+tt.frame))
			c := New(Options{MaxRecv: maxRecv}, nil, nil)
			local, remote := streamPair()
			var wg sync.WaitGroup
			t.Cleanup(func() {
				remote.Abort()
				c.Abandon()
				wg.Wait()
			})
			wg.Go(func() { io.Copy(io.Discard, remote) }) // the acknowledgements
			s := bufStream{local, bufio.NewReaderSize(local, 64<<10)}
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			c.Attach(s, 0)
			wg.Go(func() {
				for i := 0; i < frames; i++ {
					if len(batch)+5+tt.frame > cap(batch) {
						if _, err := remote.Write(batch); err != nil {
							return
						}
						batch = batch[:0]
					}
					off := i * tt.frame % 251
					batch = append(appendData(batch, tt.frame), src[off:off+tt.frame]...)
				}
				remote.Write(append(batch, frameFin))
			})
			testkit.Eventually(t, "the flow to fill", func() bool {
				c.mu.Lock()
				defer c.mu.Unlock()
				return c.rmem >= maxRecv
			})
			runtime.GC()
			runtime.ReadMemStats(&after)
			if err := checkFlow(c); err != nil {
				t.Error(err)
			}
			c.mu.Lock()
			held, mem, chunks := c.rlen, c.rmem, len(c.rq)
			c.mu.Unlock()
			if limit := maxRecv + max(smallFrame, MaxData) + chunkCost; mem > limit {
				t.Errorf("the flow holds %d bytes in %d of memory; want at most %d", held, mem, limit)
			}
			if held < tt.minHeld {
				t.Errorf("the flow holds %d bytes in %d of memory, %d chunks; want at least %d bytes", held, mem, chunks, tt.minHeld)
			}
			if grew := int64(after.HeapInuse) - int64(before.HeapInuse); grew > 3*maxRecv {
				t.Errorf("the heap grew by %d holding %d bytes of %d-byte frames; want at most %d", grew, held, tt.frame, 3*maxRecv)
			}
			t.Logf("full: %d bytes in %d chunks, %d of memory; the heap grew by %d", held, chunks, mem, int64(after.HeapInuse)-int64(before.HeapInuse))
			check := &pattern{bad: -1}
			var err error
			if tt.writeTo {
				_, err = c.WriteTo(check)
			} else {
				_, err = io.CopyBuffer(check, struct{ io.Reader }{c}, make([]byte, 4<<10))
			}
			if err != nil || check.n != total || check.bad >= 0 {
				t.Errorf("the application read %d bytes (wrong from %d), %v; want %d, right", check.n, check.bad, err, total)
			}
		})
	}
}

// outcomes are the ends a flow may come to when its peer sends in (frames
// as the flow reads them, then the end of the stream), having received
// the flow's first sent bytes and its end if fin. While the flow could end
// cleanly (each side has the other's end) it may, whatever follows.
func outcomes(in []byte, sent uint64, fin bool) map[End]bool {
	want := make(map[End]bool)
	r := bytes.NewReader(in)
	var scratch [9]byte
	var sbase uint64
	finAcked, rfin := false, false
	for {
		if finAcked && rfin {
			want[EndDone] = true
		}
		f, err := readFrame(r, &scratch)
		switch {
		case errors.Is(err, ErrFrame):
			want[EndProtocol] = true
			return want
		case err != nil:
			// The stream ends, and the flow waits for a resume.
			want[EndAbandoned] = true
			return want
		}
		bad := false
		switch f.typ {
		case frameData:
			// The flow takes in none of a frame after the end.
			if bad = rfin; !bad && int64(f.n) > int64(r.Len()) {
				want[EndAbandoned] = true
				return want
			}
			r.Seek(int64(f.n), io.SeekCurrent)
		case frameAck:
			lo, hi := sbase, sent
			if finAcked {
				lo++
			}
			if fin {
				hi++
			}
			bad = f.ack < lo || f.ack > hi
			sbase = min(f.ack, sent)
			finAcked = f.ack > sent
		case frameFin:
			bad = rfin
			rfin = true
		case frameReset:
			want[EndReset] = true
			return want
		}
		if bad {
			want[EndProtocol] = true
			return want
		}
	}
}

// FuzzFlow drives a flow with what a peer might send, valid frames and
// broken ones in any order, after the flow sent some data of its own (and
// perhaps its end) for acknowledgements to refer to; the application
// reads all along. The flow neither panics nor hangs nor spins, keeps its
// bounds, ends as outcomes says, once, and a peer that broke the protocol
// is sent a reset. The first byte of the input says what the flow sends:
// its low 4 bits thousands of bytes, 0x10 its end; 0x20 has the
// application read with WriteTo.
func FuzzFlow(f *testing.F) {
	data := func(s string) []byte { return append(appendData(nil, len(s)), s...) }
	ack := func(off uint64) []byte { return appendAck(nil, off) }
	fin, reset := []byte{frameFin}, []byte{frameReset}
	seed := func(cfg byte, frames ...[]byte) { f.Add(append([]byte{cfg}, bytes.Join(frames, nil)...)) }
	seed(0, data("hello"))
	seed(0x21, ack(500), ack(1000), data("x"), data("yz"), fin)
	seed(0x11, ack(1001), data("bye"), fin)
	seed(0x31, fin, ack(1001), ack(1001))
	seed(0x11, fin, ack(1001), data("late"))
	seed(0x10, ack(1), fin)
	seed(1, ack(2000))
	seed(1, ack(1001))
	seed(1, ack(1000), ack(999))
	seed(0x11, ack(1001), ack(1000))
	seed(0, fin, fin)
	seed(0, fin, data("late"))
	seed(0x22, data(string(make([]byte, 40000))), reset)
	seed(0x41, data(string(make([]byte, 40000))), ack(1000), fin)
	seed(0x92, data(string(make([]byte, 100000))), data("x"), fin)
	seed(2, data("a"), []byte{0x09})
	seed(0, []byte{frameData, 0, 0, 0, 0})
	seed(0, appendData(nil, MaxData+1))
	seed(0, appendData(nil, 10), []byte("short"))
	seed(0, []byte{frameAck, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) == 0 {
			return
		}
		cfg, in := in[0], in[1:]
		wrote := int(cfg&0x0f) * 1000
		closed, writeTo := cfg&0x10 != 0, cfg&0x20 != 0
		want := outcomes(in, uint64(wrote), closed)

		var calls atomic.Int32
		ended := make(chan End, 4)
		detached := make(chan struct{}, 4)
		var budget *Budget // shared memory: none beyond the free bytes, or a little
		switch cfg & 0xc0 {
		case 0x40:
			budget = NewBudget(0)
		case 0x80:
			budget = NewBudget(64 << 10)
		}
		c := New(Options{
			MaxRecv:  8 << 10,
			OnDone:   func(how End) { calls.Add(1); ended <- how },
			OnDetach: func() { detached <- struct{}{} },
			Budget:   budget,
		}, nil, nil)
		local, remote := streamPair()
		c.Attach(local, 0)
		defer func() {
			if budget != nil && budget.Used() != 0 {
				t.Errorf("the flow ended holding %d bytes of its budget; want 0", budget.Used())
			}
		}()
		var wg sync.WaitGroup
		defer wg.Wait()
		defer remote.Abort()
		defer c.Abandon()
		c.Write(make([]byte, wrote))
		if closed {
			c.CloseWrite()
		}
		wg.Go(func() {
			if writeTo {
				c.WriteTo(io.Discard)
				return
			}
			b := make([]byte, 1000)
			for {
				if _, err := c.Read(b); err != nil {
					return
				}
			}
		})

		// The peer reads what the flow sends, all along.
		synced := make(chan struct{})
		var syncOnce sync.Once
		if wrote == 0 && !closed {
			close(synced) // nothing to wait for
			syncOnce.Do(func() {})
		}
		sawReset := make(chan bool, 1)
		wg.Go(func() {
			p := &farEnd{s: remote}
			frames, got, fin, reset := 0, 0, false, false
			defer func() { sawReset <- reset }()
			for {
				fr, err := p.next()
				if err != nil {
					return
				}
				switch fr.typ {
				case frameData:
					got += int(fr.n)
				case frameFin:
					fin = true
				case frameReset:
					reset = true
				}
				if got >= wrote && (fin || !closed) {
					syncOnce.Do(func() { close(synced) })
				}
				if frames++; frames > 100+4*len(in) {
					t.Errorf("the flow sent %d frames for %d bytes of input: it spins", frames, len(in))
					remote.Abort()
					return
				}
			}
		})
		wait := func(ch <-chan struct{}, what string) {
			select {
			case <-ch:
			case <-time.After(5 * time.Second):
				t.Fatalf("timed out waiting for %s", what)
			}
		}
		wait(synced, "the flow to send what it was given")
		sent := make(chan struct{})
		wg.Go(func() {
			remote.Write(in)
			close(sent)
		})
		wait(sent, "the flow to read the input")
		remote.Close()

		var how End
		select {
		case how = <-ended:
		case <-detached:
		case <-time.After(5 * time.Second):
			t.Fatal("the flow neither ended nor let go of its stream")
		}
		if err := checkFlow(c); err != nil {
			t.Error(err)
		}
		if how == EndProtocol {
			select {
			case r := <-sawReset:
				if !r {
					t.Error("the flow ended for a broken protocol without sending a reset")
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the flow did not end its stream after the reset")
			}
		}
		c.Abandon()
		if how == "" {
			select {
			case how = <-ended:
			default:
				t.Fatal("Abandon did not end the flow")
			}
		}
		if !want[how] {
			t.Errorf("the flow ended %s; want one of %v", how, want)
		}
		if n := calls.Load(); n != 1 {
			t.Errorf("OnDone called %d times; want once", n)
		}
	})
}

// wantEnd waits for the flow's OnDone, which must say want.
func wantEnd(t *testing.T, done <-chan End, want End) {
	t.Helper()
	select {
	case how := <-done:
		if how != want {
			t.Errorf("OnDone(%s); want %s", how, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the flow did not end")
	}
}

// attachedFlow is a new flow attached to an in-memory stream, the far end
// of which the test speaks for; done has how it ended.
func attachedFlow() (*Conn, chan End, pipeStream) {
	done := make(chan End, 4)
	c := New(Options{OnDone: func(how End) { done <- how }}, nil, nil)
	local, remote := streamPair()
	c.Attach(local, 0)
	return c, done, remote
}
