package registry

import (
	"bufio"
	"context"
	"crypto"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/go-jose/go-jose/v4"
)

// OIDC accepts cloud identity tokens (GCE ID tokens, Azure managed-identity
// tokens): it checks signature, issuer, audience and expiry with go-oidc,
// then maps the token's email (else its sub) to a party through a members
// file.
type OIDC struct {
	verifier *oidc.IDTokenVerifier
	members  map[string]Grant
}

// NewOIDC makes a verifier for tokens from issuer for audience. jwks is a
// JWKS file or an http(s) URL of one; ctx bounds the fetches of a URL.
func NewOIDC(ctx context.Context, issuer, audience, jwks string, members map[string]Grant) (*OIDC, error) {
	var keys oidc.KeySet
	if strings.HasPrefix(jwks, "https://") || strings.HasPrefix(jwks, "http://") {
		keys = oidc.NewRemoteKeySet(ctx, jwks)
	} else {
		b, err := os.ReadFile(jwks)
		if err != nil {
			return nil, fmt.Errorf("oidc jwks: %w", err)
		}
		var set jose.JSONWebKeySet
		if err := json.Unmarshal(b, &set); err != nil || len(set.Keys) == 0 {
			return nil, fmt.Errorf("oidc jwks %s: not a JWKS with keys", jwks)
		}
		static := &oidc.StaticKeySet{}
		for _, k := range set.Keys {
			static.PublicKeys = append(static.PublicKeys, crypto.PublicKey(k.Key))
		}
		keys = static
	}
	v := oidc.NewVerifier(issuer, keys, &oidc.Config{ClientID: audience})
	return &OIDC{verifier: v, members: members}, nil
}

// Grant verifies raw and returns what its identity may do. Its errors say
// why a token was refused (expired, wrong audience, …) and never contain it.
func (o *OIDC) Grant(ctx context.Context, raw string) (Grant, string, error) {
	tok, err := o.verifier.Verify(ctx, raw)
	if err != nil {
		return Grant{}, "", err
	}
	var c struct {
		Email string `json:"email"`
	}
	if err := tok.Claims(&c); err != nil {
		return Grant{}, "", err
	}
	id := c.Email
	if id == "" {
		id = tok.Subject
	}
	g, ok := o.members[id]
	if !ok {
		return Grant{}, id, fmt.Errorf("identity %q is not in the members file", id)
	}
	return g, id, nil
}

// LoadMembers reads a members file: lines "IDENTITY STUDY PID", where
// IDENTITY is a token's email claim, else its sub.
func LoadMembers(path string) (map[string]Grant, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("members file: %w", err)
	}
	defer f.Close()
	m, err := parseGrants(bufio.NewScanner(f), 1, func(s string) string { return s })
	if err != nil {
		return nil, fmt.Errorf("members file %s: %w", path, err)
	}
	return m, nil
}
