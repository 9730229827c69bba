package registry

import (
	"bufio"
	"context"
	"errors"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sfkit-proxy/metadata/metadatatest"
)

func TestOIDCTokens(t *testing.T) {
	const aud = "https://registry.example.org/"
	is, err := metadatatest.NewIssuer("https://accounts.google.com")
	if err != nil {
		t.Fatal(err)
	}
	other, _ := metadatatest.NewIssuer("https://accounts.google.com")
	dir := t.TempDir()
	jwks := filepath.Join(dir, "jwks.json")
	os.WriteFile(jwks, is.JWKS(), 0o600)
	members := filepath.Join(dir, "members")
	os.WriteFile(members, []byte("party2@proj.iam.gserviceaccount.com A 2\n5f3c-azure-oid A 3\n"), 0o600)
	m, err := LoadMembers(members)
	if err != nil {
		t.Fatal(err)
	}
	v, err := NewOIDC(context.Background(), is.URL, aud, jwks, m)
	if err != nil {
		t.Fatal(err)
	}
	g, _ := ParseTokens(bufio.NewScanner(strings.NewReader(testTokens)))
	s, _ := NewServer(ServerOptions{Grants: g, OIDC: v})
	ts := httptest.NewServer(s)
	defer ts.Close()

	good := metadatatest.Claims{Audience: aud, Email: "party2@proj.iam.gserviceaccount.com", Expiry: time.Now().Add(time.Hour)}
	with := func(f func(*metadatatest.Claims)) metadatatest.Claims { c := good; f(&c); return c }
	tests := []struct {
		name   string
		signer *metadatatest.Issuer
		claims metadatatest.Claims
		pid    int
		want   int
		reason string
	}{
		{"gce identity of party 2", is, good, 2, 0, ""},
		{"azure identity by sub", is, with(func(c *metadatatest.Claims) { c.Email = ""; c.Subject = "5f3c-azure-oid" }), 3, 0, ""},
		{"wrong audience", is, with(func(c *metadatatest.Claims) { c.Audience = "https://elsewhere/" }), 2, 401, "audience"},
		{"expired", is, with(func(c *metadatatest.Claims) { c.Expiry = time.Now().Add(-time.Hour) }), 2, 401, "expired"},
		{"wrong issuer", is, with(func(c *metadatatest.Claims) { c.Issuer = "https://evil.example/" }), 2, 401, "issued by a different provider"},
		{"unknown signing key", other, good, 2, 401, "signature"},
		{"not a member", is, with(func(c *metadatatest.Claims) { c.Email = "stranger@x" }), 2, 401, "not in the members file"},
		{"member writes another party", is, good, 1, 403, "only write party 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tok, err := tt.signer.Sign(tt.claims)
			if err != nil {
				t.Fatal(err)
			}
			err = client(ts, "A", tt.pid, tok).Publish(context.Background(), entry(tt.pid))
			var se *StatusError
			if tt.want == 0 {
				if err != nil {
					t.Fatalf("Publish = %v; want success", err)
				}
				return
			}
			if !errors.As(err, &se) || se.Code != tt.want || !strings.Contains(se.Msg, tt.reason) {
				t.Fatalf("Publish = %v; want %d with %q", err, tt.want, tt.reason)
			}
			if strings.Contains(se.Msg, tok[:20]) {
				t.Errorf("error message shows the token")
			}
		})
	}
	// Static tokens keep working beside identity tokens.
	if err := client(ts, "A", 0, "tok-study-a-party-0").Publish(context.Background(), entry(0)); err != nil {
		t.Errorf("static token: %v", err)
	}
}
