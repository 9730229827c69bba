// Command wanem is the WAN lab's link emulator: this kernel has no netem,
// so it bridges two interfaces in userspace over AF_PACKET, holding every
// frame for a one-way delay and dropping a random fraction, in both
// directions. The rate is tbf's job, on the interfaces wanem writes to (a
// frame the full queue refuses is dropped, as at a real bottleneck).
// Offloads must be off on every interface the frames cross (ethtool -K IF
// tx off rx off tso off gso off gro off), or checksums arrive broken.
//
//	wanem -a wa -b wb -delay 25ms -loss 0.001
package main

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	a := flag.String("a", "", "one interface")
	b := flag.String("b", "", "the other interface")
	delay := flag.Duration("delay", 25*time.Millisecond, "one-way delay (each direction)")
	loss := flag.Float64("loss", 0, "fraction of frames dropped (each direction), 0 to 1")
	flag.Parse()
	if *a == "" || *b == "" || *loss < 0 || *loss > 1 || *delay < 0 {
		fmt.Fprintln(os.Stderr, "wanem: usage: wanem -a IF -b IF [-delay D] [-loss FRACTION 0..1]")
		os.Exit(2)
	}
	fa, err := open(*a)
	if err == nil {
		var fb int
		if fb, err = open(*b); err == nil {
			var dropped [2]atomic.Uint64
			go forward(fa, fb, *delay, *loss, &dropped[0])
			go forward(fb, fa, *delay, *loss, &dropped[1])
			sig := make(chan os.Signal, 1)
			signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
			<-sig
			fmt.Printf("wanem: dropped %d frames %s->%s, %d %s->%s\n", dropped[0].Load(), *a, *b, dropped[1].Load(), *b, *a)
			return
		}
	}
	fmt.Fprintln(os.Stderr, "wanem:", err)
	os.Exit(1)
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// open is a raw packet socket bound to interface name, with large buffers.
func open(name string) (int, error) {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return -1, err
	}
	fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_RAW, int(htons(syscall.ETH_P_ALL)))
	if err != nil {
		return -1, fmt.Errorf("packet socket (needs root): %w", err)
	}
	for _, opt := range []int{syscall.SO_RCVBUFFORCE, syscall.SO_SNDBUFFORCE} {
		syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, opt, 32<<20)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrLinklayer{Protocol: htons(syscall.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
		syscall.Close(fd)
		return -1, fmt.Errorf("bind %s: %w", name, err)
	}
	return fd, nil
}

type frame struct {
	due time.Time
	b   []byte
}

// forward carries frames arriving on from out of to, each after delay,
// dropping the fraction loss. Frames keep their order.
func forward(from, to int, delay time.Duration, loss float64, dropped *atomic.Uint64) {
	q := make(chan frame, 1<<16)
	go func() {
		for f := range q {
			if d := time.Until(f.due); d > 0 {
				time.Sleep(d)
			}
			// A refused frame (the rate limiter's queue is full) is lost,
			// as at a router.
			syscall.Write(to, f.b)
		}
	}()
	buf := make([]byte, 65536)
	for {
		n, sa, err := syscall.Recvfrom(from, buf, 0)
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			fmt.Fprintln(os.Stderr, "wanem: read:", err)
			os.Exit(1)
		}
		if ll, ok := sa.(*syscall.SockaddrLinklayer); ok && ll.Pkttype == syscall.PACKET_OUTGOING {
			continue // what we wrote ourselves
		}
		if loss > 0 && rand.Float64() < loss {
			dropped.Add(1)
			continue
		}
		f := frame{due: time.Now().Add(delay), b: append([]byte(nil), buf[:n]...)}
		select {
		case q <- f:
		default:
			dropped.Add(1) // far more in flight than any path holds
		}
	}
}
