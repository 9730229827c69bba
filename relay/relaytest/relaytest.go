// Package relaytest runs a real coturn (turnserver) on loopback for tests.
package relaytest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// Coturn is a running turnserver.
type Coturn struct {
	Port    uint16 // UDP and TCP
	TLSPort uint16
	User    string
	Pass    string
	Secret  string // set when started with the REST scheme
	RootCAs *x509.CertPool
	Log     string // path of its log
	cmd     *exec.Cmd
}

// Options for Start.
type Options struct {
	// Secret selects coturn's shared-secret (REST) scheme instead of a user.
	Secret string
	// Port, when not zero, is the UDP and TCP port (to start a server
	// again where one stopped); zero picks a free one.
	Port uint16
}

// Start runs turnserver on 127.0.0.1 until the test ends, relaying to
// loopback peers. It skips the test when turnserver is not installed.
func Start(t *testing.T, o Options) *Coturn {
	t.Helper()
	bin, err := exec.LookPath("turnserver")
	if err != nil {
		t.Skip("turnserver (Debian package coturn) is not installed: apt-get install coturn")
	}
	dir := t.TempDir()
	port := o.Port
	if port == 0 {
		port = freePort(t)
	}
	c := &Coturn{Port: port, TLSPort: freePort(t), User: "party", Pass: "relay-password", Secret: o.Secret,
		Log: filepath.Join(dir, "turn.log")}
	cert, key, pool := testCert(t, dir)
	c.RootCAs = pool
	args := []string{"-n", "--no-cli", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
		"--listening-port=" + strconv.Itoa(int(c.Port)), "--tls-listening-port=" + strconv.Itoa(int(c.TLSPort)),
		"--allow-loopback-peers", "--realm=sfkit", "--no-dtls", "--cert=" + cert, "--pkey=" + key,
		"--min-port=49152", "--max-port=65535", "--log-file=" + c.Log, "--simple-log",
		"--pidfile=" + filepath.Join(dir, "turn.pid"), "--no-stun-backward-compatibility"}
	if o.Secret != "" {
		args = append(args, "--use-auth-secret", "--static-auth-secret="+o.Secret)
	} else {
		args = append(args, "--lt-cred-mech", "--user="+c.User+":"+c.Pass)
	}
	cmd := exec.Command(bin, args...)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start turnserver: %v", err)
	}
	c.cmd = cmd
	t.Cleanup(c.Stop)
	for range 100 {
		if conn, err := net.Dial("tcp", c.Addr()); err == nil {
			conn.Close()
			return c
		}
		time.Sleep(50 * time.Millisecond)
	}
	log, _ := os.ReadFile(c.Log)
	t.Fatalf("turnserver did not come up:\n%s", log)
	return nil
}

// Stop kills the server (its allocations die with it); safe to call twice.
func (c *Coturn) Stop() {
	if c.cmd.ProcessState == nil {
		c.cmd.Process.Kill()
		c.cmd.Wait()
	}
}

// FreePort is a port free for UDP and TCP on 127.0.0.1 now.
func FreePort(t *testing.T) uint16 { return freePort(t) }

// Addr is the TURN address for UDP and TCP.
func (c *Coturn) Addr() string { return fmt.Sprintf("127.0.0.1:%d", c.Port) }

// TLSAddr is the TURN-over-TLS address.
func (c *Coturn) TLSAddr() string { return fmt.Sprintf("127.0.0.1:%d", c.TLSPort) }

func freePort(t *testing.T) uint16 {
	// A port free for both TCP and UDP.
	for range 50 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if pc, err := net.ListenPacket("udp", "127.0.0.1:"+strconv.Itoa(p)); err == nil {
			pc.Close()
			return uint16(p)
		}
	}
	t.Fatal("no free port")
	return 0
}

// testCert writes a self-signed certificate for 127.0.0.1.
func testCert(t *testing.T, dir string) (certPath, keyPath string, pool *x509.CertPool) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{netip.MustParseAddr("127.0.0.1").AsSlice()}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalECPrivateKey(k)
	certPath, keyPath = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd}), 0o600)
	leaf, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(leaf)
	return certPath, keyPath, pool
}
