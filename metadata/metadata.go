// Package metadata gets the sidecar's registry credential from the cloud
// instance it runs on, when no key file is given: an OIDC ID token from the
// GCE metadata server, or a managed-identity token from Azure IMDS, as an
// oauth2.TokenSource that caches and refreshes before expiry.
//
// AWS IMDS hands out no OIDC identity token; on AWS give a key file.
package metadata

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	gce "cloud.google.com/go/compute/metadata"
	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"golang.org/x/oauth2"
)

// Providers.
const (
	GCE   = "gce"
	Azure = "azure"
)

// AzureEndpointEnv overrides the Azure IMDS base URL (for tests). GCE's
// metadata host is overridden by GCE_METADATA_HOST, as in Google's libraries.
const AzureEndpointEnv = "SFKIT_PROXY_AZURE_IMDS"

const azureDefault = "http://169.254.169.254"

// Options configure Discover. Zero values are documented per field.
type Options struct {
	// HTTP is the client for metadata requests; nil means one with no
	// proxy (metadata endpoints are link-local) and a 5 s timeout.
	HTTP *http.Client
	// ProbeTimeout bounds the first request to each provider; zero means 1 s.
	ProbeTimeout time.Duration
	// AzureEndpoint is the IMDS base URL; empty means $SFKIT_PROXY_AZURE_IMDS,
	// else http://169.254.169.254.
	AzureEndpoint string
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// ErrNoCloud is returned when no metadata endpoint answered.
var ErrNoCloud = errors.New("no cloud metadata endpoint answered")

// Discover tries GCE, then Azure, each with a short probe, and returns a
// source of tokens for audience from the first that answers.
func Discover(ctx context.Context, audience string, opts Options) (*Source, error) {
	if opts.HTTP == nil {
		opts.HTTP = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: nil}}
	}
	if opts.ProbeTimeout == 0 {
		opts.ProbeTimeout = time.Second
	}
	if opts.AzureEndpoint == "" {
		opts.AzureEndpoint = os.Getenv(AzureEndpointEnv)
	}
	if opts.AzureEndpoint == "" {
		opts.AzureEndpoint = azureDefault
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	gc := gce.NewClient(opts.HTTP)
	fetchers := []struct {
		name  string
		fetch func(context.Context) (*oauth2.Token, error)
	}{
		{GCE, func(ctx context.Context) (*oauth2.Token, error) { return gceToken(ctx, gc, audience) }},
		{Azure, func(ctx context.Context) (*oauth2.Token, error) {
			return azureToken(ctx, opts.HTTP, opts.AzureEndpoint, audience, opts.Now)
		}},
	}
	var errs []string
	for _, f := range fetchers {
		pctx, cancel := context.WithTimeout(ctx, opts.ProbeTimeout)
		tok, err := f.fetch(pctx)
		cancel()
		if err == nil {
			s := &Source{Provider: f.name, fetch: f.fetch, now: opts.Now, tok: tok}
			return s, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		errs = append(errs, f.name+": "+err.Error())
	}
	return nil, fmt.Errorf("%w (%s)", ErrNoCloud, strings.Join(errs, "; "))
}

// Source is a cached token source; it refreshes a token a minute before it
// expires, or when told the last one was rejected.
type Source struct {
	Provider string
	fetch    func(context.Context) (*oauth2.Token, error)
	now      func() time.Time

	mu  sync.Mutex // guards tok
	tok *oauth2.Token
}

// refreshEarly is how long before expiry a token is replaced.
const refreshEarly = time.Minute

// TokenContext returns a valid token, fetching a new one when needed.
func (s *Source) TokenContext(ctx context.Context) (*oauth2.Token, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tok != nil && (s.tok.Expiry.IsZero() || s.now().Add(refreshEarly).Before(s.tok.Expiry)) {
		return s.tok, nil
	}
	tok, err := s.fetch(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s metadata token: %w", s.Provider, err)
	}
	s.tok = tok
	return tok, nil
}

// Token implements oauth2.TokenSource.
func (s *Source) Token() (*oauth2.Token, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return s.TokenContext(ctx)
}

// Invalidate drops the cached token: the next call fetches a new one.
func (s *Source) Invalidate() {
	s.mu.Lock()
	s.tok = nil
	s.mu.Unlock()
}

// gceToken asks the GCE metadata server for an ID token for audience.
func gceToken(ctx context.Context, c *gce.Client, audience string) (*oauth2.Token, error) {
	raw, err := c.GetWithContext(ctx, "instance/service-accounts/default/identity?"+
		url.Values{"audience": {audience}, "format": {"full"}}.Encode())
	if err != nil {
		return nil, err
	}
	raw = strings.TrimSpace(raw)
	exp, err := expiry(raw)
	if err != nil {
		return nil, fmt.Errorf("gce identity token: %w", err)
	}
	return &oauth2.Token{AccessToken: raw, TokenType: "Bearer", Expiry: exp}, nil
}

// expiry reads the exp claim of a JWT without verifying it: the registry
// verifies; here it only says when to fetch a new one.
func expiry(raw string) (time.Time, error) {
	tok, err := jwt.ParseSigned(raw, []jose.SignatureAlgorithm{jose.RS256, jose.RS384, jose.RS512, jose.ES256, jose.ES384, jose.PS256})
	if err != nil {
		return time.Time{}, fmt.Errorf("not a JWT: %w", err)
	}
	var c jwt.Claims
	if err := tok.UnsafeClaimsWithoutVerification(&c); err != nil {
		return time.Time{}, err
	}
	if c.Expiry == nil {
		return time.Time{}, errors.New("token has no exp claim")
	}
	return c.Expiry.Time(), nil
}

// azureToken asks Azure IMDS for a managed-identity token for resource.
func azureToken(ctx context.Context, hc *http.Client, base, resource string, now func() time.Time) (*oauth2.Token, error) {
	u := strings.TrimRight(base, "/") + "/metadata/identity/oauth2/token?" +
		url.Values{"api-version": {"2018-02-01"}, "resource": {resource}}.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Metadata", "true")
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("azure imds answered %s", resp.Status)
	}
	var r struct {
		AccessToken string `json:"access_token"`
		ExpiresOn   string `json:"expires_on"`
		ExpiresIn   string `json:"expires_in"`
		TokenType   string `json:"token_type"`
	}
	if err := json.Unmarshal(b, &r); err != nil || r.AccessToken == "" {
		return nil, fmt.Errorf("azure imds: no access_token in answer")
	}
	tok := &oauth2.Token{AccessToken: r.AccessToken, TokenType: "Bearer"}
	if on, err := strconv.ParseInt(r.ExpiresOn, 10, 64); err == nil {
		tok.Expiry = time.Unix(on, 0)
	} else if in, err := strconv.ParseInt(r.ExpiresIn, 10, 64); err == nil {
		tok.Expiry = now().Add(time.Duration(in) * time.Second)
	}
	return tok, nil
}
