package sidecar

import (
	"os"
	"strings"

	"sfkit-proxy/config"
)

// Where Go's crypto/x509 looks for the system's CA certificates on Linux
// (crypto/x509/root_linux.go), besides $SSL_CERT_FILE and $SSL_CERT_DIR.
var (
	caFiles = []string{
		"/etc/ssl/certs/ca-certificates.crt",
		"/etc/pki/tls/certs/ca-bundle.crt",
		"/etc/ssl/ca-bundle.pem",
		"/etc/pki/tls/cacert.pem",
		"/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
		"/etc/ssl/cert.pem",
	}
	caDirs = []string{"/etc/ssl/certs", "/etc/pki/tls/certs"}
)

// needsCABundle names what this configuration verifies against the
// system's CAs: an https:// registry, a wss:// website relay, a turns:
// relay with no --relay-ca. Empty when nothing does.
func needsCABundle(cfg *config.Sidecar) []string {
	var what []string
	switch cfg.Registry.Scheme {
	case "https":
		what = append(what, "the https:// registry")
	case "wss":
		what = append(what, "the wss:// website relay")
	}
	if cfg.RelayCA == "" {
		for _, r := range cfg.Relays {
			if strings.HasPrefix(r, "turns:") {
				what = append(what, "the turns: relay")
				break
			}
		}
	}
	return what
}

// haveCABundle tells whether any place Go reads system CAs from holds
// something: a FROM-scratch image has none of them.
func haveCABundle(getenv func(string) string, files, dirs []string) bool {
	if f := getenv("SSL_CERT_FILE"); f != "" {
		files = []string{f}
	}
	if d := getenv("SSL_CERT_DIR"); d != "" {
		dirs = strings.Split(d, ":")
	}
	for _, f := range files {
		if st, err := os.Stat(f); err == nil && st.Mode().IsRegular() && st.Size() > 0 {
			return true
		}
	}
	for _, d := range dirs {
		if es, err := os.ReadDir(d); err == nil && len(es) > 0 {
			return true
		}
	}
	return false
}
