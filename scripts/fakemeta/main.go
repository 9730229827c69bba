// Command fakemeta is the NAT lab's stand-in for the GCE metadata server,
// which cannot run outside Google's cloud: it speaks the real identity
// endpoint (paths and Metadata-Flavor header) and signs ID tokens with a key
// whose JWKS it writes for the registry to verify against.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"sfkit-proxy/metadata/metadatatest"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8089", "address (GCE_METADATA_HOST of the party)")
	issuer := flag.String("issuer", "https://accounts.google.com", "iss claim")
	email := flag.String("email", "", "the instance's service account email")
	jwksOut := flag.String("jwks-out", "", "file to write the signing key's JWKS to")
	flag.Parse()
	if err := run(*listen, *issuer, *email, *jwksOut); err != nil {
		fmt.Fprintln(os.Stderr, "fakemeta:", err)
		os.Exit(1)
	}
}

func run(listen, issuer, email, jwksOut string) error {
	is, err := metadatatest.NewIssuer(issuer)
	if err != nil {
		return err
	}
	if err := os.WriteFile(jwksOut, is.JWKS(), 0o644); err != nil {
		return err
	}
	srv := &metadatatest.Server{}
	hs := &http.Server{Addr: listen, Handler: srv.GCE(is, metadatatest.Identity{Email: email}), ReadHeaderTimeout: 5 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		hs.Close()
	}()
	if err := hs.ListenAndServe(); err != http.ErrServerClosed {
		return err
	}
	return nil
}
