// Package metadatatest provides fake cloud metadata servers for tests: they
// enforce the real paths and headers of the GCE metadata server and Azure
// IMDS, and hand out tokens signed by a test issuer whose JWKS a registry
// can verify against. Nothing else in a cloud can run here.
package metadatatest

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// Issuer signs tokens with an RSA key.
type Issuer struct {
	URL string // the iss claim
	key *rsa.PrivateKey
	kid string
}

// NewIssuer makes an issuer with a fresh 2048-bit key.
func NewIssuer(url string) (*Issuer, error) {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	return &Issuer{URL: url, key: k, kid: rand.Text()[:8]}, nil
}

// Claims are the claims of a test token.
type Claims struct {
	Issuer   string // "" means the issuer's URL
	Audience string
	Subject  string
	Email    string
	Expiry   time.Time
}

// Sign returns a signed JWT.
func (is *Issuer) Sign(c Claims) (string, error) {
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: is.key},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", is.kid))
	if err != nil {
		return "", err
	}
	iss := c.Issuer
	if iss == "" {
		iss = is.URL
	}
	now := time.Now()
	std := jwt.Claims{Issuer: iss, Subject: c.Subject, Audience: jwt.Audience{c.Audience},
		IssuedAt: jwt.NewNumericDate(now), NotBefore: jwt.NewNumericDate(now.Add(-time.Minute)), Expiry: jwt.NewNumericDate(c.Expiry)}
	extra := map[string]any{}
	if c.Email != "" {
		extra["email"] = c.Email
		extra["email_verified"] = true
	}
	return jwt.Signed(signer).Claims(std).Claims(extra).Serialize()
}

// JWKS is the issuer's public key set.
func (is *Issuer) JWKS() []byte {
	b, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &is.key.PublicKey, KeyID: is.kid, Algorithm: "RS256", Use: "sig"}}})
	return b
}

// Identity describes the instance a fake server speaks for.
type Identity struct {
	Email    string        // GCE: the service account's email
	Subject  string        // the sub claim
	Lifetime time.Duration // of each token; zero means one hour
	// Issuer overrides the issuer's URL in the iss claim, to test a wrong one.
	Issuer string
	// Audience, if set, replaces the requested audience, to test a wrong one.
	Audience string
	// SignWith, if set, returns the issuer to sign the n-th token (from 1)
	// with, e.g. a rotated-out key for the first.
	SignWith func(n int64) *Issuer
}

// Server is a fake metadata server; it counts the tokens it handed out.
type Server struct {
	Issued   atomic.Int64
	mu       sync.Mutex          // guards audience, access
	audience string              // the last audience asked for
	access   map[string][]string // OAuth2 access tokens handed out, with their scopes
}

// AccessToken reports whether tok is an OAuth2 access token this server
// handed out, and its scopes: what Google's tokeninfo would tell a
// service that receives it.
func (s *Server) AccessToken(tok string) ([]string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sc, ok := s.access[tok]
	return sc, ok
}

func (s *Server) token(is *Issuer, id Identity, aud string) (string, time.Time, error) {
	n := s.Issued.Add(1)
	s.mu.Lock()
	s.audience = aud
	s.mu.Unlock()
	if id.SignWith != nil {
		is = id.SignWith(n)
	}
	if id.Audience != "" {
		aud = id.Audience
	}
	life := id.Lifetime
	if life == 0 {
		life = time.Hour
	}
	exp := time.Now().Add(life)
	t, err := is.Sign(Claims{Issuer: id.Issuer, Audience: aud, Subject: id.Subject, Email: id.Email, Expiry: exp})
	return t, exp, err
}

// LastAudience is the audience of the last request.
func (s *Server) LastAudience() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.audience
}

// GCE returns a handler speaking the GCE metadata server's identity
// endpoint: GET /computeMetadata/v1/instance/service-accounts/default/identity
// ?audience=AUD&format=full with header Metadata-Flavor: Google. Like the real
// one it refuses requests without the header, and answers with that header.
func (s *Server) GCE(is *Issuer, id Identity) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /computeMetadata/v1/instance/service-accounts/default/identity", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Metadata-Flavor", "Google")
		if r.Header.Get("Metadata-Flavor") != "Google" {
			http.Error(w, "Missing required header \"Metadata-Flavor\": \"Google\"", http.StatusForbidden)
			return
		}
		if r.Header.Get("X-Forwarded-For") != "" {
			http.Error(w, "forwarded requests are refused", http.StatusForbidden)
			return
		}
		aud := r.URL.Query().Get("audience")
		if aud == "" {
			http.Error(w, "non-empty audience parameter required", http.StatusBadRequest)
			return
		}
		t, _, err := s.token(is, id, aud)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "text/html")
		fmt.Fprint(w, t)
	})
	// The service account's OAuth2 access token, as golang.org/x/oauth2/google
	// asks for it on GCE: GET …/token?scopes=A,B, answered with JSON.
	mux.HandleFunc("GET /computeMetadata/v1/instance/service-accounts/default/token", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Metadata-Flavor", "Google")
		if r.Header.Get("Metadata-Flavor") != "Google" {
			http.Error(w, "Missing required header \"Metadata-Flavor\": \"Google\"", http.StatusForbidden)
			return
		}
		var scopes []string
		if sc := r.URL.Query().Get("scopes"); sc != "" {
			scopes = strings.Split(sc, ",")
		}
		s.Issued.Add(1)
		tok := "ya29.fake-" + rand.Text()
		s.mu.Lock()
		if s.access == nil {
			s.access = make(map[string][]string)
		}
		s.access[tok] = scopes
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"access_token": tok, "expires_in": 3599, "token_type": "Bearer"})
	})
	mux.HandleFunc("GET /computeMetadata/v1/project/project-id", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Metadata-Flavor", "Google")
		fmt.Fprint(w, "sfkit-test-project")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Metadata-Flavor", "Google")
		http.NotFound(w, r)
	})
	return mux
}

// Azure returns a handler speaking Azure IMDS's managed-identity endpoint:
// GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=R with
// header Metadata: true.
func (s *Server) Azure(is *Issuer, id Identity) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metadata/identity/oauth2/token", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fail := func(code int, desc string) {
			w.WriteHeader(code)
			json.NewEncoder(w).Encode(map[string]string{"error": "invalid_request", "error_description": desc})
		}
		if r.Header.Get("Metadata") != "true" {
			fail(http.StatusBadRequest, "Required metadata header not specified")
			return
		}
		if r.URL.Query().Get("api-version") == "" {
			fail(http.StatusBadRequest, "Required query variable 'api-version' is missing")
			return
		}
		res := r.URL.Query().Get("resource")
		if res == "" {
			fail(http.StatusBadRequest, "Required query variable 'resource' is missing")
			return
		}
		t, exp, err := s.token(is, id, res)
		if err != nil {
			fail(http.StatusInternalServerError, err.Error())
			return
		}
		json.NewEncoder(w).Encode(map[string]string{
			"access_token": t, "client_id": "00000000-0000-0000-0000-000000000000",
			"expires_in": strconv.Itoa(int(time.Until(exp).Seconds())), "expires_on": strconv.FormatInt(exp.Unix(), 10),
			"ext_expires_in": strconv.Itoa(int(time.Until(exp).Seconds())), "not_before": strconv.FormatInt(time.Now().Unix(), 10),
			"resource": res, "token_type": "Bearer",
		})
	})
	return mux
}
