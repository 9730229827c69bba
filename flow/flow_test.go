package flow

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	mrand "math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"
)

// pipeStream is one end of an in-memory stream: Close ends our writes,
// Abort breaks both ways, as a dying connection does.
type pipeStream struct {
	r *io.PipeReader
	w *io.PipeWriter
}

var errCut = errors.New("connection lost")

func (p pipeStream) Read(b []byte) (int, error)  { return p.r.Read(b) }
func (p pipeStream) Write(b []byte) (int, error) { return p.w.Write(b) }
func (p pipeStream) Close() error                { return p.w.Close() }
func (p pipeStream) Abort() {
	p.w.CloseWithError(errCut)
	p.r.CloseWithError(errCut)
}

func streamPair() (pipeStream, pipeStream) {
	ar, bw := io.Pipe()
	br, aw := io.Pipe()
	return pipeStream{ar, aw}, pipeStream{br, bw}
}

// connect attaches a and b over a new stream pair, as a resume does: each
// side learns what the other received.
func connect(a, b *Conn) (pipeStream, pipeStream) {
	a.Detach()
	b.Detach()
	_, ar := a.State()
	_, br := b.State()
	sa, sb := streamPair()
	a.Attach(sa, br)
	b.Attach(sb, ar)
	return sa, sb
}

func newPair(opts Options) (*Conn, *Conn) {
	a, b := New(opts, nil, nil), New(opts, nil, nil)
	connect(a, b)
	return a, b
}

// transfer writes data to c in random sizes, then closes its write side.
func transfer(t *testing.T, c *Conn, data []byte, wg *sync.WaitGroup) {
	wg.Go(func() {
		for len(data) > 0 {
			n := min(len(data), 1+mrand.IntN(100_000))
			if _, err := c.Write(data[:n]); err != nil {
				t.Errorf("Write: %v", err)
				return
			}
			data = data[n:]
		}
		c.CloseWrite()
	})
}

// transferFrom sends data through c's ReadFrom, from a reader that returns
// it in random sizes (small reads and large ones, as a local socket does),
// then closes c's write side.
func transferFrom(t *testing.T, c *Conn, data []byte, wg *sync.WaitGroup) {
	wg.Go(func() {
		if n, err := c.ReadFrom(&choppy{data}); err != nil || n != int64(len(data)) {
			t.Errorf("ReadFrom: %d bytes, %v; want %d", n, err, len(data))
		}
		c.CloseWrite()
	})
}

type choppy struct{ b []byte }

func (r *choppy) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), 1+mrand.IntN(3*smallRead))], r.b)
	if mrand.IntN(4) == 0 {
		n = copy(p, r.b) // as much as fits
	}
	r.b = r.b[n:]
	return n, nil
}

func readAll(t *testing.T, c *Conn, out *[]byte, wg *sync.WaitGroup) {
	wg.Go(func() {
		b, err := io.ReadAll(c)
		if err != nil {
			t.Errorf("ReadAll: %v", err)
		}
		*out = b
	})
}

// TestFlowSurvivesRandomCuts: both directions stream (one through Write,
// one through ReadFrom, which reads into the send buffer) while the stream
// under them is cut again and again at random moments; the bytes arrive
// complete, in order, once, and both ends finish cleanly.
func TestFlowSurvivesRandomCuts(t *testing.T) {
	for seed := range 5 {
		t.Run("", func(t *testing.T) {
			done := make(chan End, 2)
			opts := Options{MaxSend: 64 << 10, MaxRecv: 32 << 10, OnDone: func(how End) { done <- how }}
			a, b := newPair(opts)
			ab, ba := make([]byte, 3<<20), make([]byte, 2<<20+seed)
			rand.Read(ab)
			rand.Read(ba)
			var wg sync.WaitGroup
			var gotAB, gotBA []byte
			transfer(t, a, ab, &wg)
			transferFrom(t, b, ba, &wg)
			readAll(t, b, &gotAB, &wg)
			readAll(t, a, &gotBA, &wg)
			stop := make(chan struct{})
			cuts := 0
			var cutter sync.WaitGroup
			cutter.Go(func() {
				for {
					select {
					case <-stop:
						return
					case <-time.After(time.Duration(mrand.IntN(3000)) * time.Microsecond):
					}
					connect(a, b) // detaching aborts the old stream mid-frame
					cuts++
				}
			})
			wg.Wait()
			close(stop)
			cutter.Wait()
			connect(a, b) // a last stream, so that the final acknowledgements get through
			if !bytes.Equal(gotAB, ab) || !bytes.Equal(gotBA, ba) {
				t.Fatalf("after %d cuts: got %d and %d bytes, want %d and %d, equal", cuts, len(gotAB), len(gotBA), len(ab), len(ba))
			}
			for range 2 {
				select {
				case how := <-done:
					if how != EndDone {
						t.Errorf("a flow ended %s; want done", how)
					}
				case <-time.After(10 * time.Second):
					t.Fatal("the flows did not finish")
				}
			}
			t.Logf("%d cuts", cuts)
		})
	}
}

func TestResetReachesThePeer(t *testing.T) {
	a, b := newPair(Options{})
	a.Write([]byte("partial"))
	buf := make([]byte, 7)
	if _, err := io.ReadFull(b, buf); err != nil {
		t.Fatal(err)
	}
	a.Reset()
	if _, err := b.Read(buf); !errors.Is(err, ErrReset) {
		t.Errorf("Read after the peer's reset = %v; want ErrReset", err)
	}
	if _, err := b.Write(buf); !errors.Is(err, ErrReset) {
		t.Errorf("Write after the peer's reset = %v; want ErrReset", err)
	}
}

// TestResetWhileDetached: a reset made while no stream is attached is
// delivered on the next one.
func TestResetWhileDetached(t *testing.T) {
	a, b := newPair(Options{})
	a.Detach()
	b.Detach()
	a.Reset()
	connect(a, b)
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := b.Read(make([]byte, 1)); !errors.Is(err, ErrReset) {
		t.Errorf("Read = %v; want ErrReset", err)
	}
}

func TestUnresumedFlowResets(t *testing.T) {
	done := make(chan End, 1)
	a, _ := newPair(Options{ResumeTimeout: 50 * time.Millisecond, OnDone: func(how End) { done <- how }})
	sa, _ := a.stream.(pipeStream)
	sa.Abort() // the connection dies; nobody resumes
	a.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := a.Read(make([]byte, 1)); !errors.Is(err, ErrReset) {
		t.Errorf("Read = %v; want ErrReset after the resume timeout", err)
	}
	if how := <-done; how != EndTimeout {
		t.Errorf("OnDone(%s); want %s", how, EndTimeout)
	}
}

// TestWriterWaitsWhenUnacknowledgedIsFull: with the peer not reading, a
// Write waits (it never drops) until the peer reads.
func TestWriterWaitsWhenUnacknowledgedIsFull(t *testing.T) {
	a, b := newPair(Options{MaxSend: 16 << 10, MaxRecv: 16 << 10})
	a.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	n, err := a.Write(make([]byte, 1<<20))
	if !errors.Is(err, os.ErrDeadlineExceeded) || n >= 1<<20 {
		t.Fatalf("Write = %d, %v; want it to stop at the buffer with a deadline error", n, err)
	}
	a.SetWriteDeadline(time.Time{})
	var wg sync.WaitGroup
	var got []byte
	readAll(t, b, &got, &wg)
	if _, err := a.Write(make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	a.CloseWrite()
	wg.Wait()
	if len(got) != n+1<<20 {
		t.Errorf("peer read %d bytes; want %d", len(got), n+1<<20)
	}
}

func TestPeerClaimingLostDataResets(t *testing.T) {
	a, b := newPair(Options{})
	a.Write([]byte("hello"))
	io.ReadFull(b, make([]byte, 5))
	time.Sleep(50 * time.Millisecond) // the acknowledgement arrives
	a.Detach()
	sa, sb := streamPair()
	a.Attach(sa, 0) // the peer says it has nothing: acknowledged data would be lost
	b.Attach(sb, 0)
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := b.Read(make([]byte, 1)); !errors.Is(err, ErrReset) {
		t.Errorf("Read = %v; want ErrReset", err)
	}
}

func FuzzReadFrame(f *testing.F) {
	f.Add(appendData(nil, 5))
	f.Add(appendAck(nil, 1<<40))
	f.Add([]byte{frameFin})
	f.Add([]byte{frameReset})
	f.Add([]byte{frameData, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		var s [9]byte
		fr, err := readFrame(bytes.NewReader(b), &s)
		if err != nil {
			return
		}
		switch fr.typ {
		case frameData:
			if fr.n == 0 || fr.n > MaxData {
				t.Errorf("data length %d accepted", fr.n)
			}
		case frameAck, frameFin, frameReset:
		default:
			t.Errorf("type %#x accepted", fr.typ)
		}
	})
}

// TestBufferClasses: a frame waits in the smallest pooled buffer that holds
// it, and a buffer goes back to its own class.
func TestBufferClasses(t *testing.T) {
	var b Buffers
	for _, tt := range []struct{ n, want int }{
		{smallFrame, smallFrame}, {smallFrame + 1, 2 * smallFrame}, {100 << 10, 128 << 10}, {MaxData - 1, MaxData}, {MaxData, MaxData},
	} {
		v := b.get(tt.n)
		if cap(*v) != tt.want {
			t.Errorf("get(%d) has %d bytes; want %d", tt.n, cap(*v), tt.want)
		}
		b.put(v)
	}
}
