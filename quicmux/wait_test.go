package quicmux

import (
	"context"
	"errors"
	"net"
	"strconv"
	"syscall"
	"testing"
	"time"

	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/quicmux/header"
)

// freePort is a loopback port nothing listens on (for a moment).
func freePort(t *testing.T) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

// TestWaitingPortsWaitForTheirListener: a connection to a port that waits
// (an -mpc port) and finds nothing listening is answered once a program
// listens there, and is shown waiting meanwhile; one that never listens is
// refused after the wait; other ports are refused at once; and a peer can
// park only so many waits.
func TestWaitingPortsWaitForTheirListener(t *testing.T) {
	late, never, plain := freePort(t), freePort(t), freePort(t)
	a := startParty(t, 0, nil, allowAll)
	b := startPartyWith(t, 1, nil, allowAll, func(o *Options) {
		o.WaitPort = func(_ int, p uint16) bool { return p == late || p == never }
		o.LocalWait = 2 * time.Second
		o.MaxWaiting = 2
	})
	introduce(a, b)
	waiting := func() int {
		for _, p := range b.m.Stats().Peers {
			if p.PID == 0 {
				return p.Waiting
			}
		}
		return -1
	}

	t.Run("late listener", func(t *testing.T) {
		type result struct {
			err error
			at  time.Time
		}
		done := make(chan result, 1)
		go func() {
			c, err := a.m.Dial(ctxTimeout(t, 20*time.Second), 1, late)
			if err == nil {
				c.Close()
			}
			done <- result{err, time.Now()}
		}()
		testkit.Eventually(t, "party 1 shows party 0's connection waiting", func() bool { return waiting() == 1 })
		listened := time.Now()
		ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(int(late)))
		if err != nil {
			t.Fatal(err)
		}
		testkit.Serve(t, ln, func(c net.Conn) { c.Close() })
		r := <-done
		if r.err != nil {
			t.Fatalf("Dial to a port that listens late = %v; want a connection", r.err)
		}
		if r.at.Before(listened) {
			t.Errorf("Dial succeeded before anything listened")
		}
		testkit.Eventually(t, "no connection waiting any more", func() bool { return waiting() == 0 })
	})

	t.Run("never listens", func(t *testing.T) {
		start := time.Now()
		_, err := a.m.Dial(ctxTimeout(t, 20*time.Second), 1, never)
		if !errors.Is(err, header.ErrRefused) {
			t.Fatalf("Dial to a port that never listens = %v; want header.ErrRefused", err)
		}
		if d := time.Since(start); d < 2*time.Second {
			t.Errorf("refused after %v; want it to wait LocalWait (2s) first", d)
		}
	})

	t.Run("other ports are refused at once", func(t *testing.T) {
		start := time.Now()
		_, err := a.m.Dial(ctxTimeout(t, 20*time.Second), 1, plain)
		if !errors.Is(err, header.ErrRefused) {
			t.Fatalf("Dial = %v; want header.ErrRefused", err)
		}
		if d := time.Since(start); d >= 2*time.Second {
			t.Errorf("refused after %v; want at once", d)
		}
	})

	t.Run("a peer parks at most MaxWaiting", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		parked := make(chan error, 2)
		for range 2 {
			go func() {
				_, err := a.m.Dial(ctx, 1, never)
				parked <- err
			}()
		}
		testkit.Eventually(t, "two connections waiting", func() bool { return waiting() == 2 })
		_, err := a.m.Dial(ctxTimeout(t, 20*time.Second), 1, never)
		if !errors.Is(err, header.ErrOverBudget) {
			t.Errorf("third waiting Dial = %v; want header.ErrOverBudget", err)
		}
		// A client that gives up ends its wait at the peer too.
		cancel()
		for range 2 {
			<-parked
		}
		testkit.Eventually(t, "the given-up waits end at party 1", func() bool { return waiting() == 0 })
	})
}

// TestLocalBuffersHoldSegments: the fixed send buffer of a local connection
// holds several loopback segments. With room for one, the local program's
// kernel delays its ack of each lone segment (40 ms), and what a peer sends
// to a local port crawls (2 MB/s, where 120 MB/s is this machine's rate).
func TestLocalBuffersHoldSegments(t *testing.T) {
	port := testkit.Echo(t)
	d := net.Dialer{Control: localBuffers}
	c, err := d.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var sndbuf, mss int
	var serr error
	if err := rc.Control(func(fd uintptr) {
		sndbuf, serr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF)
		if serr == nil {
			mss, serr = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG)
		}
	}); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	if sndbuf < 3*mss {
		t.Errorf("a local connection's send buffer is %d bytes, room for fewer than 3 segments of %d", sndbuf, mss)
	}
}
