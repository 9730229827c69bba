// Command faultpeer drives the fault lab's traffic. As "serve" (at the
// accepting party) it offers a paced source of seeded pseudo-random bytes
// on :9100 and a line echo on :9101. As "client" (at the other party) it
// pulls the source through ALL_PROXY (golang.org/x/net/proxy), checking
// every byte against the same seed, while it keeps an echo conversation
// going on a second connection: a line every 200 ms, each answered. It
// exits 0 only if the transfer completed with every byte right and the
// conversation never broke; as "expect-reset" it exits 0 only if the
// transfer ends in a connection reset (ECONNRESET), never an EOF.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/net/proxy"
)

func main() {
	mode := flag.String("mode", "client", "serve, client, idle or expect-reset")
	idle := flag.Duration("idle", 25*time.Second, "how long the idle mode keeps its connection quiet")
	target := flag.String("target", "10.0.0.1", "the serving party's address (client)")
	size := flag.Int("bytes", 8<<20, "bytes the source sends")
	rate := flag.Int("rate", 512<<10, "bytes per second the source sends")
	seed := flag.Uint64("seed", 1, "seed of the source's bytes")
	flag.Parse()
	var err error
	switch *mode {
	case "serve":
		err = serve(*size, *rate, *seed)
	case "client":
		err = client(*target, *size, *seed)
	case "expect-reset":
		err = expectReset(*target)
	case "idle":
		err = idleEcho(*target, *idle)
	default:
		err = fmt.Errorf("unknown mode %q", *mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "faultpeer:", err)
		os.Exit(1)
	}
}

// source is the deterministic byte stream of a seed.
type source struct{ r *rand.ChaCha8 }

func newSource(seed uint64) *source {
	var s [32]byte
	for i := range 8 {
		s[i] = byte(seed >> (8 * i))
	}
	return &source{rand.NewChaCha8(s)}
}

func (s *source) Read(b []byte) (int, error) { return s.r.Read(b) }

func serve(size, rate int, seed uint64) error {
	src, err := net.Listen("tcp", "127.0.0.1:9100")
	if err != nil {
		return err
	}
	echo, err := net.Listen("tcp", "127.0.0.1:9101")
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	for {
		c, err := src.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			s := newSource(seed)
			chunk := make([]byte, rate/10)
			for sent := 0; sent < size; sent += len(chunk) {
				n := min(len(chunk), size-sent)
				s.Read(chunk[:n])
				if _, err := c.Write(chunk[:n]); err != nil {
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		}()
	}
}

func dial(target string, port int) (net.Conn, error) {
	return proxy.FromEnvironment().Dial("tcp", net.JoinHostPort(target, strconv.Itoa(port)))
}

func client(target string, size int, seed uint64) error {
	echoErr := make(chan error, 1)
	stop := make(chan struct{})
	ec, err := dial(target, 9101)
	if err != nil {
		return fmt.Errorf("echo: %w", err)
	}
	defer ec.Close()
	lines := 0
	var longest time.Duration // the longest wait for an echo: what a fault cost the conversation
	go func() {
		r := bufio.NewReader(ec)
		for i := 0; ; i++ {
			select {
			case <-stop:
				echoErr <- nil
				return
			case <-time.After(200 * time.Millisecond):
			}
			msg := fmt.Sprintf("line %d\n", i)
			sent := time.Now()
			ec.SetDeadline(time.Now().Add(5 * time.Minute))
			if _, err := ec.Write([]byte(msg)); err != nil {
				echoErr <- fmt.Errorf("echo write %d: %w", i, err)
				return
			}
			got, err := r.ReadString('\n')
			if err != nil || got != msg {
				echoErr <- fmt.Errorf("echo line %d: got %q, %v", i, got, err)
				return
			}
			longest = max(longest, time.Since(sent))
			lines++
		}
	}()
	c, err := dial(target, 9100)
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	defer c.Close()
	want := newSource(seed)
	buf := make([]byte, 64<<10)
	exp := make([]byte, 64<<10)
	total := 0
	start := time.Now()
	last := start
	var gap time.Duration // the longest the source stood still: what a fault cost the transfer
	for total < size {
		c.SetReadDeadline(time.Now().Add(5 * time.Minute))
		n, err := c.Read(buf)
		if n > 0 {
			now := time.Now()
			if total > 0 {
				gap = max(gap, now.Sub(last))
			}
			last = now
			want.Read(exp[:n])
			for i := range n {
				if buf[i] != exp[i] {
					return fmt.Errorf("byte %d differs after %v: a byte was lost or repeated", total+i, time.Since(start).Round(time.Millisecond))
				}
			}
			total += n
		}
		if err != nil {
			return fmt.Errorf("source ended after %d of %d bytes: %w", total, size, err)
		}
	}
	close(stop)
	if err := <-echoErr; err != nil {
		return err
	}
	fmt.Printf("ok: %d bytes in %v, every byte right, longest_gap=%.2fs; %d echo lines, none lost, longest echo wait %v\n",
		total, time.Since(start).Round(time.Millisecond), gap.Seconds(), lines, longest.Round(10*time.Millisecond))
	return nil
}

// idleEcho says one line, stays quiet for idle, and says another: the
// connection must still be there.
func idleEcho(target string, idle time.Duration) error {
	c, err := dial(target, 9101)
	if err != nil {
		return err
	}
	defer c.Close()
	r := bufio.NewReader(c)
	for i, pause := range []time.Duration{0, idle} {
		time.Sleep(pause)
		msg := fmt.Sprintf("line %d after %v\n", i, pause)
		c.SetDeadline(time.Now().Add(time.Minute))
		if _, err := c.Write([]byte(msg)); err != nil {
			return fmt.Errorf("write after %v idle: %w", pause, err)
		}
		if got, err := r.ReadString('\n'); err != nil || got != msg {
			return fmt.Errorf("echo after %v idle: %q, %v", pause, got, err)
		}
	}
	fmt.Printf("ok: the connection answered after %v idle\n", idle)
	return nil
}

func expectReset(target string) error {
	c, err := dial(target, 9100)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(60 * time.Second))
	start := time.Now()
	n, err := io.Copy(io.Discard, c)
	switch {
	case errors.Is(err, syscall.ECONNRESET):
		fmt.Printf("ok: reset after %d bytes, %v after the start\n", n, time.Since(start).Round(time.Millisecond))
		return nil
	case err == nil:
		return fmt.Errorf("clean end of stream after %d bytes: a cut connection looked complete", n)
	}
	return fmt.Errorf("after %d bytes: %w; want ECONNRESET", n, err)
}
