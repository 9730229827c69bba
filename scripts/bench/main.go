// Command bench measures sfkit-proxy on loopback, side by side with raw
// quic-go and raw TCP between two processes: throughput of one and of eight
// connections, connect latency (warm and cold), memory and CPU. It prints a
// table of medians with the ratios and writes the same as JSON.
//
//	go run ./scripts/bench --bin ./sfkit-proxy --json bench.json
//
// The sink of every transfer is a child process (this program, re-executed)
// that reads to EOF and answers with the count, so a transfer is timed from
// the first byte written to the sink's answer.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"

	"sfkit-proxy/admin"
	"sfkit-proxy/identity"
	"sfkit-proxy/quicmux"
)

const alpn = "sfkit-bench"

func main() {
	if len(os.Args) > 2 && os.Args[1] == "child" {
		// A child serves until it is killed; it returns only on failure.
		fmt.Fprintln(os.Stderr, "bench child:", child(os.Args[2]))
		os.Exit(1)
	}
	bin := flag.String("bin", "./sfkit-proxy", "the sfkit-proxy binary")
	runs := flag.Int("runs", 5, "runs of each throughput measurement (the median is reported)")
	sizeMB := flag.Int("size-mb", 128, "bytes per throughput run, in MiB")
	peers := flag.Int("peers", 10, "peers of the sidecar whose idle RSS is measured")
	idle := flag.Int("idle-conns", 500, "idle tunnelled connections opened to measure RSS per connection")
	jsonOut := flag.String("json", "bench.json", "where to write the results")
	profile := flag.String("profile", "", "a directory for CPU profiles of both sidecars during a bulk transfer (none without)")
	flag.Parse()
	if err := run(*bin, *runs, int64(*sizeMB)<<20, *peers, *idle, *jsonOut, *profile); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// Result is one line of the table.
type Result struct {
	Name   string  `json:"name"`
	Value  float64 `json:"value"`
	Unit   string  `json:"unit"`
	Target string  `json:"target,omitempty"`
	Met    *bool   `json:"met,omitempty"`
}

type lab struct {
	bin, dir string
	procs    []*exec.Cmd
	sink     *exec.Cmd
	sinkPort int // reads to EOF, answers with the count
	helloPt  int // writes one byte on accept
	quicSink *exec.Cmd
	quicAddr string
	regURL   string
	sidecars map[int]*sidecar
}

type sidecar struct {
	cmd          *exec.Cmd
	socks, admin string
}

func run(bin string, runs int, size int64, npeers, nidle int, jsonOut, profileDir string) error {
	bin, err := filepath.Abs(bin)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "sfkit-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	l := &lab{bin: bin, dir: dir, sidecars: map[int]*sidecar{}}
	defer l.stopAll()

	if err := l.startSinks(); err != nil {
		return err
	}
	if err := l.startRegistry(40); err != nil {
		return err
	}
	var res []Result
	add := func(name string, v float64, unit, target string, met *bool) {
		res = append(res, Result{Name: name, Value: v, Unit: unit, Target: target, Met: met})
		fmt.Printf("  %-58s %12.2f %-8s %s\n", name, v, unit, targetText(target, met))
	}
	fmt.Printf("sfkit-proxy benchmark: loopback, %d runs of %d MiB, medians\n\n", runs, size>>20)

	// Memory of an idle sidecar with npeers peers.
	for pid := 0; pid <= npeers; pid++ {
		if err := l.startSidecar(pid); err != nil {
			return err
		}
	}
	if err := l.waitPeers(0, npeers); err != nil {
		return err
	}
	time.Sleep(2 * time.Second)
	rss0, _ := rssKiB(l.sidecars[0].cmd.Process.Pid)
	add(fmt.Sprintf("RSS of an idle sidecar with %d peers", npeers), float64(rss0)/1024, "MiB", "<= 30", met(float64(rss0)/1024 <= 30))
	for pid := 2; pid <= npeers; pid++ {
		l.stopSidecar(pid)
	}

	// RSS per idle tunnelled connection.
	before := rssBoth(l)
	conns := make([]net.Conn, 0, nidle)
	for range nidle {
		c, err := socksConnect(l.sidecars[0].socks, 1, l.sinkPort)
		if err != nil {
			return fmt.Errorf("idle connection: %w", err)
		}
		conns = append(conns, c)
	}
	time.Sleep(2 * time.Second)
	after := rssBoth(l)
	perConn := float64(after-before) / float64(nidle)
	add(fmt.Sprintf("RSS per idle tunnelled connection (both sidecars, %d open)", nidle), perConn, "KiB", "<= 64", met(perConn <= 64))
	for _, c := range conns {
		c.Close()
	}

	// Warm connect: SOCKS CONNECT over the established QUIC connection to
	// the first byte from the far side.
	var lat []float64
	for range 300 {
		t0 := time.Now()
		c, err := socksConnect(l.sidecars[0].socks, 1, l.helloPt)
		if err != nil {
			return err
		}
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return err
		}
		lat = append(lat, float64(time.Since(t0).Microseconds())/1000)
		c.Close()
	}
	warm := median(lat)
	add("warm connect to first byte (median of 300)", warm, "ms", "<= 0.5", met(warm <= 0.5))
	add("warm connect to first byte (p90)", percentile(lat, 0.9), "ms", "", nil)
	add("raw TCP connect to first byte (median of 300)", median(tcpConnectLatency(l.helloPt, 300)), "ms", "", nil)
	p, err := pingMedian(l.sidecars[0].admin, 1)
	if err != nil {
		return err
	}
	add("stream round trip through the tunnel (sfkit-proxy ping, median)", p, "ms", "", nil)

	// Throughput and CPU.
	qc, err := l.dialQUIC()
	if err != nil {
		return err
	}
	defer qc.CloseWithError(0, "")
	tunnelPIDs := []int{l.sidecars[0].cmd.Process.Pid, l.sidecars[1].cmd.Process.Pid, l.sink.Process.Pid}
	cases := []struct {
		name string
		n    int
		pids []int
		open func() (io.WriteCloser, io.Reader, error)
	}{
		{"tunnel", 1, tunnelPIDs, l.tunnelConn},
		{"raw quic-go", 1, []int{l.quicSink.Process.Pid}, quicStream(qc)},
		{"raw TCP", 1, []int{l.sink.Process.Pid}, l.tcpConn},
		{"tunnel", 8, tunnelPIDs, l.tunnelConn},
		{"raw quic-go", 8, []int{l.quicSink.Process.Pid}, quicStream(qc)},
		{"raw TCP", 8, []int{l.sink.Process.Pid}, l.tcpConn},
	}
	tput := map[string]float64{}
	cpu := map[string]float64{}
	for _, c := range cases {
		var rates, perCPU []float64
		for range runs {
			cpu0 := cpuSeconds(c.pids, true)
			r, err := transfer(c.n, size, c.open)
			bpc := float64(size/int64(c.n)*int64(c.n)) / (cpuSeconds(c.pids, true) - cpu0)
			if err != nil {
				return fmt.Errorf("%s x%d: %w", c.name, c.n, err)
			}
			rates, perCPU = append(rates, r), append(perCPU, bpc)
		}
		key := fmt.Sprintf("%s x%d", c.name, c.n)
		tput[key], cpu[key] = median(rates), median(perCPU)
		add(fmt.Sprintf("throughput, %d connection(s): %s", c.n, c.name), tput[key], "MB/s", "", nil)
	}
	for _, n := range []int{1, 8} {
		k := func(name string) string { return fmt.Sprintf("%s x%d", name, n) }
		rq := tput[k("tunnel")] / tput[k("raw quic-go")]
		add(fmt.Sprintf("ratio tunnel / raw quic-go, %d connection(s)", n), rq, "x", ">= 0.9", met(rq >= 0.9))
		add(fmt.Sprintf("ratio tunnel / raw TCP, %d connection(s)", n), tput[k("tunnel")]/tput[k("raw TCP")], "x", "", nil)
	}
	add("bytes per CPU-second: tunnel (1 connection)", cpu["tunnel x1"]/1e6, "MB/cpu-s", "", nil)
	add("bytes per CPU-second: raw quic-go (1 connection)", cpu["raw quic-go x1"]/1e6, "MB/cpu-s", "", nil)
	rc := cpu["tunnel x1"] / cpu["raw quic-go x1"]
	add("ratio of bytes per CPU-second, tunnel / raw quic-go", rc, "x", ">= 0.9", met(rc >= 0.9))
	for pid := range 2 {
		hwm, _ := statusKiB(l.sidecars[pid].cmd.Process.Pid, "VmHWM:")
		add(fmt.Sprintf("peak RSS of sidecar %d after the transfers", pid), float64(hwm)/1024, "MiB", "", nil)
	}

	if err := l.freshPair(runs, size, profileDir, add); err != nil {
		return err
	}

	// Cold start: two new sidecars, from launch to the first byte.
	var cold []float64
	for i := range 3 {
		a, b := 20+2*i, 21+2*i
		t0 := time.Now()
		if err := l.startSidecar(a); err != nil {
			return err
		}
		if err := l.startSidecar(b); err != nil {
			return err
		}
		var got bool
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			c, err := socksConnect(l.sidecars[a].socks, b, l.helloPt)
			if err != nil {
				continue
			}
			var one [1]byte
			_, err = io.ReadFull(c, one[:])
			c.Close()
			if err == nil {
				got = true
				break
			}
		}
		if !got {
			return fmt.Errorf("cold start: no first byte within 30 s")
		}
		cold = append(cold, float64(time.Since(t0).Milliseconds()))
		l.stopSidecar(a)
		l.stopSidecar(b)
	}
	add("cold start: launch two sidecars to first byte (median of 3)", median(cold), "ms", "", nil)

	b, _ := json.MarshalIndent(map[string]any{"runs": runs, "size_bytes": size, "results": res}, "", "  ")
	if err := os.WriteFile(jsonOut, b, 0o644); err != nil {
		return err
	}
	fmt.Printf("\nwrote %s\n", jsonOut)
	return nil
}

func met(b bool) *bool { return &b }

func targetText(target string, m *bool) string {
	switch {
	case target == "":
		return ""
	case *m:
		return "target " + target + ": met"
	}
	return "target " + target + ": MISSED"
}

func median(v []float64) float64 { return percentile(v, 0.5) }

func percentile(v []float64, p float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[int(p*float64(len(s)-1)+0.5)]
}

// freshPair starts two new sidecars (30 sends, 31 receives) and runs four
// parallel bulk transfers of size bytes each between them, runs times:
// the CPU per GB each sidecar spends and its peak RSS. With profileDir, it
// then takes a CPU profile of both during a longer transfer on 1 and on 4
// connections.
func (l *lab) freshPair(runs int, size int64, profileDir string, add func(string, float64, string, string, *bool)) error {
	const a, b = 30, 31
	for _, pid := range []int{a, b} {
		if err := l.startSidecar(pid); err != nil {
			return err
		}
	}
	defer l.stopSidecar(a)
	defer l.stopSidecar(b)
	if err := l.waitPeer(a, b); err != nil {
		return err
	}
	open := func() (io.WriteCloser, io.Reader, error) {
		c, err := socksConnect(l.sidecars[a].socks, b, l.sinkPort)
		return c, c, err
	}
	pa, pb := l.sidecars[a].cmd.Process.Pid, l.sidecars[b].cmd.Process.Pid
	var perGB [2][]float64
	var rates []float64
	for range runs {
		ca, cb := cpuSeconds([]int{pa}, false), cpuSeconds([]int{pb}, false)
		r, err := transfer(4, 4*size, open)
		if err != nil {
			return fmt.Errorf("fresh pair x4: %w", err)
		}
		gb := float64(4*size) / 1e9
		rates = append(rates, r)
		perGB[0] = append(perGB[0], (cpuSeconds([]int{pa}, false)-ca)/gb)
		perGB[1] = append(perGB[1], (cpuSeconds([]int{pb}, false)-cb)/gb)
	}
	add("throughput, 4 connections, fresh pair: tunnel", median(rates), "MB/s", "", nil)
	add("CPU per GB carried, sending sidecar, 4 connections", median(perGB[0]), "cpu-s/GB", "", nil)
	add("CPU per GB carried, receiving sidecar, 4 connections", median(perGB[1]), "cpu-s/GB", "", nil)
	for i, pid := range []int{pa, pb} {
		hwm, _ := statusKiB(pid, "VmHWM:")
		add(fmt.Sprintf("peak RSS after 4 parallel bulk transfers, %s sidecar", [2]string{"sending", "receiving"}[i]),
			float64(hwm)/1024, "MiB", "<= 40", met(float64(hwm)/1024 <= 40))
	}
	if profileDir == "" {
		return nil
	}
	if err := os.MkdirAll(profileDir, 0o755); err != nil {
		return err
	}
	// About 10 s of transfer at the rate just measured; the profiles take
	// 5 s of it, from its second second.
	long := int64(median(rates)*10e6) &^ 0xfffff
	for _, n := range []int{1, 4} {
		done := make(chan error, 1)
		go func() { _, err := transfer(n, long, open); done <- err }()
		time.Sleep(time.Second)
		var wg sync.WaitGroup
		for i, pid := range []int{a, b} {
			wg.Go(func() {
				out := filepath.Join(profileDir, fmt.Sprintf("%s-%dconn.pprof", [2]string{"send", "recv"}[i], n))
				if err := fetchProfile(l.sidecars[pid].admin, out); err != nil {
					fmt.Fprintln(os.Stderr, "bench: profile:", err)
				}
			})
		}
		wg.Wait()
		if err := <-done; err != nil {
			return fmt.Errorf("profile run x%d: %w", n, err)
		}
	}
	fmt.Printf("  (CPU profiles of both sidecars, 1 and 4 connections, in %s)\n", profileDir)
	return nil
}

// fetchProfile saves a 5-second CPU profile from a sidecar's admin API.
func fetchProfile(admin, out string) error {
	resp, err := http.Get("http://" + admin + "/debug/pprof/profile?seconds=5")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", admin, resp.Status)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	return os.WriteFile(out, b, 0o644)
}

// transfer moves size bytes over n connections in parallel and returns the
// rate (MB/s).
func transfer(n int, size int64, open func() (io.WriteCloser, io.Reader, error)) (float64, error) {
	type conn struct {
		w io.WriteCloser
		r io.Reader
	}
	cs := make([]conn, n)
	for i := range cs {
		w, r, err := open()
		if err != nil {
			return 0, err
		}
		cs[i] = conn{w, r}
	}
	per := size / int64(n)
	t0 := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for _, c := range cs {
		wg.Go(func() {
			buf := make([]byte, 256<<10)
			rand.Read(buf)
			for left := per; left > 0; {
				k := min(left, int64(len(buf)))
				if _, err := c.w.Write(buf[:k]); err != nil {
					errs <- err
					return
				}
				left -= k
			}
			if cw, ok := c.w.(interface{ CloseWrite() error }); ok {
				cw.CloseWrite()
			} else {
				c.w.Close()
			}
			var ack [8]byte
			if _, err := io.ReadFull(c.r, ack[:]); err != nil {
				errs <- fmt.Errorf("ack: %w", err)
				return
			}
			if got := int64(binary.BigEndian.Uint64(ack[:])); got != per {
				errs <- fmt.Errorf("sink counted %d bytes, want %d", got, per)
			}
		})
	}
	wg.Wait()
	el := time.Since(t0).Seconds()
	for _, c := range cs {
		c.w.Close()
	}
	select {
	case err := <-errs:
		return 0, err
	default:
	}
	return float64(per*int64(n)) / 1e6 / el, nil
}

// cpuSeconds is the CPU time of pids so far, and of this process with self.
func cpuSeconds(pids []int, self bool) float64 {
	var s float64
	if self {
		var ru syscall.Rusage
		syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		s = float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
	}
	tick := 100.0 // USER_HZ on Linux
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		ut, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		s += (ut + st) / tick
	}
	return s
}

func statusKiB(pid int, field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, field) {
			f := strings.Fields(line)
			return strconv.ParseInt(f[1], 10, 64)
		}
	}
	return 0, fmt.Errorf("no %s", field)
}

func rssKiB(pid int) (int64, error) { return statusKiB(pid, "VmRSS:") }

func rssBoth(l *lab) int64 {
	a, _ := rssKiB(l.sidecars[0].cmd.Process.Pid)
	b, _ := rssKiB(l.sidecars[1].cmd.Process.Pid)
	return a + b
}

func freePort() int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startChild runs this program in a child mode and reads its first line.
func startChild(mode string) (*exec.Cmd, string, error) {
	cmd := exec.Command(os.Args[0], "child", mode)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, "", err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, "", err
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	return cmd, strings.TrimSpace(line), err
}

func (l *lab) startSinks() error {
	var line string
	var err error
	if l.sink, line, err = startChild("tcp-sink"); err != nil {
		return err
	}
	l.procs = append(l.procs, l.sink)
	fmt.Sscanf(line, "%d %d", &l.sinkPort, &l.helloPt)
	if l.quicSink, l.quicAddr, err = startChild("quic-sink"); err != nil {
		return err
	}
	l.procs = append(l.procs, l.quicSink)
	return nil
}

func (l *lab) startRegistry(parties int) error {
	var tok strings.Builder
	for pid := range parties {
		fmt.Fprintf(&tok, "bench-token-%04d-padding bench %d\n", pid, pid)
		os.WriteFile(filepath.Join(l.dir, fmt.Sprintf("key%d", pid)), fmt.Appendf(nil, "bench-token-%04d-padding\n", pid), 0o600)
	}
	os.WriteFile(filepath.Join(l.dir, "tokens"), []byte(tok.String()), 0o600)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort())
	cmd := exec.Command(l.bin, "registry", "--listen", addr, "--tokens", filepath.Join(l.dir, "tokens"),
		"--data", filepath.Join(l.dir, "registry"), "--log-level", "warn")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	l.procs = append(l.procs, cmd)
	l.regURL = "http://" + addr + "/"
	for range 100 {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return errors.New("registry did not start")
}

func (l *lab) startSidecar(pid int) error {
	s := &sidecar{socks: fmt.Sprintf("127.0.0.1:%d", freePort()), admin: fmt.Sprintf("127.0.0.1:%d", freePort())}
	logf, err := os.Create(filepath.Join(l.dir, fmt.Sprintf("sidecar%d.log", pid)))
	if err != nil {
		return err
	}
	s.cmd = exec.Command(l.bin, "--study", "bench", "--pid", strconv.Itoa(pid), "--registry", l.regURL,
		"--auth-key-file", filepath.Join(l.dir, fmt.Sprintf("key%d", pid)), "--socks-listen", s.socks,
		"--admin-listen", s.admin, "--udp-listen", "127.0.0.1:0", "--stun", "127.0.0.1:9",
		"--state-dir", filepath.Join(l.dir, fmt.Sprintf("state%d", pid)), "--log-level", "warn", "--admin-debug",
		// The sinks listen on ports picked at run time.
		"--allow-ports", "all")
	s.cmd.Stderr = logf
	if err := s.cmd.Start(); err != nil {
		return err
	}
	l.sidecars[pid] = s
	return nil
}

func (l *lab) stopSidecar(pid int) {
	if s := l.sidecars[pid]; s != nil {
		s.cmd.Process.Signal(syscall.SIGTERM)
		s.cmd.Wait()
		delete(l.sidecars, pid)
	}
}

func (l *lab) stopAll() {
	for pid := range l.sidecars {
		l.stopSidecar(pid)
	}
	for _, p := range l.procs {
		p.Process.Kill()
		p.Wait()
	}
}

// waitPeer waits until sidecar pid reports peer direct.
func (l *lab) waitPeer(pid, peer int) error {
	return l.waitDirect(pid, fmt.Sprintf("peer %d", peer), func(direct []int) bool { return slices.Contains(direct, peer) })
}

// waitPeers waits until sidecar pid reports n peers direct.
func (l *lab) waitPeers(pid, n int) error {
	return l.waitDirect(pid, fmt.Sprintf("%d peers", n), func(direct []int) bool { return len(direct) >= n })
}

// waitDirect polls sidecar pid's status, for up to a minute, until done
// holds for the peers it reports direct.
func (l *lab) waitDirect(pid int, what string, done func(direct []int) bool) error {
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		resp, err := http.Get("http://" + l.sidecars[pid].admin + "/v1/status")
		if err != nil {
			continue
		}
		var s struct {
			Peers []struct {
				PID   int
				State string
			}
		}
		json.NewDecoder(resp.Body).Decode(&s)
		resp.Body.Close()
		var direct []int
		for _, p := range s.Peers {
			if p.State == "direct" {
				direct = append(direct, p.PID)
			}
		}
		if done(direct) {
			return nil
		}
	}
	return fmt.Errorf("sidecar %d did not reach %s", pid, what)
}

// socksConnect opens a SOCKS5 CONNECT to 10.0.0.pid:port.
func socksConnect(proxy string, pid, port int) (net.Conn, error) {
	c, err := net.Dial("tcp", proxy)
	if err != nil {
		return nil, err
	}
	req := []byte{5, 1, 0, 5, 1, 0, 1, 10, 0, 0, byte(pid), byte(port >> 8), byte(port)}
	if _, err := c.Write(req); err != nil {
		c.Close()
		return nil, err
	}
	var rep [12]byte
	if _, err := io.ReadFull(c, rep[:]); err != nil {
		c.Close()
		return nil, err
	}
	if rep[1] != 0 || rep[3] != 0 {
		c.Close()
		return nil, fmt.Errorf("socks reply %d", rep[3])
	}
	return c, nil
}

func (l *lab) tunnelConn() (io.WriteCloser, io.Reader, error) {
	c, err := socksConnect(l.sidecars[0].socks, 1, l.sinkPort)
	return c, c, err
}

func (l *lab) tcpConn() (io.WriteCloser, io.Reader, error) {
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", l.sinkPort))
	return c, c, err
}

// pingMedian asks the sidecar's API for 50 pings through the tunnel.
func pingMedian(api string, pid int) (float64, error) {
	req, err := http.NewRequest(http.MethodPost, fmt.Sprintf("http://%s/v1/ping?pid=%d&count=50", api, pid), nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set(admin.ActionHeader, "bench")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var r struct {
		RTT []float64 `json:"rtt_ms"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil || len(r.RTT) == 0 {
		return 0, fmt.Errorf("ping: %v", err)
	}
	return median(r.RTT), nil
}

func tcpConnectLatency(port, n int) []float64 {
	var lat []float64
	for range n {
		t0 := time.Now()
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		var b [1]byte
		io.ReadFull(c, b[:])
		lat = append(lat, float64(time.Since(t0).Microseconds())/1000)
		c.Close()
	}
	return lat
}

func (l *lab) dialQUIC() (*quic.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	tr := &quic.Transport{Conn: pc}
	addr, err := net.ResolveUDPAddr("udp4", l.quicAddr)
	if err != nil {
		return nil, err
	}
	return tr.Dial(ctx, addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{alpn}, MinVersion: tls.VersionTLS13},
		quicmux.QUICConfig(5*time.Second))
}

func quicStream(c *quic.Conn) func() (io.WriteCloser, io.Reader, error) {
	return func() (io.WriteCloser, io.Reader, error) {
		s, err := c.OpenStreamSync(context.Background())
		return s, s, err
	}
}

// child runs a sink: tcp-sink prints "SINKPORT HELLOPORT", quic-sink its
// UDP address; both count what each connection or stream sends until EOF
// and answer with the count.
func child(mode string) error {
	switch mode {
	case "tcp-sink":
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		hello, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		fmt.Printf("%d %d\n", ln.Addr().(*net.TCPAddr).Port, hello.Addr().(*net.TCPAddr).Port)
		go func() {
			for {
				c, err := hello.Accept()
				if err != nil {
					return
				}
				c.Write([]byte{1})
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return err
			}
			go countAndAnswer(c, c)
		}
	case "quic-sink":
		id, err := identity.New(newKey())
		if err != nil {
			return err
		}
		pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return err
		}
		tr := &quic.Transport{Conn: pc}
		ln, err := tr.Listen(&tls.Config{Certificates: []tls.Certificate{id.Cert}, NextProtos: []string{alpn}, MinVersion: tls.VersionTLS13},
			quicmux.QUICConfig(5*time.Second))
		if err != nil {
			return err
		}
		fmt.Println(pc.LocalAddr())
		for {
			conn, err := ln.Accept(context.Background())
			if err != nil {
				return err
			}
			go func() {
				for {
					s, err := conn.AcceptStream(context.Background())
					if err != nil {
						return
					}
					go countAndAnswer(s, s)
				}
			}()
		}
	}
	return fmt.Errorf("unknown child mode %q", mode)
}

func countAndAnswer(r io.Reader, w io.WriteCloser) {
	n, _ := io.CopyBuffer(io.Discard, r, make([]byte, 256<<10))
	var ack [8]byte
	binary.BigEndian.PutUint64(ack[:], uint64(n))
	w.Write(ack[:])
	w.Close()
}
