package sidecar

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	xproxy "golang.org/x/net/proxy"

	"sfkit-proxy/config"
	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/metadata/metadatatest"
	"sfkit-proxy/stun"
	"sfkit-proxy/website/websitetest"
)

// study is a fake sfkit website relay, a STUN server, a fake GCE metadata
// server and an MPC config for three parties, all on loopback.
type study struct {
	t     *testing.T
	relay *websitetest.Server
	api   string // ws://…/api/ice
	mpc   string // configGlobal.toml
	ports map[[2]int]int
	keys  map[int]string
	meta  *metadatatest.Server
	logs  *testkit.LogBuffer
}

const threads = 4

func newStudy(t *testing.T) *study {
	t.Helper()
	s := &study{t: t, ports: map[[2]int]int{}, keys: map[int]string{0: "key-" + rand.Text(), 2: "key-" + rand.Text()}, logs: &testkit.LogBuffer{}}
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { stun.Serve(ctx, pc, slog.New(slog.DiscardHandler)); close(done) }()
	t.Cleanup(func() { cancel(); pc.Close(); <-done })
	t.Setenv("SFKIT_PROXY_STUN", "stun:"+pc.LocalAddr().String())

	// Party 1 has no key: its sidecar takes a Google access token from the
	// (fake) GCE metadata server, and the website asks Google who it is.
	s.meta = &metadatatest.Server{}
	is, err := metadatatest.NewIssuer("https://accounts.google.com")
	if err != nil {
		t.Fatal(err)
	}
	gce := httptest.NewServer(s.meta.GCE(is, metadatatest.Identity{Email: "party1@study.iam.gserviceaccount.com"}))
	t.Cleanup(gce.Close)
	t.Setenv("GCE_METADATA_HOST", strings.TrimPrefix(gce.URL, "http://"))
	t.Setenv("GOOGLE_APPLICATION_CREDENTIALS", "")
	t.Setenv("HOME", t.TempDir()) // no gcloud credentials file

	s.relay = &websitetest.Server{Study: "study-1", Participants: []string{"alice", "sa-party1", "carol"},
		Keys: map[string]string{s.keys[0]: "alice", s.keys[2]: "carol", "key-mallory": "mallory"},
		Bearer: func(tok string) (string, bool) {
			scopes, ok := s.meta.AccessToken(tok)
			return "sa-party1", ok && slices.Contains(scopes, "email")
		}}
	ts := httptest.NewServer(s.relay)
	t.Cleanup(ts.Close)
	s.api = strings.Replace(ts.URL, "http://", "ws://", 1) + "/api/ice"
	s.relay.Origin = strings.Replace(ts.URL, "http://", "ws://", 1)
	return s
}

// listenPairs makes each lower party's MPC program listen on its ports for
// every higher party, as sfgwas does, and writes the MPC config. Each
// listener reads what the dialer sends and sends its own bytes.
func (s *study) listenPairs(n int) {
	for _, pair := range s.mpcPorts(n) {
		for _, ln := range pair {
			testkit.Serve(s.t, ln, exchange)
		}
	}
}

// mpcPorts picks free ports for each pair of n parties (threads each),
// writes the MPC config, and returns listeners on them, by pair.
func (s *study) mpcPorts(n int) map[[2]int][]net.Listener {
	t := s.t
	for try := 0; ; try++ {
		// Below the ephemeral range (32768 up), as MPC ports are: the
		// sidecars' own dials never take one of them.
		base := 10000 + mrand.IntN(20000)
		lns := map[[2]int][]net.Listener{}
		ok := true
		for i := range n {
			for j := i + 1; j < n; j++ {
				port := base + 100*i + 10*j
				for th := range threads {
					ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port+th))
					if err != nil {
						ok = false
						break
					}
					lns[[2]int{i, j}] = append(lns[[2]int{i, j}], ln)
				}
				s.ports[[2]int{i, j}] = port
			}
		}
		if !ok {
			for _, pair := range lns {
				for _, ln := range pair {
					ln.Close()
				}
			}
			if try == 20 {
				t.Fatal("no free ports for the MPC program")
			}
			continue
		}
		s.writeMPC(n)
		return lns
	}
}

// writeMPC writes the MPC config of n parties with s.ports.
func (s *study) writeMPC(n int) {
	t := s.t
	var b strings.Builder
	fmt.Fprintf(&b, "num_main_parties = %d\nmpc_num_threads = %d\n", n-1, threads)
	for i := range n {
		fmt.Fprintf(&b, "\n[servers.party%d]\nipaddr = \"127.0.0.1\"\n[servers.party%d.ports]\n", i, i)
		for j := range n {
			if j != i {
				fmt.Fprintf(&b, "party%d = \"%d\"\n", j, s.ports[[2]int{min(i, j), max(i, j)}])
			}
		}
	}
	s.mpc = filepath.Join(t.TempDir(), "configGlobal.toml")
	if err := os.WriteFile(s.mpc, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
}

// payload is what each side of an MPC connection sends.
const payload = 256 << 10

// exchange sends payload random bytes and then a sha256 of what it
// received; the other side checks both.
func exchange(c net.Conn) {
	defer c.Close()
	data := make([]byte, payload)
	rand.Read(data)
	sum := make(chan []byte, 1)
	go func() {
		c.Write(data)
		if s, ok := <-sum; ok {
			c.Write(s) // after data, never before it
		}
	}()
	got := make([]byte, payload)
	if _, err := io.ReadFull(c, got); err != nil {
		close(sum)
		return
	}
	s := sha256.Sum256(got)
	sum <- s[:]
	io.Copy(io.Discard, c) // until the dialer is done
}

// sfkitArgs is exactly what sfkit's boot_sfkit_proxy passes, then what the
// test needs on one machine.
func (s *study) sfkitArgs(pid int, extra ...string) []string {
	args := []string{"-v", "-api", s.api, "-study", "study-1", "-pid", strconv.Itoa(pid), "-mpc", s.mpc,
		"-socks", "socks5://localhost:0"}
	if k, ok := s.keys[pid]; ok {
		args = append(args, "-auth-key", k)
	}
	// On one machine a connection that missed the tunnel would still reach
	// the listener: --direct deny makes such a miss fail.
	args = append(args, "--udp-listen", "127.0.0.1:0", "--admin-listen", "off", "--state-dir", s.t.TempDir(), "--direct", "deny")
	return append(args, extra...)
}

// start runs a sidecar; it returns where it listens, or the error it
// stopped with before it was ready. stop ends it and returns how Run
// ended; ended is closed when Run returns by itself.
func (s *study) start(args []string) (l Listening, stop func() error, ended <-chan struct{}, err error) {
	cfg, err := config.ParseSidecar(args, io.Discard)
	if err != nil {
		s.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan Listening, 1)
	end := make(chan struct{})
	var runErr error
	log := slog.New(slog.NewTextHandler(s.logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	go func() {
		runErr = Run(ctx, cfg, log, func(l Listening) { ready <- l })
		close(end)
	}()
	stop = func() error {
		cancel()
		<-end
		return runErr
	}
	s.t.Cleanup(func() { stop() })
	select {
	case l = <-ready:
		return l, stop, end, nil
	case <-end:
		return Listening{}, stop, end, runErr
	}
}

// dialMPC does what sfgwas's higher party does for thread th with party
// lo: it dials 127.0.0.1:port+th through its proxy, sends its bytes,
// checks the listener's bytes and the listener's sha256 of its own.
func (s *study) dialMPC(socks string, lo, hi, th int) error {
	d, err := xproxy.SOCKS5("tcp", socks, nil, xproxy.Direct)
	if err != nil {
		return err
	}
	c, err := d.Dial("tcp", "127.0.0.1:"+strconv.Itoa(s.ports[[2]int{lo, hi}]+th))
	if err != nil {
		return fmt.Errorf("dial party %d thread %d: %w", lo, th, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	data := make([]byte, payload)
	rand.Read(data)
	want := sha256.Sum256(data)
	go c.Write(data)
	got := make([]byte, payload+sha256.Size)
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("party %d thread %d: read: %w", lo, th, err)
	}
	if !bytes.Equal(got[payload:], want[:]) {
		return fmt.Errorf("party %d thread %d: party %d received other bytes than sent", lo, th, lo)
	}
	return nil
}

// TestSfkitStudyThroughTheWebsiteRelay: three sidecars started with
// sfkit's exact argument list find each other only through the website's
// relay (two with raw keys, one with a Google access token from the GCE
// metadata server), and carry sfgwas-style traffic: the higher party of
// each pair dials 127.0.0.1:port+t through its proxy, 4 connections per
// pair, bytes both ways, checked.
func TestSfkitStudyThroughTheWebsiteRelay(t *testing.T) {
	s := newStudy(t)
	s.listenPairs(3)
	echo := int(testkit.Echo(t))
	fwd := freePort(t)
	var socks [3]string
	for pid := range 3 {
		var extra []string
		switch pid {
		case 0: // opens its echo port to peers, besides its -mpc ports
			extra = []string{"--allow-ports", strconv.Itoa(echo)}
		case 2: // a program that ignores ALL_PROXY, through a forward
			extra = []string{"--forward", strconv.Itoa(fwd) + "=0:" + strconv.Itoa(echo)}
		}
		l, _, _, err := s.start(s.sfkitArgs(pid, extra...))
		if err != nil {
			t.Fatalf("party %d: %v", pid, err)
		}
		socks[pid] = l.SOCKS.String()
	}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for lo := range 3 {
		for hi := lo + 1; hi < 3; hi++ {
			for th := range threads {
				wg.Go(func() { errs <- s.dialMPC(socks[hi], lo, hi, th) })
			}
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	// An MPC port is for the party it listens for: party 2 cannot reach
	// the port party 0 keeps for party 1, and so cannot pass for party 1.
	d, err := xproxy.SOCKS5("tcp", socks[2], nil, xproxy.Direct)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := d.Dial("tcp", "10.0.0.0:"+strconv.Itoa(s.ports[[2]int{0, 1}])); err == nil {
		c.Close()
		t.Error("party 2 reached party 0's port for party 1")
	}
	// The website restarts: every party loses its socket. Tunnels do not
	// depend on it: new connections work at once, and the parties
	// reconnect (and meet at the barrier again).
	for pid := range 3 {
		s.relay.Kick(pid)
	}
	if err := s.dialMPC(socks[1], 0, 1, 0); err != nil {
		t.Errorf("after the relay restarted: %v", err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for len(s.relay.Connected()) < 3 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := len(s.relay.Connected()); n != 3 {
		t.Errorf("%d parties reconnected to the relay; want 3", n)
	}
	// Party 2's plain net.Dial to its forward reaches party 0's echo.
	c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(fwd))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	c.Write([]byte("hello party zero"))
	c.(*net.TCPConn).CloseWrite()
	if got, err := io.ReadAll(c); err != nil || string(got) != "hello party zero" {
		t.Errorf("echo through the forward = %q, %v", got, err)
	}
	if s.meta.Issued.Load() == 0 {
		t.Error("party 1 never asked the metadata server for an access token")
	}
}

// freePort is a loopback port nothing listens on (for a moment).
func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// TestRelayRefusalsAreOneLine: a credential the relay does not know (401)
// or that is not in the study (403) stops the sidecar with one line that
// says what to check; a second sidecar for a connected party (409) keeps
// retrying and says why.
func TestRelayRefusalsAreOneLine(t *testing.T) {
	s := newStudy(t)
	s.listenPairs(3)
	alice := s.keys[0]
	for _, tt := range []struct {
		key, want string
	}{
		{"key-unknown", "website relay answered 401"},
		{"key-mallory", "website relay answered 403"},
	} {
		s.keys[0] = tt.key
		_, stop, ended, err := s.start(s.sfkitArgs(0))
		if err == nil {
			select {
			case <-ended:
			case <-time.After(20 * time.Second):
				t.Fatalf("sidecar with %s kept running", tt.key)
			}
			err = stop()
		}
		if err == nil || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("sidecar with %s stopped with %v; want one line with %q", tt.key, err, tt.want)
		}
	}
	s.keys[0] = alice
	if _, _, _, err := s.start(s.sfkitArgs(0)); err != nil {
		t.Fatal(err)
	}
	_, stop, _, err := s.start(s.sfkitArgs(0))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(s.logs.String(), "website relay answered 409") && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(s.logs.String(), "already connected") {
		t.Errorf("no log line for the 409:\n%s", s.logs.String())
	}
	if err := stop(); !errors.Is(err, context.Canceled) {
		t.Errorf("second sidecar stopped with %v; want it to retry until stopped", err)
	}
}

// TestStartOrderDoesNotMatter: as in hcholab's demo, each party's MPC
// program starts listening only after a random delay of up to 3 s and
// dials its peers at once, with no retry. A connection that reaches a
// peer's -mpc port before the program there listens waits for it, so all
// 20 rounds succeed, every byte checked; a port that never listens is
// refused once the peer's --dial-timeout has passed, though the asking
// party's own --dial-timeout is the same (the default case).
func TestStartOrderDoesNotMatter(t *testing.T) {
	s := newStudy(t)
	lns := s.mpcPorts(3)
	for _, pair := range lns {
		for _, ln := range pair {
			ln.Close() // the programs have not started yet
		}
	}
	const wait = 8 * time.Second // every party's --dial-timeout: how long its ports wait, and its CONNECTs
	var socks [3]string
	for pid := range 3 {
		l, _, _, err := s.start(s.sfkitArgs(pid, "--dial-timeout", wait.String()))
		if err != nil {
			t.Fatalf("party %d: %v", pid, err)
		}
		socks[pid] = l.SOCKS.String()
	}
	for round := range 20 {
		// open: the programs start listening; dials: the higher parties
		// dial at once; serve: the listeners' side of each connection.
		var open, dials, serve sync.WaitGroup
		errs := make(chan error, 16)
		var mu sync.Mutex // guards opened
		var opened []net.Listener
		for lo := range 2 {
			delay := time.Duration(mrand.Int64N(int64(3 * time.Second)))
			open.Go(func() {
				time.Sleep(delay)
				for hi := lo + 1; hi < 3; hi++ {
					for th := range threads {
						ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(s.ports[[2]int{lo, hi}]+th))
						if err != nil {
							errs <- err
							return
						}
						mu.Lock()
						opened = append(opened, ln)
						mu.Unlock()
						serve.Go(func() {
							if c, err := ln.Accept(); err == nil {
								exchange(c)
							}
						})
					}
				}
			})
			for hi := lo + 1; hi < 3; hi++ {
				for th := range threads {
					dials.Go(func() { errs <- s.dialMPC(socks[hi], lo, hi, th) })
				}
			}
		}
		dials.Wait()
		open.Wait()
		for _, ln := range opened {
			ln.Close() // a listener no dial reached stops waiting
		}
		serve.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
	}
	// Party 0's program never listens on its port for party 2.
	start := time.Now()
	err := s.dialMPC(socks[2], 0, 2, 0)
	if err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("dial to a port that never listens = %v; want connection refused", err)
	}
	if d := time.Since(start); d < wait {
		t.Errorf("refused after %v; want it to wait party 0's --dial-timeout (%v) first", d, wait)
	}
	if !strings.Contains(s.logs.String(), "local port not listening yet: waiting for it") {
		t.Error("no connection waited for its listener: the test did not test late listeners")
	}
}
