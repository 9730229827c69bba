// Command mpcpeer does on the network what SF-GWAS does, for the sfkit lab:
// it reads configGlobal.toml, and for each other party either listens (the
// lower party id, on 0.0.0.0 at ports[higher] + t) or dials (the higher
// one, ipaddr:port + t) through golang.org/x/net/proxy's FromEnvironment,
// as sfgwas does, retrying a failed dial. On each of mpc_num_threads
// connections per pair both sides send random bytes and the sha256 of
// them, and check what they receive.
//
// With -plain it dials with net.Dial, as programs that ignore ALL_PROXY do.
package main

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"flag"
	"fmt"
	"io"
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
	flag.Parse()
	n, err := run(*path, *pid, *size, *plain)
	if err != nil {
		fmt.Fprintf(os.Stderr, "mpcpeer %d: %v\n", *pid, err)
		os.Exit(1)
	}
	fmt.Printf("party %d: %d connections ok\n", *pid, n)
}

func run(path string, me, size int, plain bool) (int, error) {
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
				ln, err := net.Listen("tcp", "0.0.0.0:"+strconv.Itoa(base+t))
				if err != nil {
					return 0, err
				}
				wg.Go(func() {
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
				for range 120 { // sfgwas: 100 tries, 5 s apart
					if conn, err = d.Dial("tcp", addr); err == nil {
						break
					}
					time.Sleep(time.Second)
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
