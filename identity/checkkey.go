package identity

import (
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"strconv"
)

// CheckKey is this party's key for connectivity checks: an X25519 key pair. Its public half is published (check_key). Checks
// between two parties carry integrity under a key derived from a
// Diffie-Hellman of one's private and the other's public half, so no third
// member of the study can forge a check or an answer between them.
type CheckKey struct{ priv *ecdh.PrivateKey }

// CheckKeyOf derives a party's check key from its identity key, so that it
// survives a restart as the pin does: peers that cannot hear of the
// restart (the website relay holds a returning party at its barrier) still
// verify its checks, and learn its new address from them.
func CheckKeyOf(id *Identity) *CheckKey {
	seed := id.Cert.PrivateKey.(ed25519.PrivateKey).Seed()
	b, err := hkdf.Key(sha256.New, seed, nil, "sfkit-proxy check key", 32)
	if err != nil {
		panic(err) // a fixed, valid length
	}
	k, err := ecdh.X25519().NewPrivateKey(b)
	if err != nil {
		panic(err) // any 32 bytes are an X25519 private key
	}
	return &CheckKey{priv: k}
}

// NewCheckKey makes a new, random check key pair.
func NewCheckKey() *CheckKey {
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		panic(err) // crypto/rand does not fail
	}
	return &CheckKey{priv: k}
}

// Public is the public half, as published: unpadded base64url, 43 characters.
func (k *CheckKey) Public() string {
	return base64.RawURLEncoding.EncodeToString(k.priv.PublicKey().Bytes())
}

// ParseCheckPublic checks a published check key.
func ParseCheckPublic(s string) (*ecdh.PublicKey, error) {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("check key is not unpadded base64url: %w", err)
	}
	pub, err := ecdh.X25519().NewPublicKey(b)
	if err != nil {
		return nil, fmt.Errorf("check key: %w", err)
	}
	return pub, nil
}

// PairKey is the integrity key of checks between parties a and b in study,
// both ways, given the other party's public check key.
func (k *CheckKey) PairKey(study string, a, b int, peerPublic string) (string, error) {
	pub, err := ParseCheckPublic(peerPublic)
	if err != nil {
		return "", err
	}
	shared, err := k.priv.ECDH(pub) // fails on low-order points
	if err != nil {
		return "", fmt.Errorf("check key: %w", err)
	}
	lo, hi := min(a, b), max(a, b)
	key, err := hkdf.Key(sha256.New, shared, []byte(study), "sfkit-proxy check "+strconv.Itoa(lo)+" "+strconv.Itoa(hi), 32)
	if err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(key), nil
}

// NewInstance returns a random instance name: it changes at every start,
// so that peers tell a restart from a reconnect.
func NewInstance() string { return rand.Text()[:16] }
