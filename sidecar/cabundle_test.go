package sidecar

import (
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"sfkit-proxy/config"
)

func TestCABundleWarning(t *testing.T) {
	dir := t.TempDir()
	bundle := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(bundle, []byte("-----BEGIN CERTIFICATE-----\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty")
	certs := filepath.Join(dir, "certs")
	if err := os.Mkdir(empty, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(certs, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(certs, "a.pem"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	none := func(string) string { return "" }
	missing := []string{filepath.Join(dir, "nope.crt")}
	for _, c := range []struct {
		name   string
		getenv func(string) string
		files  []string
		dirs   []string
		want   bool
	}{
		{"a scratch image", none, missing, []string{empty}, false},
		{"a bundle file", none, []string{bundle}, nil, true},
		{"a directory of certificates", none, missing, []string{certs}, true},
		{"SSL_CERT_FILE", func(k string) string { return map[string]string{"SSL_CERT_FILE": bundle}[k] }, missing, nil, true},
		{"SSL_CERT_FILE that is missing", func(k string) string { return map[string]string{"SSL_CERT_FILE": missing[0]}[k] }, []string{bundle}, nil, false},
		{"SSL_CERT_DIR", func(k string) string { return map[string]string{"SSL_CERT_DIR": empty + ":" + certs}[k] }, missing, nil, true},
	} {
		if got := haveCABundle(c.getenv, c.files, c.dirs); got != c.want {
			t.Errorf("%s: haveCABundle = %v; want %v", c.name, got, c.want)
		}
	}

	cfg := func(reg string, relays []string, ca string) *config.Sidecar {
		u, err := url.Parse(reg)
		if err != nil {
			t.Fatal(err)
		}
		c := &config.Sidecar{Registry: u}
		c.Relays, c.RelayCA = relays, ca
		return c
	}
	for _, c := range []struct {
		cfg  *config.Sidecar
		want []string
	}{
		{cfg("http://127.0.0.1:8080/", nil, ""), nil},
		{cfg("https://registry.example.org/", nil, ""), []string{"the https:// registry"}},
		{cfg("wss://sfkit.example.org/api/ice", []string{"turn:relay.example.org:3478", "turns:relay.example.org:5349"}, ""), []string{"the wss:// website relay", "the turns: relay"}},
		{cfg("http://127.0.0.1:8080/", []string{"turns:relay.example.org:5349"}, "ca.pem"), nil},
	} {
		if got := needsCABundle(c.cfg); !slices.Equal(got, c.want) {
			t.Errorf("needsCABundle(%v, %v) = %q; want %q", c.cfg.Registry, c.cfg.Relays, got, c.want)
		}
	}
}
