// Command fakesfkit is the NAT lab's stand-in for the sfkit website's
// WebSocket relay (/api/ice), which cannot run here: it serves
// website/websitetest's fake, which does what the website does (origin,
// credential and study checks, the barrier, PID override, no state).
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"sfkit-proxy/website/websitetest"
)

func main() {
	listen := flag.String("listen", "203.0.113.10:8443", "address")
	cert := flag.String("cert", "", "TLS certificate (PEM)")
	key := flag.String("key", "", "TLS key (PEM)")
	study := flag.String("study", "", "the study ID")
	participants := flag.String("participants", "", "the study's users, comma-separated: party N is the Nth")
	keys := flag.String("keys", "", "file of 'AUTH_KEY USER' lines")
	origin := flag.String("origin", "", "the Origin clients must send (wss://HOST:PORT)")
	flag.Parse()
	if err := run(*listen, *cert, *key, *study, *participants, *keys, *origin); err != nil {
		fmt.Fprintln(os.Stderr, "fakesfkit:", err)
		os.Exit(1)
	}
}

func run(listen, cert, key, study, participants, keysFile, origin string) error {
	srv := &websitetest.Server{Study: study, Participants: strings.Split(participants, ","), Keys: map[string]string{}, Origin: origin}
	f, err := os.Open(keysFile)
	if err != nil {
		return err
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, u, ok := strings.Cut(strings.TrimSpace(sc.Text()), " "); ok {
			srv.Keys[k] = u
		}
	}
	f.Close()
	hs := &http.Server{Addr: listen, Handler: srv, ReadHeaderTimeout: 5 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		hs.Close()
	}()
	if err := hs.ListenAndServeTLS(cert, key); err != http.ErrServerClosed {
		return err
	}
	return nil
}
