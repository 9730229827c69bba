package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	xproxy "golang.org/x/net/proxy"

	"sfkit-proxy/admin"
	"sfkit-proxy/config"
	"sfkit-proxy/demo"
	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/metadata"
	"sfkit-proxy/metadata/metadatatest"
	"sfkit-proxy/registry"
	"sfkit-proxy/sidecar"
	"sfkit-proxy/stun"
)

// closedAddr is a loopback host:port with nothing behind it.
func closedAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().String()
	ln.Close()
	return a
}

func TestDemo(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"demo", "--size-mb", "2"}, &out, io.Discard); err != nil {
		t.Fatalf("demo = %v\n%s", err, out.String())
	}
	for _, want := range []string{"all 6 transfers verified", "refused=true"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
}

// lab is a registry, a STUN server and sidecars on loopback.
type lab struct {
	t        *testing.T
	regCfg   func(*config.Registry) // adjusts the registry's config, if set
	dir      string
	regURL   string
	regStop  func()
	regLn    string
	stunAddr string
	tokens   map[int]string
}

func newLab(t *testing.T) *lab { return newLabWith(t, nil) }

func newLabWith(t *testing.T, regCfg func(*config.Registry)) *lab {
	t.Helper()
	l := &lab{t: t, dir: t.TempDir(), tokens: map[int]string{}, regCfg: regCfg}
	var tok strings.Builder
	for pid := range 4 {
		l.tokens[pid] = "test-token-" + rand.Text()
		fmt.Fprintf(&tok, "%s lab %d\n", l.tokens[pid], pid)
	}
	os.WriteFile(filepath.Join(l.dir, "tokens"), []byte(tok.String()), 0o600)
	l.startRegistry("127.0.0.1:0")
	spc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { stun.Serve(ctx, spc, slog.New(slog.DiscardHandler)); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	l.stunAddr = spc.LocalAddr().String()
	return l
}

// startRegistry runs `sfkit-proxy registry` in-process on addr.
func (l *lab) startRegistry(addr string) {
	ctx, cancel := context.WithCancel(context.Background())
	cfg := &config.Registry{Listen: addr, Tokens: filepath.Join(l.dir, "tokens"), Data: filepath.Join(l.dir, "registry")}
	if addr == "127.0.0.1:0" {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			l.t.Fatal(err)
		}
		cfg.Listen = ln.Addr().String()
		ln.Close()
	}
	if l.regCfg != nil {
		l.regCfg(cfg)
	}
	done := make(chan error, 1)
	go func() { done <- registry.Run(ctx, cfg, slog.New(slog.DiscardHandler)) }()
	l.regLn = cfg.Listen
	l.regURL = "http://" + cfg.Listen + "/"
	stopped := false
	l.regStop = func() {
		if !stopped {
			stopped = true
			cancel()
			<-done
		}
	}
	l.t.Cleanup(l.regStop)
	waitTCP(l.t, cfg.Listen)
}

func waitTCP(t *testing.T, addr string) {
	for range 100 {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("nothing listens on %s", addr)
}

// party runs a sidecar and returns where it listens.
func (l *lab) party(pid int, extra ...string) (sidecar.Listening, func()) {
	l.t.Helper()
	keyFile := filepath.Join(l.dir, "key"+strconv.Itoa(pid))
	os.WriteFile(keyFile, []byte(l.tokens[pid]), 0o600)
	args := []string{"--study", "lab", "--pid", strconv.Itoa(pid), "--registry", l.regURL}
	if pid >= 0 && l.tokens[pid] != "" {
		args = append(args, "--auth-key-file", keyFile)
	}
	args = append(args, "--socks-listen", "127.0.0.1:0", "--udp-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
		"--stun", l.stunAddr, "--state-dir", filepath.Join(l.dir, "state"+strconv.Itoa(pid)))
	if !slices.Contains(extra, "--allow-ports") {
		// The lab's servers listen on ports of the moment: open them all
		// (the sidecar's own listeners stay closed to peers whatever this says).
		args = append(args, "--allow-ports", "all")
	}
	args = append(args, extra...)
	cfg, err := config.ParseSidecar(args, io.Discard)
	if err != nil {
		l.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan sidecar.Listening, 1)
	done := make(chan error, 1)
	go func() {
		done <- sidecar.Run(ctx, cfg, slog.New(slog.DiscardHandler), func(a sidecar.Listening) { ready <- a })
	}()
	var addr sidecar.Listening
	select {
	case addr = <-ready:
	case err := <-done:
		l.t.Fatalf("party %d: %v", pid, err)
	}
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			if err := <-done; !errors.Is(err, context.Canceled) {
				l.t.Errorf("party %d stopped with %v", pid, err)
			}
		}
	}
	l.t.Cleanup(stop)
	return addr, stop
}

// fileServer serves size random bytes on 127.0.0.1 and returns the port and
// the content's sha256.
func fileServer(t *testing.T, size int) (int, string) {
	t.Helper()
	data := make([]byte, size)
	rand.Read(data)
	sum := sha256.Sum256(data)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "f", time.Time{}, bytes.NewReader(data))
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).Port, hex.EncodeToString(sum[:])
}

func TestRealCurlAndNcatThroughSOCKS(t *testing.T) {
	for _, tool := range []string{"curl", "ncat"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed (apt-get install curl ncat)", tool)
		}
	}
	l := newLab(t)
	port, sum := fileServer(t, 5<<20)
	s0, _ := l.party(0)
	l.party(1)
	curl := exec.Command("curl", "-sS", "--fail", "--max-time", "60", fmt.Sprintf("http://10.0.0.1:%d/", port))
	curl.Env = append(os.Environ(), "ALL_PROXY=socks5h://"+s0.SOCKS.String())
	out, err := curl.Output()
	if err != nil {
		t.Fatalf("curl through party 0 to party 1: %v", err)
	}
	if got := sha256.Sum256(out); hex.EncodeToString(got[:]) != sum {
		t.Errorf("curl got %d bytes with another sha256", len(out))
	}
	// A line echo at party 1, reached with ncat through party 0's proxy.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b := make([]byte, 64)
		n, _ := c.Read(b)
		c.Write(bytes.ToUpper(b[:n]))
	}()
	nc := exec.Command("ncat", "--no-shutdown", "--proxy", s0.SOCKS.String(), "--proxy-type", "socks5",
		"10.0.0.1", strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
	nc.Stdin = strings.NewReader("hello party one\n")
	got, err := nc.Output()
	if err != nil || string(got) != "HELLO PARTY ONE\n" {
		t.Errorf("ncat echo = %q, %v; want %q", got, err, "HELLO PARTY ONE\n")
	}
}

func fetchVia(t *testing.T, socksAddr netip.AddrPort, u string) (int64, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := demo.SOCKSClient(socksAddr)
	defer c.CloseIdleConnections()
	n, sum, err := demo.Fetch(ctx, c, u)
	return n, hex.EncodeToString(sum[:]), err
}

func TestRegistryOutageKeepsTunnels(t *testing.T) {
	l := newLab(t)
	port, sum := fileServer(t, 1<<20)
	s0, _ := l.party(0)
	l.party(1)
	u := fmt.Sprintf("http://10.0.0.1:%d/", port)
	if _, got, err := fetchVia(t, s0.SOCKS, u); err != nil || got != sum {
		t.Fatalf("before outage: %v", err)
	}
	l.regStop()
	for i := range 3 {
		if _, got, err := fetchVia(t, s0.SOCKS, u); err != nil || got != sum {
			t.Fatalf("during outage, fetch %d: %v", i, err)
		}
	}
	// The registry comes back on the same address; a new party joins.
	l.startRegistry(l.regLn)
	s2, _ := l.party(2)
	if _, got, err := fetchVia(t, s2.SOCKS, u); err != nil || got != sum {
		t.Fatalf("after outage, from a new party: %v", err)
	}
}

func TestPeerRestartThroughRegistry(t *testing.T) {
	l := newLab(t)
	port, sum := fileServer(t, 1<<20)
	s0, _ := l.party(0)
	_, stop1 := l.party(1)
	u := fmt.Sprintf("http://10.0.0.1:%d/", port)
	if _, got, err := fetchVia(t, s0.SOCKS, u); err != nil || got != sum {
		t.Fatalf("first fetch: %v", err)
	}
	stop1()
	l.party(1) // same state dir: same key; new UDP port
	if _, got, err := fetchVia(t, s0.SOCKS, u); err != nil || got != sum {
		t.Fatalf("after party 1 restarted: %v", err)
	}
}

func TestStartupErrorsAreClear(t *testing.T) {
	l := newLab(t)
	// Without a key the sidecar asks the cloud; point it at nothing, on loopback.
	t.Setenv("GCE_METADATA_HOST", closedAddr(t))
	t.Setenv(metadata.AzureEndpointEnv, "http://"+closedAddr(t))
	bad := filepath.Join(l.dir, "badkey")
	os.WriteFile(bad, []byte("not-a-token-anyone-knows"), 0o600)
	empty := filepath.Join(l.dir, "empty")
	os.WriteFile(empty, nil, 0o600)
	base := []string{"--study", "lab", "--pid", "1", "--registry", l.regURL, "--socks-listen", "127.0.0.1:0",
		"--udp-listen", "127.0.0.1:0", "--stun", l.stunAddr, "--state-dir", t.TempDir()}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"rejected token", append(base, "--auth-key-file", bad), "registry rejected this party's credential from --auth-key-file (401: unknown token)"},
		{"missing key file", append(base, "--auth-key-file", filepath.Join(l.dir, "nope")), "read --auth-key-file"},
		{"empty key file", append(base, "--auth-key-file", empty), "is empty"},
		{"no credential and no cloud", base, "no cloud metadata endpoint answered"},
		{"token of another party", append(base, "--auth-key", l.tokens[2]), "403"},
		{"forward off loopback", append(base, "--forward", "0.0.0.0:9000=1:8000"), "--forward 0.0.0.0:9000=1:8000: 0.0.0.0 is not a loopback address: add --forward-any-host"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			var stderr bytes.Buffer
			err := run(ctx, tt.args, io.Discard, &stderr)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("run = %v; want error with %q", err, tt.want)
			}
		})
	}
}

func TestPartyWithCloudCredential(t *testing.T) {
	is, err := metadatatest.NewIssuer("https://accounts.google.com")
	if err != nil {
		t.Fatal(err)
	}
	rotated, _ := metadatatest.NewIssuer("https://accounts.google.com")
	meta := &metadatatest.Server{}
	// The first token is signed with a key the registry no longer trusts:
	// the registry answers 401, the sidecar refreshes once and retries.
	gce := httptest.NewServer(meta.GCE(is, metadatatest.Identity{Email: "party3@study.iam.gserviceaccount.com",
		SignWith: func(n int64) *metadatatest.Issuer {
			if n == 1 {
				return rotated
			}
			return is
		}}))
	defer gce.Close()
	t.Setenv("GCE_METADATA_HOST", strings.TrimPrefix(gce.URL, "http://"))
	t.Setenv(metadata.AzureEndpointEnv, "http://"+closedAddr(t))
	var regURL string
	l := newLabWith(t, func(c *config.Registry) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "jwks"), is.JWKS(), 0o600)
		os.WriteFile(filepath.Join(dir, "members"), []byte("party3@study.iam.gserviceaccount.com lab 3\n"), 0o600)
		regURL = "http://" + c.Listen + "/"
		c.OIDCIssuer, c.OIDCAudience, c.OIDCJWKS, c.Members = is.URL, regURL, filepath.Join(dir, "jwks"), filepath.Join(dir, "members")
	})
	delete(l.tokens, 3) // party 3 has no key file
	port, sum := fileServer(t, 1<<20)
	p0, _ := l.party(0)
	p3, _ := l.party(3)
	if _, got, err := fetchVia(t, p0.SOCKS, fmt.Sprintf("http://10.0.0.3:%d/", port)); err != nil || got != sum {
		t.Fatalf("party 0 -> party 3: %v", err)
	}
	if _, got, err := fetchVia(t, p3.SOCKS, fmt.Sprintf("http://10.0.0.0:%d/", port)); err != nil || got != sum {
		t.Fatalf("party 3 -> party 0: %v", err)
	}
	if meta.LastAudience() != regURL {
		t.Errorf("token audience = %q; want the registry URL %q", meta.LastAudience(), regURL)
	}
	if meta.Issued.Load() < 2 {
		t.Errorf("metadata server issued %d tokens; want a refresh after the first was refused", meta.Issued.Load())
	}
}

// TestResetsCrossTheTunnel: a server at party 1 that resets its connection
// after 100 kB resets the client at party 0 (never a clean EOF: that would
// pass for a complete transfer), and a client that resets resets the server.
// The client is golang.org/x/net/proxy's SOCKS5 dialer, as sfgwas uses.
func TestResetsCrossTheTunnel(t *testing.T) {
	l := newLab(t)
	s0, _ := l.party(0)
	l.party(1)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	serverSaw := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			tc := c.(*net.TCPConn)
			if i == 0 { // first: write, then reset
				tc.Write(make([]byte, 100_000))
				time.Sleep(100 * time.Millisecond)
				tc.SetLinger(0)
				tc.Close()
				continue
			}
			_, err = io.Copy(io.Discard, tc)
			serverSaw <- err
			tc.Close()
		}
	}()
	d, err := xproxy.SOCKS5("tcp", s0.SOCKS.String(), nil, xproxy.Direct)
	if err != nil {
		t.Fatal(err)
	}
	target := net.JoinHostPort("10.0.0.1", strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
	c, err := d.Dial("tcp", target)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	n, err := io.Copy(io.Discard, c)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("client read %d bytes, then %v; want ECONNRESET", n, err)
	}
	c.Close()

	c, err = d.Dial("tcp", target)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("the first half of a request"))
	time.Sleep(100 * time.Millisecond)
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	select {
	case err := <-serverSaw:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("server read to %v; want ECONNRESET", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("server never saw the client's end")
	}
}

// TestNoPivotThroughAPeersSidecar: a study member cannot use another
// party's sidecar as a proxy. Even with --allow-ports all, party 1's own
// SOCKS port (through which party 0 would connect onwards as party 1) and
// its management API are closed to peers, while its other ports are open;
// and a party that declared no port opens none. Nor is a gateway that
// party 1 adds at runtime (to party 3) open to party 0: through it party 0
// would reach party 3 as party 1.
func TestNoPivotThroughAPeersSidecar(t *testing.T) {
	l := newLab(t)
	echo := strconv.Itoa(int(testkit.Echo(t)))
	s0, _ := l.party(0)
	s1, _ := l.party(1, "--allow-ports", "all")
	l.party(2, "--allow-ports", "none")
	l.party(3, "--allow-ports", echo)
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gwPort := free.Addr().(*net.TCPAddr).Port
	free.Close()
	gwAddr := "127.0.0.1:" + strconv.Itoa(gwPort)
	p3, _ := strconv.Atoi(echo)
	api1 := &admin.Client{Addr: s1.Admin.String()}
	var gwErr error
	for range 100 { // until party 1 has party 3's published ports
		if _, gwErr = api1.AddGateway(context.Background(), "tcp", gwAddr, admin.GatewayRequest{PID: 3, Port: uint16(p3)}); gwErr == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if gwErr != nil {
		t.Fatalf("party 1's gateway to party 3: %v", gwErr)
	}
	d, err := xproxy.SOCKS5("tcp", s0.SOCKS.String(), nil, xproxy.Direct)
	if err != nil {
		t.Fatal(err)
	}
	// echoVia says hello to addr through dialer d and expects it back.
	echoVia := func(d xproxy.Dialer, addr string) error {
		c, err := d.Dial("tcp", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		c.Write([]byte("ping"))
		b := make([]byte, 4)
		if _, err = io.ReadFull(c, b); err == nil && string(b) != "ping" {
			err = fmt.Errorf("echo answered %q", b)
		}
		return err
	}
	if err := echoVia(d, "10.0.0.1:"+echo); err != nil {
		t.Fatalf("party 0 to party 1's allowed echo port: %v", err)
	}
	for _, tt := range []struct {
		name string
		use  func() error
	}{
		{"party 1's SOCKS port, onwards to party 1's loopback", func() error {
			hop, err := xproxy.SOCKS5("tcp", "10.0.0.1:"+strconv.Itoa(int(s1.SOCKS.Port())), nil, d)
			if err != nil {
				return err
			}
			return echoVia(hop, "127.0.0.1:"+echo)
		}},
		{"party 1's management API", func() error {
			hc := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DialContext: d.(xproxy.ContextDialer).DialContext}}
			resp, err := hc.Get(fmt.Sprintf("http://10.0.0.1:%d/v1/status", s1.Admin.Port()))
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("status %s", resp.Status)
			}
			return nil
		}},
		{"party 2, which declared no port", func() error { return echoVia(d, "10.0.0.2:"+echo) }},
		{"party 1's gateway to party 3", func() error { return echoVia(d, "10.0.0.1:"+strconv.Itoa(gwPort)) }},
	} {
		if err := tt.use(); err == nil {
			t.Errorf("party 0 used %s; want it refused", tt.name)
		}
	}
	api := &admin.Client{Addr: s0.Admin.String()}
	st, err := api.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if n := st.Counters.SOCKS["peer/not_allowed"]; n != 4 {
		t.Errorf("party 0 counted %d requests not allowed; want 4 (SOCKS, API, party 2, the gateway)", n)
	}
	// The gateway itself works, for party 1's own programs.
	if err := echoVia(xproxy.Direct, gwAddr); err != nil {
		t.Errorf("party 1's own program through its gateway to party 3: %v", err)
	}
}
