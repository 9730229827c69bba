// Command mpcpeer does on the network what SF-GWAS does, for the sfkit lab:
// it reads configGlobal.toml, and for each other party either listens (the
// lower party id, on 0.0.0.0 at ports[higher] + t) or dials (the higher
// one, ipaddr:port + t) through golang.org/x/net/proxy's FromEnvironment,
// as sfgwas does, retrying a failed dial (-tries). On each of mpc_num_threads
// connections per pair both sides send random bytes and the sha256 of
// them, and check what they receive.
//
// With -plain it dials with net.Dial, as programs that ignore ALL_PROXY do.
// With -listen-delay D it starts listening only after a random pause of up
// to D, and with -tries 1 it dials once, as hcholab's demo program does: then
// a dial that reaches a peer before that peer listens must wait there.
package main

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"flag"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/BurntSushi/toml"
	"golang.org/x/net/proxy"
)

type server struct {
	IPAddr string            `toml:"ipaddr"`
	Ports  map[string]string `toml:"ports"`
}

type cfg struct {
	Threads int               `toml:"mpc_num_threads"`
	Servers map[string]server `toml:"servers"`
}

func main() {
	path := flag.String("mpc", "configGlobal.toml", "the MPC config")
	pid := flag.Int("pid", -1, "this party's id")
	size := flag.Int("bytes", 4<<20, "bytes each side sends on each connection")
	plain := flag.Bool("plain", false, "dial with net.Dial, ignoring ALL_PROXY")
	delay := flag.Duration("listen-delay", 0, "listen only after a random pause of up to this long")
	tries := flag.Int("tries", 120, "dial attempts per connection, 1 s apart (sfgwas: 100, 5 s apart)")
	flag.Parse()
	var pause time.Duration
	if *delay > 0 {
		pause = mrand.N(*delay)
	}
	n, err := run(*path, *pid, *size, *plain, *tries, pause)
	if err != nil {
		fmt.Fprintf(os.Stderr, "mpcpeer %d: %v\n", *pid, err)
		os.Exit(1)
	}
	fmt.Printf("party %d: %d connections ok\n", *pid, n)
}

// run listens (after pause) and dials (at once) as the MPC config says.
func run(path string, me, size int, plain bool, tries int, pause time.Duration) (int, error) {
	var c cfg
	if _, err := toml.DecodeFile(path, &c); err != nil {
		return 0, err
	}
	var d proxy.Dialer = proxy.FromEnvironment()
	if plain {
		d = &net.Dialer{}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	count := 0
	for name, other := range c.Servers {
		them, err := strconv.Atoi(name[len("party"):])
		if err != nil || them == me {
			continue
		}
		for t := range c.Threads {
			count++
			if me < them {
				base, _ := strconv.Atoi(c.Servers["party"+strconv.Itoa(me)].Ports[name])
				wg.Go(func() {
					time.Sleep(pause)
					ln, err := net.Listen("tcp", "0.0.0.0:"+strconv.Itoa(base+t))
					if err != nil {
						errs <- err
						return
					}
					defer ln.Close()
					conn, err := ln.Accept()
					if err != nil {
						errs <- err
						return
					}
					errs <- exchange(conn, size, them, t)
				})
				continue
			}
			base, _ := strconv.Atoi(other.Ports["party"+strconv.Itoa(me)])
			addr := net.JoinHostPort(other.IPAddr, strconv.Itoa(base+t))
			wg.Go(func() {
				var conn net.Conn
				var err error
				for try := range tries {
					if try > 0 {
						time.Sleep(time.Second)
					}
					if conn, err = d.Dial("tcp", addr); err == nil {
						break
					}
				}
				if err != nil {
					errs <- fmt.Errorf("dial party %d at %s: %w", them, addr, err)
					return
				}
				errs <- exchange(conn, size, them, t)
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return 0, err
		}
	}
	return count, nil
}

// exchange sends size random bytes and their sha256, reads the same from
// the other side and checks it.
func exchange(c net.Conn, size, them, t int) error {
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Minute))
	data := make([]byte, size)
	rand.Read(data)
	sum := sha256.Sum256(data)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(append(data, sum[:]...))
		werr <- err
	}()
	got := make([]byte, size+sha256.Size)
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("party %d thread %d: read: %w", them, t, err)
	}
	if s := sha256.Sum256(got[:size]); !bytes.Equal(s[:], got[size:]) {
		return fmt.Errorf("party %d thread %d: sha256 differs", them, t)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("party %d thread %d: write: %w", them, t, err)
	}
	return nil
}
