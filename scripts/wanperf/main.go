// Command wanperf drives the WAN lab's transfers. As "serve" it answers
// every connection's request (8 bytes, big-endian: how many bytes, 0 for no
// end) with that many bytes of a fixed pseudo-random pattern. As "get" it
// opens -conns connections at once (through a SOCKS5 proxy with -socks, as
// an application with ALL_PROXY would) and either counts what arrives in
// -time after -warmup, printing the rate, or with -bytes checks that every
// connection delivers exactly that many bytes, each one right.
package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/proxy"
)

const blockSize = 1 << 20

// pattern is what every connection carries, repeated.
var pattern = func() []byte {
	b := make([]byte, blockSize)
	r := rand.NewChaCha8([32]byte{'w', 'a', 'n'})
	r.Read(b)
	return b
}()

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "wanperf: usage: wanperf serve|get [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	listen := fs.String("listen", "0.0.0.0:9200", "serve: where to listen")
	to := fs.String("to", "", "get: the server's address")
	socks := fs.String("socks", "", "get: a SOCKS5 proxy to go through")
	conns := fs.Int("conns", 1, "get: parallel connections")
	dur := fs.Duration("time", 0, "get: how long to count")
	warmup := fs.Duration("warmup", 0, "get: with -time, how long to wait before counting (slow start, the pool growing)")
	size := fs.Int64("bytes", 0, "get: bytes per connection, each checked")
	fs.Parse(os.Args[2:])
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(*listen)
	case "get":
		if *to == "" || *conns < 1 || (*dur <= 0) == (*size <= 0) {
			err = errors.New("get needs -to, -conns ≥ 1, and one of -time or -bytes")
			break
		}
		err = get(*to, *socks, *conns, *warmup, *dur, *size)
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "wanperf:", err)
		os.Exit(1)
	}
}

func serve(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			var req [8]byte
			if _, err := io.ReadFull(c, req[:]); err != nil {
				return
			}
			n := binary.BigEndian.Uint64(req[:])
			for sent := uint64(0); n == 0 || sent < n; {
				b := pattern
				if n != 0 {
					b = b[:min(uint64(len(b)), n-sent)]
				}
				k, err := c.Write(b)
				sent += uint64(k)
				if err != nil {
					return
				}
			}
		}()
	}
}

func dial(to, socks string) (net.Conn, error) {
	if socks == "" {
		return net.DialTimeout("tcp", to, 30*time.Second)
	}
	d, err := proxy.SOCKS5("tcp", socks, nil, &net.Dialer{Timeout: 30 * time.Second})
	if err != nil {
		return nil, err
	}
	return d.Dial("tcp", to)
}

// get opens the connections, then counts or checks what they deliver.
func get(to, socks string, n int, warmup, dur time.Duration, size int64) error {
	cs := make([]net.Conn, n)
	for i := range cs {
		c, err := dial(to, socks)
		if err != nil {
			return fmt.Errorf("connection %d: %w", i, err)
		}
		defer c.Close()
		cs[i] = c
	}
	var total atomic.Int64
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i, c := range cs {
		var req [8]byte
		binary.BigEndian.PutUint64(req[:], uint64(size))
		if _, err := c.Write(req[:]); err != nil {
			return fmt.Errorf("connection %d: %w", i, err)
		}
		wg.Go(func() { errs[i] = read(c, size, &total) })
	}
	if dur > 0 {
		time.Sleep(warmup)
		before, from := total.Load(), time.Now()
		time.Sleep(dur)
		got := total.Load() - before
		elapsed := time.Since(from)
		for _, c := range cs {
			c.Close()
		}
		wg.Wait()
		return json.NewEncoder(os.Stdout).Encode(map[string]any{
			"conns": n, "bytes": got, "seconds": elapsed.Seconds(), "MBps": float64(got) / 1e6 / elapsed.Seconds(),
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return err
	}
	fmt.Printf("%d connections × %d bytes, every byte right, %.2f MB/s\n", n, size, float64(total.Load())/1e6/elapsed.Seconds())
	return nil
}

// read reads c to its end: with size > 0 it checks every byte against
// the pattern and that exactly size arrive; with size 0 it only counts.
func read(c net.Conn, size int64, total *atomic.Int64) error {
	buf := make([]byte, 256<<10)
	var off int64
	for {
		k, err := c.Read(buf)
		if size > 0 {
			for got := buf[:k]; len(got) > 0; {
				at := int(off % blockSize)
				m := min(len(got), blockSize-at)
				if !bytes.Equal(got[:m], pattern[at:at+m]) {
					return fmt.Errorf("byte %d and after: wrong data", off)
				}
				got, off = got[m:], off+int64(m)
			}
		} else {
			off += int64(k)
		}
		total.Add(int64(k))
		switch {
		case err == io.EOF && size > 0 && off != size:
			return fmt.Errorf("stream ended after %d of %d bytes", off, size)
		case err == io.EOF || (err != nil && size == 0):
			return nil
		case err != nil:
			return fmt.Errorf("after %d bytes: %w", off, err)
		case size > 0 && off > size:
			return fmt.Errorf("more than %d bytes", size)
		}
	}
}
