package config

import (
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// A configGlobal.toml as sfgwas has it, addresses rewritten by sfkit.
const mpcConfig = `
num_main_parties = 2
mpc_num_threads = 4
mpc_field_size = 256

[servers.party0]
ipaddr = "127.0.0.1"
ports  = {party1 = "8020", party2 = "8040"}

[servers.party1]
ipaddr = "127.0.0.1"
ports  = {party0 = "8020", party2 = "8060"}

[servers.party2]
ipaddr = "127.0.0.1"
ports  = {party0 = "8040", party1 = "8060"}
`

func writeMPC(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "configGlobal.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestSfkitCommandLine parses the argument list sfkit starts its proxy
// with, verbatim.
func TestSfkitCommandLine(t *testing.T) {
	mpc := writeMPC(t, mpcConfig)
	t.Setenv("SFKIT_PROXY_STUN", "stun:203.0.113.10:3478,stun:203.0.113.11:3478")
	args := []string{"-v", "-api", "wss://sfkit.example.org/api/ice", "-study", "abc123", "-pid", "2",
		"-mpc", mpc, "-socks", "socks5://localhost:7080", "-auth-key", "KEY-1", "--state-dir", t.TempDir()}
	c, err := ParseSidecar(args, nil)
	if err != nil {
		t.Fatalf("ParseSidecar(sfkit's arguments) = %v", err)
	}
	if c.Registry.String() != "wss://sfkit.example.org/api/ice" || !c.Website() || c.Study != "abc123" || c.PID != 2 || c.AuthKey != "KEY-1" {
		t.Errorf("config = %+v; want the website relay, study abc123, pid 2, the key", c)
	}
	if c.SOCKSListen != netip.MustParseAddrPort("127.0.0.1:7080") {
		t.Errorf("SOCKSListen = %v; want 127.0.0.1:7080", c.SOCKSListen)
	}
	if want := []string{"203.0.113.10:3478", "203.0.113.11:3478"}; !slices.Equal(c.STUN, want) {
		t.Errorf("STUN = %v; want %v", c.STUN, want)
	}
	if c.LogLevel != slog.LevelDebug {
		t.Errorf("-v: level %v; want debug", c.LogLevel)
	}
	if !slices.Equal(c.Parties, []int{0, 1, 2}) || c.MPC == nil || c.TunnelWait != DefaultTunnelWait {
		t.Errorf("parties %v, mpc %v, tunnel wait %v; want 0,1,2 from the MPC config and the default", c.Parties, c.MPC, c.TunnelWait)
	}
	args[0] = "-v"
	c, err = ParseSidecar(append([]string{"-v"}, args...), nil)
	if err != nil || c.LogLevel != LevelTrace {
		t.Errorf("-v -v: level %v, %v; want trace", c.LogLevel, err)
	}
}

func TestSfkitCommandLineErrors(t *testing.T) {
	base := []string{"-study", "s", "-pid", "1", "--state-dir", t.TempDir()}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"website without parties", []string{"-api", "wss://h/api/ice"}, "needs the study's parties"},
		{"socks URI scheme", []string{"-api", "https://h/", "-socks", "http://localhost:7080"}, "want socks5://HOST:PORT"},
		{"socks not loopback", []string{"-api", "https://h/", "-socks", "socks5://192.0.2.1:7080"}, "not a loopback address"},
		{"missing mpc file", []string{"-api", "https://h/", "-mpc", "/nonexistent/configGlobal.toml"}, "-mpc"},
		{"forward without mpc", []string{"-api", "https://h/", "--mpc-forward"}, "--mpc-forward needs -mpc"},
		{"bad forward", []string{"-api", "https://h/", "--forward", "8040=x"}, "want LOCAL=PID:PORT"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseSidecar(append(slices.Clone(base), tt.args...), nil)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ParseSidecar(%q) = %v; want an error with %q", tt.args, err, tt.want)
			}
		})
	}
}

func TestMPCRoutes(t *testing.T) {
	m, err := ParseMPC(strings.NewReader(mpcConfig), 2)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		host string
		port uint16
		pid  int
		ok   bool
	}{
		{"127.0.0.1", 8040, 0, true},
		{"127.0.0.1", 8043, 0, true}, // thread 3
		{"127.0.0.1", 8044, 0, false},
		{"localhost", 8061, 1, true},
		{"::1", 8062, 1, true},
		{"127.0.0.1", 8020, 0, false}, // between 0 and 1: not ours
		{"192.0.2.1", 8040, 0, false},
		{"example.org", 8040, 0, false},
	}
	for _, tt := range tests {
		pid, ok := m.Route(tt.host, tt.port)
		if ok != tt.ok || ok && pid != tt.pid {
			t.Errorf("Route(%s, %d) = %d, %v; want %d, %v", tt.host, tt.port, pid, ok, tt.pid, tt.ok)
		}
	}
	// Party 0 listens for everyone and dials no one.
	m0, err := ParseMPC(strings.NewReader(mpcConfig), 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := m0.Route("127.0.0.1", 8040); ok || len(m0.PeerPorts()) != 0 {
		t.Errorf("party 0 routes its own listening port to a peer")
	}
	if got := len(m.PeerPorts()); got != 8 {
		t.Errorf("party 2 forwards %d ports; want 8 (4 threads × 2 peers)", got)
	}
	// An address given in the file is routed too.
	real := strings.Replace(mpcConfig, `ipaddr = "127.0.0.1"
ports  = {party1 = "8020", party2 = "8040"}`, `ipaddr = "198.51.100.5"
ports  = {party1 = "8020", party2 = "8040"}`, 1)
	mr, err := ParseMPC(strings.NewReader(real), 2)
	if err != nil {
		t.Fatal(err)
	}
	if pid, ok := mr.Route("198.51.100.5", 8041); !ok || pid != 0 {
		t.Errorf("Route(198.51.100.5, 8041) = %d, %v; want party 0", pid, ok)
	}
}

func TestMPCConfigErrors(t *testing.T) {
	tests := []struct {
		name, body, want string
	}{
		{"not toml", "mpc_num_threads = = 4", "not valid TOML"},
		{"no threads", "[servers.party0]\nipaddr = \"127.0.0.1\"", "mpc_num_threads"},
		{"bad server name", "mpc_num_threads = 1\n[servers.p0]\nipaddr = \"x\"", "servers.partyN"},
		{"not a party", "mpc_num_threads = 1\n[servers.party0]\nipaddr = \"127.0.0.1\"\nports = {party2 = \"8000\"}", "no servers.party2"},
		{"missing port", strings.Replace(mpcConfig, `party2 = "8040"}`, `}`, 1), "servers.party0.ports has no party2"},
		{"bad port", strings.Replace(mpcConfig, `"8040"`, `"eighty"`, 1), "servers.party0.ports.party2"},
		{"port past 65535", strings.Replace(mpcConfig, `party2 = "8040"`, `party2 = "65534"`, 1), "65535"},
		{"bad address", strings.Replace(mpcConfig, `"127.0.0.1"`, `"not-an-ip"`, 1), "ipaddr"},
		{"overlapping peers", strings.Replace(mpcConfig, `{party0 = "8020", party2 = "8060"}`, `{party0 = "8020", party2 = "8042"}`, 1), "overlap"},
		{"peer on own port", strings.Replace(mpcConfig, `{party0 = "8040", party1 = "8060"}`, `{party0 = "8040", party1 = "8060", party3 = "8041"}`, 1) +
			"\n[servers.party3]\nipaddr = \"127.0.0.1\"\nports = {party2 = \"8041\"}", "overlap"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseMPC(strings.NewReader(tt.body), 2)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ParseMPC = %v; want an error with %q", err, tt.want)
			}
		})
	}
}

func TestParseForward(t *testing.T) {
	f, err := ParseForward("8040=0:8041")
	if err != nil || f.Listen != netip.MustParseAddrPort("127.0.0.1:8040") || f.PID != 0 || f.Port != 8041 {
		t.Errorf("ParseForward = %+v, %v", f, err)
	}
	f, err = ParseForward("[::1]:9000=3:80")
	if err != nil || f.Listen != netip.MustParseAddrPort("[::1]:9000") || f.PID != 3 || f.Port != 80 {
		t.Errorf("ParseForward = %+v, %v", f, err)
	}
	for _, bad := range []string{"", "8040", "8040=0", "x=0:1", "8040=-1:80", "8040=0:0", "0=1:2"} {
		if _, err := ParseForward(bad); err == nil {
			t.Errorf("ParseForward(%q) succeeded", bad)
		}
	}
}

// TestDeclaredPorts: a party opens to its peers only what it declared:
// -mpc's own listening ports (which also wait for their listener), and
// --allow-ports; with neither, nothing.
func TestDeclaredPorts(t *testing.T) {
	mpc := writeMPC(t, mpcConfig)
	tests := []struct {
		name        string
		args        []string
		allow, wait string
	}{
		{"nothing declared", nil, "none", "none"},
		{"allow-ports", []string{"--allow-ports", "9000"}, "9000", "none"},
		{"allow-ports all", []string{"--allow-ports", "all"}, "all", "none"},
		{"allow-ports none", []string{"--allow-ports", "none"}, "none", "none"},
		{"wait-ports", []string{"--allow-ports", "9000-9010", "--wait-ports", "9005"}, "9000-9010", "9005"},
		// The lower party of a pair listens: party 0 on 8020+t for party 1
		// and 8040+t for party 2, party 1 on 8060+t for party 2.
		{"-mpc party 0", []string{"-mpc", mpc}, "8020-8023,8040-8043", "8020-8023,8040-8043"},
		{"-mpc party 1", []string{"--pid", "1", "-mpc", mpc}, "8060-8063", "8060-8063"},
		{"-mpc party 2 listens on nothing", []string{"--pid", "2", "-mpc", mpc}, "none", "none"},
		{"-mpc and allow-ports", []string{"--pid", "1", "-mpc", mpc, "--allow-ports", "9000", "--wait-ports", "9000"},
			"8060-8063,9000", "8060-8063,9000"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseSidecar(append(slices.Clone(required), tt.args...), nil)
			if err != nil {
				t.Fatal(err)
			}
			if c.AllowPorts.String() != tt.allow || c.WaitPorts.String() != tt.wait {
				t.Errorf("ParseSidecar(%q): allow %v, wait %v; want %v, %v", tt.args, c.AllowPorts, c.WaitPorts, tt.allow, tt.wait)
			}
		})
	}
	// An MPC port is for the one party it listens for.
	c, err := ParseSidecar(append(slices.Clone(required), "-mpc", mpc, "--allow-ports", "9000"), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		pid  int
		port uint16
		want bool
	}{{1, 8020, true}, {1, 8023, true}, {2, 8020, false}, {2, 8040, true}, {1, 8040, false}, {1, 9000, true}, {2, 9000, true}, {1, 8060, false}} {
		if got := c.Allows(tt.pid, tt.port); got != tt.want {
			t.Errorf("party 0 Allows(party %d, port %d) = %v; want %v", tt.pid, tt.port, got, tt.want)
		}
		if got, want := c.Waits(tt.pid, tt.port), tt.want && tt.port != 9000; got != want {
			t.Errorf("party 0 Waits(party %d, port %d) = %v; want %v", tt.pid, tt.port, got, want)
		}
	}
	_, err = ParseSidecar(append(slices.Clone(required), "--allow-ports", "9000", "--wait-ports", "9000-9001"), nil)
	if want := "--wait-ports names port 9001, which peers may not reach: add it to --allow-ports"; err == nil || err.Error() != want {
		t.Errorf("--wait-ports beyond --allow-ports = %v; want %q", err, want)
	}
}
