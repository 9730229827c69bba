package config

import (
	"errors"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParsePorts(t *testing.T) {
	tests := []struct {
		in      string
		want    string
		has     []uint16
		hasNot  []uint16
		wantErr bool
	}{
		{in: "all", want: "all", has: []uint16{1, 8020, 65535}},
		{in: "8000-8100,9443", want: "8000-8100,9443", has: []uint16{8000, 8050, 8100, 9443}, hasNot: []uint16{7999, 8101, 9442}},
		{in: " 9443 , 8000-8100 ", want: "8000-8100,9443"},
		{in: "10-20,15-30,31", want: "10-31", has: []uint16{31}, hasNot: []uint16{32}},
		{in: "", wantErr: true},
		{in: "0", wantErr: true},
		{in: "70000", wantErr: true},
		{in: "20-10", wantErr: true},
		{in: "80,", wantErr: true},
		{in: "a-b", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParsePorts(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParsePorts(%q) = %v, %v; want error %v", tt.in, got, err, tt.wantErr)
			}
			if err != nil {
				return
			}
			if got.String() != tt.want {
				t.Errorf("ParsePorts(%q) = %q; want %q", tt.in, got, tt.want)
			}
			for _, p := range tt.has {
				if !got.Contains(p) {
					t.Errorf("ParsePorts(%q).Contains(%d) = false", tt.in, p)
				}
			}
			for _, p := range tt.hasNot {
				if got.Contains(p) {
					t.Errorf("ParsePorts(%q).Contains(%d) = true", tt.in, p)
				}
			}
		})
	}
}

func FuzzParsePorts(f *testing.F) {
	for _, s := range []string{"all", "8000-8100,9443", "1", "65535", "1-2,3-4"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ps, err := ParsePorts(s)
		if err != nil {
			return
		}
		again, err := ParsePorts(ps.String())
		if err != nil || again.String() != ps.String() {
			t.Errorf("ParsePorts(%q).String() = %q does not parse back the same: %q, %v", s, ps, again, err)
		}
	})
}

func TestVirtualAddr(t *testing.T) {
	p := netip.MustParsePrefix("10.0.0.0/24")
	tests := []struct {
		pid  int
		want string
	}{{0, "10.0.0.0"}, {1, "10.0.0.1"}, {254, "10.0.0.254"}, {300, "10.0.1.44"}}
	for _, tt := range tests {
		if got := VirtualAddr(p, tt.pid); got.String() != tt.want {
			t.Errorf("VirtualAddr(%v, %d) = %v; want %s", p, tt.pid, got, tt.want)
		}
		pid, ok := PIDOf(p, netip.MustParseAddr(tt.want))
		if in := p.Contains(netip.MustParseAddr(tt.want)); ok != in || (ok && pid != tt.pid) {
			t.Errorf("PIDOf(%s) = %d, %v; want %d, %v", tt.want, pid, ok, tt.pid, in)
		}
	}
	if _, ok := PIDOf(p, netip.MustParseAddr("192.168.1.1")); ok {
		t.Error("PIDOf(192.168.1.1) is in 10.0.0.0/24")
	}
}

var required = []string{"--study", "s1", "--pid", "0", "--registry", "https://r.example/", "--state-dir", "/tmp/x"}

func TestParseSidecarErrors(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"nothing", nil, "--study is required"},
		{"no pid", []string{"--study", "s", "--registry", "https://r/"}, "--pid is required"},
		{"no registry", []string{"--study", "s", "--pid", "1"}, "--registry (or -api) is required"},
		{"bad registry", append(required, "--registry", "ftp://x"), "want an http(s):// registry URL"},
		{"public socks", append(required, "--socks-listen", "0.0.0.0:1080"), "--socks-any-host"},
		{"public admin API", append(required, "--admin-listen", "0.0.0.0:1081"), "--admin-any-host"},
		{"public forward", append(required, "--forward", "0.0.0.0:9000=1:8000"), "--forward-any-host"},
		{"bad admin address", append(required, "--admin-listen", "localhost"), "--admin-listen"},
		{"bad ports", append(required, "--allow-ports", "99999"), "--allow-ports"},
		{"bad direct", append(required, "--direct", "maybe"), "want allow or deny"},
		{"pid outside range", append(required, "--pid", "300"), "does not fit"},
		{"stray argument", append(required, "extra"), "unexpected argument"},
		{"no connections per peer", append(required, "--conns-per-peer", "0"), "--conns-per-peer 0: want 1 to 32"},
		{"too many connections per peer", append(required, "--conns-per-peer", "33"), "--conns-per-peer 33: want 1 to 32"},
		{"a packet size below QUIC's minimum", append(required, "--max-packet-size", "1100"), "--max-packet-size 1100: want 1200 to 1452"},
		{"a packet size past what Ethernet carries", append(required, "--max-packet-size", "1500"), "--max-packet-size 1500: want 1200 to 1452"},
		{"peer relay neither on nor off", append(required, "--peer-relay", "yes"), `--peer-relay "yes": want on or off`},
		{"a peer relay rate of nothing", append(required, "--peer-relay-max-bps", "0"), "--peer-relay-max-bps 0: want at least 65536"},
		{"a relay with no credentials", append(required, "--relay", "turn:203.0.113.10:3478?transport=udp"), "--relay needs credentials"},
		{"a bad relay URL", append(required, "--relay", "http://x", "--relay-secret-file", "s"), "--relay:"},
		{"unknown flag", append(required, "--nope"), "flag provided but not defined: -nope (sfkit-proxy -h lists the flags)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseSidecar(tt.args, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ParseSidecar(%q) = %v; want error with %q", tt.args, err, tt.want)
			}
		})
	}
}

func TestParseSidecarPrecedence(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "conf")
	os.WriteFile(file, []byte("socks-listen 127.0.0.1:1001\nallow-ports 1-10\nlog-level debug\n"), 0o600)
	t.Setenv("SFKIT_PROXY_SOCKS_LISTEN", "127.0.0.1:1002")
	t.Setenv("SFKIT_PROXY_ALLOW_PORTS", "20-30")
	args := append(required, "--config", file, "--allow-ports", "40")
	c, err := ParseSidecar(args, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.SOCKSListen.String() != "127.0.0.1:1002" {
		t.Errorf("socks-listen = %v; want env (127.0.0.1:1002) over file", c.SOCKSListen)
	}
	if c.AllowPorts.String() != "40" {
		t.Errorf("allow-ports = %v; want flag (40) over env and file", c.AllowPorts)
	}
	if c.LogLevel.String() != "DEBUG" {
		t.Errorf("log-level = %v; want file's debug", c.LogLevel)
	}
	if c.UDPListen.String() != "0.0.0.0:0" || !c.Direct || len(c.STUN) != 3 {
		t.Errorf("defaults: udp %v direct %v stun %v", c.UDPListen, c.Direct, c.STUN)
	}
}

func TestHelpListsEveryFlagAndEnv(t *testing.T) {
	var out strings.Builder
	_, err := ParseSidecar([]string{"-h"}, &out)
	if !errors.Is(err, ErrHelp) {
		t.Fatalf("ParseSidecar(-h) = %v; want ErrHelp", err)
	}
	for _, want := range []string{"--study", "--pid", "--registry", "--auth-key-file", "--socks-listen", "--udp-listen",
		"--stun", "--peers-cidr", "--allow-ports", "--direct", "--state-dir", "--config", "--log-level",
		"$SFKIT_PROXY_SOCKS_LISTEN", `(default "127.0.0.1:1080")`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("help lacks %q", want)
		}
	}
}

func TestBadFlagIsOneLine(t *testing.T) {
	var out strings.Builder
	_, err := ParseSidecar(append(required, "--nope"), &out)
	if err == nil || strings.Contains(err.Error(), "\n") || out.Len() != 0 {
		t.Errorf("ParseSidecar(--nope) = %q and printed %d bytes; want one line and no usage", err, out.Len())
	}
}

func TestParseRegistry(t *testing.T) {
	if _, err := ParseRegistry(nil, io.Discard); err == nil || !strings.Contains(err.Error(), "--tokens is required") {
		t.Errorf("ParseRegistry() = %v; want --tokens is required", err)
	}
	c, err := ParseRegistry([]string{"--tokens", "t", "--data", "d"}, io.Discard)
	if err != nil || c.Listen != "127.0.0.1:8080" {
		t.Errorf("ParseRegistry = %+v, %v; want loopback default", c, err)
	}
}

func TestParseAdminClient(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "sidecar.conf")
	// A sidecar's config file: the client takes admin-listen and ignores the rest.
	os.WriteFile(file, []byte("study s1\npid 2\nadmin-listen 127.0.0.1:2001\n"), 0o600)
	tests := []struct {
		name    string
		cmd     string
		args    []string
		env     string
		want    AdminClient
		wantErr string
	}{
		{"status default", "status", nil, "", AdminClient{Addr: DefaultAdminListen, Count: 3, PID: -1}, ""},
		{"status json from env", "status", []string{"--json"}, "127.0.0.1:2002", AdminClient{Addr: "127.0.0.1:2002", JSON: true, Count: 3, PID: -1}, ""},
		{"status from sidecar config", "status", []string{"--config", file}, "", AdminClient{Addr: "127.0.0.1:2001", Count: 3, PID: -1}, ""},
		{"ping pid first", "ping", []string{"2", "--count", "5"}, "", AdminClient{Addr: DefaultAdminListen, Count: 5, PID: 2}, ""},
		{"ping pid last", "ping", []string{"--admin-listen", "127.0.0.1:9", "0"}, "", AdminClient{Addr: "127.0.0.1:9", Count: 3, PID: 0}, ""},
		{"ping without pid", "ping", nil, "", AdminClient{}, "needs a party id"},
		{"ping bad count", "ping", []string{"1", "--count", "0"}, "", AdminClient{}, "--count"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.env != "" {
				t.Setenv("SFKIT_PROXY_ADMIN_LISTEN", tt.env)
			}
			got, err := ParseAdminClient(tt.cmd, tt.args, io.Discard)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("ParseAdminClient(%q) = %v; want error with %q", tt.args, err, tt.wantErr)
				}
				return
			}
			if err != nil || *got != tt.want {
				t.Errorf("ParseAdminClient(%q) = %+v, %v; want %+v", tt.args, got, err, tt.want)
			}
		})
	}
}

// TestForwardNeedsAnyHostOffLoopback tries to expose a forward, whose
// listener carries anyone who reaches it into a peer's tunnel, on an address
// other than loopback: refused, in one line that says what to add, unless
// --forward-any-host says so.
func TestForwardNeedsAnyHostOffLoopback(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		want    string // the forward's listen address, when accepted
		wantErr string
	}{
		{"all IPv4 addresses", []string{"--forward", "0.0.0.0:9000=1:8000"}, "",
			"--forward 0.0.0.0:9000=1:8000: 0.0.0.0 is not a loopback address: add --forward-any-host if you really mean to expose it"},
		{"all IPv6 addresses", []string{"--forward", "[::]:9000=1:8000"}, "",
			"--forward [::]:9000=1:8000: :: is not a loopback address: add --forward-any-host if you really mean to expose it"},
		{"a LAN address", []string{"--forward", "192.168.1.5:9000=1:8000"}, "",
			"--forward 192.168.1.5:9000=1:8000: 192.168.1.5 is not a loopback address: add --forward-any-host if you really mean to expose it"},
		{"a mapped LAN address", []string{"--forward", "[::ffff:192.168.1.5]:9000=1:8000"}, "",
			"--forward [::ffff:192.168.1.5]:9000=1:8000: ::ffff:192.168.1.5 is not a loopback address: add --forward-any-host if you really mean to expose it"},
		{"one of two", []string{"--forward", "9001=1:8001,0.0.0.0:9000=1:8000"}, "",
			"--forward 0.0.0.0:9000=1:8000: 0.0.0.0 is not a loopback address: add --forward-any-host if you really mean to expose it"},
		{"all addresses with the flag", []string{"--forward", "0.0.0.0:9000=1:8000", "--forward-any-host"}, "0.0.0.0:9000", ""},
		{"LAN address with the flag", []string{"--forward", "192.168.1.5:9000=1:8000", "--forward-any-host"}, "192.168.1.5:9000", ""},
		{"127.0.0.1", []string{"--forward", "127.0.0.1:9000=1:8000"}, "127.0.0.1:9000", ""},
		{"other loopback", []string{"--forward", "127.0.0.2:9000=1:8000"}, "127.0.0.2:9000", ""},
		{"[::1]", []string{"--forward", "[::1]:9000=1:8000"}, "[::1]:9000", ""},
		{"bare port", []string{"--forward", "9000=1:8000"}, "127.0.0.1:9000", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append(append([]string(nil), required...), tt.args...)
			c, err := ParseSidecar(args, io.Discard)
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Errorf("ParseSidecar(%q) = %v; want %q", tt.args, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseSidecar(%q) = %v; want it accepted", tt.args, err)
			}
			if len(c.Forwards) != 1 || c.Forwards[0].Listen.String() != tt.want || c.Forwards[0].PID != 1 || c.Forwards[0].Port != 8000 {
				t.Errorf("ParseSidecar(%q).Forwards = %v; want one listening on %s to party 1 port 8000", tt.args, c.Forwards, tt.want)
			}
		})
	}
}

// TestParseNetcheck: netcheck takes the sidecar's STUN and relay flags, its
// environment and config file, ignores the sidecar's other flags there,
// and checks what it takes as the sidecar does.
func TestParseNetcheck(t *testing.T) {
	t.Setenv("SFKIT_PROXY_STUN", "203.0.113.10:3478,203.0.113.11:3478")
	t.Setenv("SFKIT_PROXY_STUDY", "s") // a sidecar flag: ignored
	c, err := ParseNetcheck([]string{"--json", "--relay", "turns:203.0.113.10:5349", "--relay-user", "p", "--relay-secret-file", "f"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !c.JSON || len(c.STUN) != 2 || len(c.Relays) != 1 || c.RelayUser != "p" || c.RelaySecretFile != "f" || !c.UDPListen.IsValid() {
		t.Errorf("ParseNetcheck = %+v", c)
	}
	for _, args := range [][]string{{"--relay", "turn:203.0.113.10:3478"}, {"--stun", ""}, {"extra"}} {
		if _, err := ParseNetcheck(args, io.Discard); err == nil {
			t.Errorf("ParseNetcheck(%q) = nil error; want one", args)
		}
	}
}
