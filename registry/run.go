package registry

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"time"

	"sfkit-proxy/config"
	"sfkit-proxy/httpserve"
)

// Run serves the reference registry that cfg describes (`sfkit-proxy
// registry`) until ctx ends: its grants from the tokens file, cloud
// identity tokens when an issuer is set, on cfg.Listen, over HTTPS with a
// certificate.
func Run(ctx context.Context, cfg *config.Registry, log *slog.Logger) error {
	grants := map[string]Grant{}
	if cfg.Tokens != "" {
		var err error
		if grants, err = LoadTokens(cfg.Tokens); err != nil {
			return err
		}
	}
	var verifier *OIDC
	if cfg.OIDCIssuer != "" {
		members, err := LoadMembers(cfg.Members)
		if err != nil {
			return err
		}
		if verifier, err = NewOIDC(ctx, cfg.OIDCIssuer, cfg.OIDCAudience, cfg.OIDCJWKS, members); err != nil {
			return err
		}
		log.Info("accepting cloud identity tokens", "issuer", cfg.OIDCIssuer, "audience", cfg.OIDCAudience, "members", len(members))
	}
	// A registry on loopback serves parties on this machine only (the
	// demo, tests): their loopback addresses are real candidates there.
	host, _, _ := net.SplitHostPort(cfg.Listen)
	addrs := config.AddrPolicy{Loopback: config.IsLoopbackHost(host), Virtual: netip.MustParsePrefix(config.DefaultPeersCIDR)}
	srv, err := NewServer(ServerOptions{Grants: grants, DataDir: cfg.Data, OIDC: verifier,
		Logger: log.With("component", "registry"), Addrs: addrs, EntryTTL: cfg.EntryTTL})
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("registry listen %s: %w", cfg.Listen, err)
	}
	log.Info("registry serving", "addr", ln.Addr(), "parties", len(grants), "tls", cfg.TLSCert != "")
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second,
		// Long polls end when ctx does.
		BaseContext: func(net.Listener) context.Context { return ctx }}
	return httpserve.Serve(ctx, hs, ln, cfg.TLSCert, cfg.TLSKey)
}
