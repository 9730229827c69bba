// Package identity is a party's identity: its persistent Ed25519 key, the
// self-signed certificate made from it and the pin peers check it by; the
// X25519 check key derived from it that authenticates connectivity checks
// between two parties; and the instance id that tells a restart apart.
package identity

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// Identity is a party's persistent key and a certificate made from it.
type Identity struct {
	Cert tls.Certificate
	// Pin is the unpadded base64url SHA-256 of the SubjectPublicKeyInfo: what
	// peers pin.
	Pin string
}

const keyFile = "identity.key"

// Load reads the Ed25519 key in dir, creating dir (0700) and the key
// (0600) on first use, and makes a self-signed certificate for it. A key file
// that others can read is refused.
func Load(dir string) (*Identity, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	path := filepath.Join(dir, keyFile)
	var key ed25519.PrivateKey
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		_, key, err = ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, err
		}
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, err
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, fmt.Errorf("create identity key: %w", err)
		}
		werr := pem.Encode(f, &pem.Block{Type: "PRIVATE KEY", Bytes: der})
		if err := errors.Join(werr, f.Close()); err != nil {
			return nil, fmt.Errorf("write identity key: %w", err)
		}
	case err != nil:
		return nil, fmt.Errorf("read identity key: %w", err)
	default:
		if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
			return nil, fmt.Errorf("identity key %s is readable by others (mode %v): chmod 600 it", path, fi.Mode().Perm())
		}
		blk, _ := pem.Decode(b)
		if blk == nil {
			return nil, fmt.Errorf("identity key %s is not PEM: move it away to make a new identity", path)
		}
		k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("identity key %s: %w", path, err)
		}
		var ok bool
		if key, ok = k.(ed25519.PrivateKey); !ok {
			return nil, fmt.Errorf("identity key %s is not Ed25519", path)
		}
	}
	return New(key)
}

// New makes a certificate for key.
func New(key ed25519.PrivateKey) (*Identity, error) {
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "sfkit-proxy"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("make certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &Identity{
		Cert: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf},
		Pin:  PinOf(leaf),
	}, nil
}

// PinOf returns the pin of a certificate's public key.
func PinOf(c *x509.Certificate) string {
	h := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return base64.RawURLEncoding.EncodeToString(h[:])
}
