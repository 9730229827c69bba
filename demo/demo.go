// Package demo is `sfkit-proxy demo`: in one process on loopback, a
// registry, a STUN server and several sidecars, with a file served on each
// party's 127.0.0.1 and fetched through every other party's SOCKS port,
// every byte checked.
package demo

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sync/errgroup"

	"sfkit-proxy/config"
	"sfkit-proxy/httpserve"
	"sfkit-proxy/registry"
	"sfkit-proxy/sidecar"
	"sfkit-proxy/stun"
)

// Run runs the demo with its command line args (after "demo"): a table of
// the transfers on stdout, the sidecars' logs on stderr. It fails when a
// check fails.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("sfkit-proxy demo", flag.ContinueOnError)
	parties := fs.Int("parties", 3, "number of parties")
	sizeMB := fs.Int("size-mb", 32, "size of each party's file in MiB")
	level := fs.String("log-level", "warn", "log level of the sidecars")
	fs.Usage = config.Usage(fs, stderr, "", "sfkit-proxy demo [flags]\n\nRuns a registry, a STUN server and several parties on loopback and moves a file across every ordered pair.")
	if err := config.ParseFlags(fs, args); err != nil {
		return err
	}
	lvl, err := config.ParseLevel(*level)
	if err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	if *parties < 2 || *parties > 16 || *sizeMB < 1 || *sizeMB > 1024 {
		return errors.New("demo: want 2-16 --parties and 1-1024 --size-mb")
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl}))
	dir, err := os.MkdirTemp("", "sfkit-proxy-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	g, gctx := errgroup.WithContext(ctx)
	defer func() {
		cancel()
		g.Wait()
	}()

	// The registry, with one token per party.
	tokens := make([]string, *parties)
	var tokFile bytes.Buffer
	for i := range tokens {
		tokens[i] = rand.Text()
		fmt.Fprintf(&tokFile, "%s demo %d\n", tokens[i], i)
	}
	tokPath := filepath.Join(dir, "tokens")
	if err := os.WriteFile(tokPath, tokFile.Bytes(), 0o600); err != nil {
		return err
	}
	grants, err := registry.LoadTokens(tokPath)
	if err != nil {
		return err
	}
	// Every party runs on this machine: loopback candidates are real here.
	rs, err := registry.NewServer(registry.ServerOptions{Grants: grants, DataDir: filepath.Join(dir, "registry"), Logger: log,
		Addrs: config.AddrPolicy{Loopback: true}})
	if err != nil {
		return err
	}
	rln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	g.Go(func() error {
		return httpserve.Serve(gctx, &http.Server{Handler: rs, BaseContext: func(net.Listener) context.Context { return gctx }}, rln, "", "")
	})

	// The STUN server.
	spc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return err
	}
	g.Go(func() error { return stun.Serve(gctx, spc, log) })

	// A file on each party's loopback, and the party's sidecar.
	type party struct {
		file  []byte
		sum   [32]byte
		port  int
		socks chan netip.AddrPort
	}
	ps := make([]*party, *parties)
	for i := range ps {
		p := &party{file: make([]byte, *sizeMB<<20), socks: make(chan netip.AddrPort, 1)}
		rand.Read(p.file)
		p.sum = sha256.Sum256(p.file)
		fln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		p.port = fln.Addr().(*net.TCPAddr).Port
		file := p.file
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.ServeContent(w, r, "data", time.Time{}, bytes.NewReader(file))
		})
		g.Go(func() error { return httpserve.Serve(gctx, &http.Server{Handler: h}, fln, "", "") })
		keyPath := filepath.Join(dir, "key"+strconv.Itoa(i))
		if err := os.WriteFile(keyPath, []byte(tokens[i]+"\n"), 0o600); err != nil {
			return err
		}
		cfg, err := config.ParseSidecar([]string{
			"--study", "demo", "--pid", strconv.Itoa(i),
			"--registry", "http://" + rln.Addr().String() + "/",
			"--auth-key-file", keyPath,
			"--socks-listen", "127.0.0.1:0", "--udp-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
			"--stun", spc.LocalAddr().String(),
			"--allow-ports", strconv.Itoa(p.port),
			"--state-dir", filepath.Join(dir, "state"+strconv.Itoa(i)),
		}, stderr)
		if err != nil {
			return err
		}
		ps[i] = p
		g.Go(func() error {
			return sidecar.Run(gctx, cfg, log, func(l sidecar.Listening) { p.socks <- l.SOCKS })
		})
	}
	socksAddrs := make([]netip.AddrPort, len(ps))
	for i, p := range ps {
		select {
		case socksAddrs[i] = <-p.socks:
		case <-gctx.Done():
			return fmt.Errorf("demo: party %d did not start: %w", i, context.Cause(gctx))
		}
	}
	fmt.Fprintf(stdout, "sfkit-proxy demo: %d parties on loopback, registry %s, STUN %s, %d MiB per file\n",
		len(ps), rln.Addr(), spc.LocalAddr(), *sizeMB)
	fmt.Fprintf(stdout, "%-6s %-4s %-22s %10s %9s %10s  %s\n", "from", "to", "url", "bytes", "seconds", "MB/s", "sha256")
	failed := 0
	var total int64
	var totalTime time.Duration
	for a := range ps {
		client := SOCKSClient(socksAddrs[a])
		for b, pb := range ps {
			if a == b {
				continue
			}
			u := fmt.Sprintf("http://%s:%d/data", config.VirtualAddr(netip.MustParsePrefix("10.0.0.0/24"), b), pb.port)
			start := time.Now()
			n, sum, err := Fetch(gctx, client, u)
			el := time.Since(start)
			status := "ok"
			switch {
			case err != nil:
				status = "FAILED: " + err.Error()
			case sum != pb.sum || n != int64(len(pb.file)):
				status = "FAILED: content differs"
			}
			if status != "ok" {
				failed++
			}
			total += n
			totalTime += el
			fmt.Fprintf(stdout, "%-6d %-4d %-22s %10d %9.3f %10.1f  %s\n", a, b, u[7:], n, el.Seconds(), float64(n)/1e6/el.Seconds(), status)
		}
		client.CloseIdleConnections()
	}
	// A port that party 1 does not allow must be refused before any data.
	_, _, err = Fetch(gctx, SOCKSClient(socksAddrs[0]), "http://10.0.0.1:1/")
	refused := err != nil
	fmt.Fprintf(stdout, "party 0 -> 10.0.0.1:1 (not in party 1's --allow-ports): refused=%v\n", refused)
	if !refused {
		failed++
	}
	if failed > 0 {
		return fmt.Errorf("demo: %d checks failed", failed)
	}
	fmt.Fprintf(stdout, "all %d transfers verified; %.1f MB in %.2f s, mean %.1f MB/s per transfer\n",
		len(ps)*(len(ps)-1), float64(total)/1e6, totalTime.Seconds(), float64(total)/1e6/totalTime.Seconds())
	return nil
}

// SOCKSClient is an HTTP client whose connections go through the SOCKS
// proxy at socksAddr, names resolved there (socks5h).
func SOCKSClient(socksAddr netip.AddrPort) *http.Client {
	proxy := &url.URL{Scheme: "socks5h", Host: socksAddr.String()}
	return &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(proxy)}, Timeout: time.Minute}
}

// Fetch GETs u and returns its length and SHA-256.
func Fetch(ctx context.Context, c *http.Client, u string) (int64, [32]byte, error) {
	var sum [32]byte
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, sum, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, sum, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, sum, fmt.Errorf("http %s", resp.Status)
	}
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	copy(sum[:], h.Sum(nil))
	return n, sum, err
}
