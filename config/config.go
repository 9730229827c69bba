// Package config reads the sidecar's and the registry's settings from
// flags, SFKIT_PROXY_* environment variables and a config file (flags beat
// env beat file), and validates them.
package config

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3"

	"sfkit-proxy/flow"
	"sfkit-proxy/relay"
)

// Prefixes of the environment variables read by the sidecar and by the
// registry server (SFKIT_PROXY_SOCKS_LISTEN, SFKIT_PROXY_REGISTRY_LISTEN).
const (
	EnvPrefix         = "SFKIT_PROXY"
	RegistryEnvPrefix = "SFKIT_PROXY_REGISTRY"
)

// PublishInterval is how often a party refreshes its registry entry, and
// DefaultEntryTTL how long an entry lives without a refresh: three missed
// refreshes. Peers treat an older entry as gone.
const (
	PublishInterval = time.Minute
	DefaultEntryTTL = 3 * time.Minute
)

// DefaultAdminListen is where the management API listens unless told.
const DefaultAdminListen = "127.0.0.1:1081"

// RelayFlags are the TURN relay settings.
type RelayFlags struct {
	// Relays are TURN URLs (turn:HOST:PORT?transport=udp|tcp, turns:HOST:PORT).
	Relays            []string
	RelayUser         string
	RelayPasswordFile string
	RelaySecretFile   string
	RelayCA           string
}

// addRelayFlags declares the relay flags on fs; the function it returns
// reads them once fs is parsed, reporting what is wrong to bad.
func addRelayFlags(fs *flag.FlagSet) func(bad func(string, ...any)) RelayFlags {
	var relays listFlag
	fs.Var(&relays, "relay", "TURN relay URL, repeatable or comma-separated: turn:HOST:PORT?transport=udp|tcp, turns:HOST:PORT")
	relayU := fs.String("relay-user", "", "TURN username (long-term credentials), or the user part of REST credentials")
	relayPF := fs.String("relay-password-file", "", "file holding the TURN password")
	relaySF := fs.String("relay-secret-file", "", "file holding coturn's shared secret (--use-auth-secret REST scheme)")
	relayCA := fs.String("relay-ca", "", "PEM file of CAs that sign turns: servers (default: the system's)")
	return func(bad func(string, ...any)) RelayFlags {
		r := RelayFlags{Relays: relays, RelayUser: *relayU, RelayPasswordFile: *relayPF, RelaySecretFile: *relaySF, RelayCA: *relayCA}
		for _, u := range r.Relays {
			if _, err := relay.ParseURL(u); err != nil {
				bad("--relay: %v", err)
			}
		}
		if len(r.Relays) > 0 && r.RelayPasswordFile == "" && r.RelaySecretFile == "" {
			bad("--relay needs credentials: --relay-user with --relay-password-file, or --relay-secret-file")
		}
		if r.RelayPasswordFile != "" && r.RelayUser == "" {
			bad("--relay-password-file needs --relay-user")
		}
		return r
	}
}

// stunFlag declares --stun on fs; the function it returns reads it once fs
// is parsed.
func stunFlag(fs *flag.FlagSet) func(bad func(string, ...any)) []string {
	list := fs.String("stun", DefaultSTUN, "STUN servers host:port or stun:host:port, comma-separated, tried in turn")
	return func(bad func(string, ...any)) []string {
		var out []string
		for _, s := range strings.Split(*list, ",") {
			if s = strings.TrimPrefix(strings.TrimSpace(s), "stun:"); s == "" {
				continue
			}
			if _, _, err := splitHostPort(s); err != nil {
				bad("--stun %q: want host:port entries", s)
				continue
			}
			out = append(out, s)
		}
		if len(out) == 0 {
			bad("--stun is empty: give at least one STUN server host:port")
		}
		return out
	}
}

// DefaultSTUN are public STUN servers tried in turn when --stun is not given.
const DefaultSTUN = "stun.l.google.com:19302,stun.cloudflare.com:3478,stun1.l.google.com:19302"

// Sidecar is the configuration of the proxy sidecar.
type Sidecar struct {
	Study string
	PID   int
	// Registry is where parties find each other: our registry (http,
	// https) or the sfkit website's WebSocket relay (ws, wss).
	Registry    *url.URL
	AuthKeyFile string
	AuthKey     string
	SOCKSListen netip.AddrPort
	// SOCKSAnyHost allows binding the SOCKS listener to a non-loopback address.
	SOCKSAnyHost bool
	UDPListen    netip.AddrPort
	STUN         []string
	PeersCIDR    netip.Prefix
	// AllowPorts are the local ports some peer may reach: -mpc's
	// listening ports (each for its one peer, see Allows) and
	// --allow-ports (for every peer); empty opens none.
	AllowPorts PortSet
	// WaitPorts are the allowed ports whose connections wait for a local
	// listener (up to TunnelWait): -mpc's listening ports and --wait-ports.
	WaitPorts PortSet
	// extraAllow and extraWait are --allow-ports and --wait-ports alone.
	extraAllow, extraWait PortSet
	Direct                bool
	StateDir              string
	LogLevel              slog.Level
	// AdminListen is the management API's address; invalid (zero) when off.
	AdminListen netip.AddrPort
	RelayFlags
	// AdminDebug serves /debug/pprof on the management API.
	AdminDebug bool
	// MPC is the MPC program's config (-mpc), nil without one.
	MPC *MPC
	// Parties are the study's party ids, for the website relay: --parties,
	// else those of the MPC config.
	Parties []int
	// TunnelWait (--dial-timeout) bounds how long a CONNECT to a peer waits
	// for its tunnel, and how long a peer's connection to a waiting port
	// (WaitPorts) waits for its local listener.
	TunnelWait time.Duration
	// ResumeTimeout bounds how long a tunnelled connection waits for its
	// path to come back.
	ResumeTimeout time.Duration
	// ConnsPerPeer bounds the QUIC connections to one peer: parallel
	// tunnelled connections get one each, so each its own congestion
	// control, as parallel TCP connections would.
	ConnsPerPeer int
	// MaxPacketSize, when not zero, fixes QUIC's packets at this many
	// bytes of UDP payload instead of discovering the path's MTU: for
	// networks known to carry less than they say.
	MaxPacketSize int
	// NoPeerRelay turns peer relays off (--peer-relay off): this party
	// neither relays for the study's others nor is reached through them.
	NoPeerRelay bool
	// PeerRelayRate bounds the bytes per second this party relays for
	// others, all together.
	PeerRelayRate int
	// Forwards are local listeners carried to peers (--forward, and with
	// --mpc-forward the peers' listening ports of the MPC config).
	Forwards []Forward
	// ForwardAnyHost allows a forward to listen on a non-loopback address.
	ForwardAnyHost bool
	// GatewayAnyHost allows gateways added at runtime (the management
	// API, sfkit-proxy gateway) to listen on a non-loopback address.
	GatewayAnyHost bool
	// MPCForward asks for forwards of the MPC config's peer ports.
	MPCForward bool
}

// Allows reports whether peer pid may reach local port: one of
// --allow-ports, or a port this party's MPC program listens on for pid.
func (c *Sidecar) Allows(pid int, port uint16) bool {
	return c.extraAllow.Contains(port) || c.mpcPortFor(pid, port)
}

// Waits reports whether peer pid's connection to local port waits for a
// local listener: one of --wait-ports, or pid's -mpc port.
func (c *Sidecar) Waits(pid int, port uint16) bool {
	return c.extraWait.Contains(port) || c.mpcPortFor(pid, port)
}

func (c *Sidecar) mpcPortFor(pid int, port uint16) bool {
	if c.MPC == nil {
		return false
	}
	owner, ok := c.MPC.ListenerFor(port)
	return ok && owner == pid
}

// Website reports whether Registry is the sfkit website's WebSocket relay.
func (c *Sidecar) Website() bool { return c.Registry.Scheme == "ws" || c.Registry.Scheme == "wss" }

// The pool of QUIC connections to each peer: parallel tunnelled connections
// get one each, up to DefaultConnsPerPeer unless configured (SF-GWAS opens 4
// to 12 connections per pair of parties; see docs/BENCHMARKS.md for the
// choice), never more than MaxConnsPerPeer (an acceptor refuses more).
const (
	DefaultConnsPerPeer = 8
	MaxConnsPerPeer     = 32
)

// DefaultPeerRelayRate is what a party relays for others by default, in
// bytes per second (128 MiB/s, about a gigabit link): enough not to slow
// the study's own traffic that it carries, on most links.
const DefaultPeerRelayRate = 128 << 20

// DefaultTunnelWait is how long a CONNECT to a peer waits for its tunnel
// (--dial-timeout): long enough for every party of a study to start, and
// for the website relay's barrier.
const DefaultTunnelWait = 5 * time.Minute

// VirtualAddr returns party pid's address in the peers range.
func (c *Sidecar) VirtualAddr(pid int) netip.Addr {
	return VirtualAddr(c.PeersCIDR, pid)
}

// VirtualAddr returns the address base+pid of prefix p.
func VirtualAddr(p netip.Prefix, pid int) netip.Addr {
	b := p.Masked().Addr().As16()
	carry := pid
	for i := 15; i >= 0 && carry > 0; i-- {
		sum := int(b[i]) + carry
		b[i] = byte(sum)
		carry = sum >> 8
	}
	a := netip.AddrFrom16(b)
	if p.Addr().Is4() {
		a = a.Unmap()
	}
	return a
}

// PIDOf returns the party id whose virtual address is a, if a is in p.
func PIDOf(p netip.Prefix, a netip.Addr) (int, bool) {
	a = a.Unmap()
	if !p.Contains(a) {
		return 0, false
	}
	base := p.Masked().Addr().As16()
	x := a.As16()
	n := 0
	for i := 0; i < 16; i++ {
		if n > 1<<22 {
			return 0, false
		}
		n = n<<8 | (int(x[i]) - int(base[i]))
	}
	return n, n >= 0
}

// ErrHelp is returned when -h was asked for; the usage has been printed.
var ErrHelp = flag.ErrHelp

// ParseSidecar parses the sidecar's arguments (without the program name).
// Usage goes to out on -h.
func ParseSidecar(args []string, out io.Writer) (*Sidecar, error) {
	fs := flag.NewFlagSet("sfkit-proxy", flag.ContinueOnError)
	var (
		study    = fs.String("study", "", "study ID (required)")
		pid      = fs.Int("pid", -1, "this party's id, 0 or more (required)")
		registry = fs.String("registry", "", "where parties find each other: a registry URL (https://…) or the sfkit website's relay (wss://HOST/api/ice) (required)")
		api      = fs.String("api", "", "sfkit's spelling of --registry")
		mpcPath  = fs.String("mpc", "", "the MPC program's configGlobal.toml: connections to a peer's listening ports (127.0.0.1:port+t) go to that peer")
		socksURI = fs.String("socks", "", "sfkit's spelling of --socks-listen, as a URI: socks5://localhost:7080")
		parties  = fs.String("parties", "", "the study's party ids for the website relay, e.g. 0,1,2 (default: those of -mpc)")
		dialTO   = fs.Duration("dial-timeout", DefaultTunnelWait, "how long a connection to a peer waits for its tunnel, and a peer's connection to a waiting port (-mpc's, --wait-ports) for its local listener")
		resumeTO = fs.Duration("resume-timeout", flow.DefaultResumeTimeout, "how long a tunnelled connection waits for its path to come back before it is reset")
		maxPkt   = fs.Int("max-packet-size", 0, "fix QUIC packets at this many bytes of UDP payload (1200 to 1452; MTU minus 28 on IPv4, minus 48 on IPv6) instead of discovering what the path carries: for VPNs, tunnels and paths that drop large UDP packets; 0 discovers")
		pRelay   = fs.String("peer-relay", "on", "on: parties of the study with no direct path between them reach each other through a party that reaches both (it sees only ciphertext), and this party relays for them; off: neither")
		pRelayBW = fs.Int("peer-relay-max-bps", DefaultPeerRelayRate, "bytes per second this party relays for the others, all of them together (shared equally among them)")
		connsPer = fs.Int("conns-per-peer", DefaultConnsPerPeer, fmt.Sprintf("at most this many QUIC connections to each peer (1 to %d): parallel tunnelled connections get their own, so their own congestion control", MaxConnsPerPeer))
		mpcFwd   = fs.Bool("mpc-forward", false, "with -mpc, also listen on the peers' listening ports (127.0.0.1:port+t), for programs that ignore ALL_PROXY")
		verbose  countFlag
		forwards listFlag
		keyFile  = fs.String("auth-key-file", "", "file holding the registry bearer token (or the website relay's auth key)")
		key      = fs.String("auth-key", "", "registry bearer token, or the website relay's auth key (prefer the env var or a file: flags show in ps)")
		socks    = fs.String("socks-listen", "127.0.0.1:1080", "SOCKS5 listen address")
		anyHost  = fs.Bool("socks-any-host", false, "allow a non-loopback --socks-listen (anyone who reaches it can use your tunnels)")
		fwdAny   = fs.Bool("forward-any-host", false, "allow a non-loopback --forward listen address (anyone who reaches it can use that tunnel)")
		gwAny    = fs.Bool("gateway-any-host", false, "allow gateways added at runtime (sfkit-proxy gateway add) on non-loopback addresses: public gateways, with limits (anyone who reaches one can use that tunnel)")
		udp      = fs.String("udp-listen", "0.0.0.0:0", "UDP address of the one socket used for STUN and QUIC")
		stunList = stunFlag(fs)
		cidr     = fs.String("peers-cidr", DefaultPeersCIDR, "virtual range: party N is the range's base + N")
		allow    = fs.String("allow-ports", "", "more local ports peers may reach, besides -mpc's listening ports: e.g. 8000-8100,9443, or all (default: none but -mpc's)")
		waitPort = fs.String("wait-ports", "", "allowed ports whose connections from peers wait, up to --dial-timeout, for a local program to listen (-mpc's listening ports always do): e.g. 9000-9010, or all")
		direct   = fs.String("direct", "allow", "destinations outside --peers-cidr: allow (dial directly) or deny")
		stateDir = fs.String("state-dir", "", "directory of the persistent identity key (default $XDG_STATE_HOME/sfkit-proxy/STUDY-PID)")
		logLevel = fs.String("log-level", "info", "debug, info, warn or error")
		admin    = fs.String("admin-listen", DefaultAdminListen, "management API (status, metrics) address, or off")
		relayFl  = addRelayFlags(fs)
		adminAny = fs.Bool("admin-any-host", false, "allow a non-loopback --admin-listen")
		adminDbg = fs.Bool("admin-debug", false, "serve Go profiles (/debug/pprof) on the management API")
		_        = fs.String("config", "", "config file of 'flag value' lines")
	)
	fs.Var(&verbose, "v", "more logs: -v debug, -v -v trace (sfkit's spelling of --log-level)")
	fs.Var(&forwards, "forward", "LOCAL=PID:PORT, repeatable: listen on LOCAL ([IP:]PORT, 127.0.0.1 by default) and carry each connection to party PID's port")
	fs.Usage = Usage(fs, out, EnvPrefix, "sfkit-proxy [flags]\n\nRuns the sidecar: a SOCKS5 proxy that reaches party N's 127.0.0.1:PORT at 10.0.0.N:PORT.\nSubcommands: registry, status, ping, gateway, probe, netcheck, demo, version.\nFlags take one dash or two: sfkit's command line (-v -api URL -study ID -pid N -mpc FILE -socks URI -auth-key KEY) works as it is.")
	if err := parse(fs, args, EnvPrefix); err != nil {
		return nil, err
	}
	c := &Sidecar{Study: *study, PID: *pid, AuthKeyFile: *keyFile, AuthKey: *key, SOCKSAnyHost: *anyHost, AdminDebug: *adminDbg}
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if c.Study == "" {
		bad("--study is required: the study ID the registry knows")
	} else if !validStudy(c.Study) {
		bad("--study %q: use letters, digits, '-', '_' or '.' (at most 128)", c.Study)
	}
	if *pid < 0 {
		bad("--pid is required: this party's id (0, 1, 2, …)")
	}
	if *api != "" {
		*registry = *api
	}
	if *registry == "" {
		bad("--registry (or -api) is required: the registry URL, e.g. https://sfkit.example.org/, or the website relay, wss://HOST/api/ice")
	} else if u, err := url.Parse(*registry); err != nil || !slices.Contains([]string{"http", "https", "ws", "wss"}, u.Scheme) || u.Host == "" {
		bad("--registry %q: want an http(s):// registry URL or a ws(s):// website relay URL", *registry)
	} else {
		c.Registry = u
	}
	var err error
	if *socksURI != "" {
		*socks, err = socksFromURI(*socksURI)
		if err != nil {
			bad("-socks %q: %v", *socksURI, err)
		}
	}
	if c.SOCKSListen, err = netip.ParseAddrPort(*socks); err != nil {
		if *socksURI == "" {
			bad("--socks-listen %q: want IP:PORT, e.g. 127.0.0.1:1080", *socks)
		}
	} else if !c.SOCKSListen.Addr().IsLoopback() && !c.SOCKSAnyHost {
		bad("--socks-listen %v is not a loopback address: add --socks-any-host if you really mean to expose the proxy", c.SOCKSListen)
	}
	if c.UDPListen, err = netip.ParseAddrPort(*udp); err != nil {
		bad("--udp-listen %q: want IP:PORT, e.g. 0.0.0.0:0", *udp)
	}
	c.STUN = stunList(bad)
	if c.PeersCIDR, err = netip.ParsePrefix(*cidr); err != nil {
		bad("--peers-cidr %q: want a CIDR such as 10.0.0.0/24", *cidr)
	} else {
		c.PeersCIDR = c.PeersCIDR.Masked()
		if *pid >= 0 && !c.PeersCIDR.Contains(c.VirtualAddr(*pid)) {
			bad("--pid %d does not fit in --peers-cidr %v: use a larger range", *pid, c.PeersCIDR)
		}
	}
	if *allow != "" {
		if c.AllowPorts, err = ParsePorts(*allow); err != nil {
			bad("--allow-ports: %v", err)
		}
	}
	if *waitPort != "" {
		if c.WaitPorts, err = ParsePorts(*waitPort); err != nil {
			bad("--wait-ports: %v", err)
		}
	}
	switch *direct {
	case "allow":
		c.Direct = true
	case "deny":
	default:
		bad("--direct %q: want allow or deny", *direct)
	}
	if c.LogLevel, err = ParseLevel(*logLevel); err != nil {
		bad("--log-level: %v", err)
	}
	switch {
	case verbose == 1:
		c.LogLevel = slog.LevelDebug
	case verbose > 1:
		c.LogLevel = LevelTrace
	}
	if *mpcPath != "" && *pid >= 0 {
		if c.MPC, err = LoadMPC(*mpcPath, *pid); err != nil {
			bad("%v", err)
		}
	}
	if *parties != "" {
		for _, s := range strings.Split(*parties, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(s))
			if err != nil || n < 0 {
				bad("--parties %q: want party ids such as 0,1,2", *parties)
				break
			}
			c.Parties = append(c.Parties, n)
		}
	} else if c.MPC != nil {
		c.Parties = c.MPC.Parties
	}
	c.extraAllow, c.extraWait = c.AllowPorts, c.WaitPorts
	if c.MPC != nil {
		// The MPC program's own listening ports are what a party declares
		// by starting with -mpc: open to the peer each is for, and waited
		// for.
		own := c.MPC.ListenPorts()
		c.AllowPorts, c.WaitPorts = c.AllowPorts.Union(own), c.WaitPorts.Union(own)
	}
	if p, ok := c.WaitPorts.Outside(c.AllowPorts); ok {
		bad("--wait-ports names port %d, which peers may not reach: add it to --allow-ports", p)
	}
	if c.Registry != nil && c.Website() && len(c.Parties) == 0 {
		bad("the website relay needs the study's parties: give -mpc configGlobal.toml or --parties 0,1,2")
	}
	if c.ResumeTimeout = *resumeTO; c.ResumeTimeout <= 0 {
		bad("--resume-timeout %v: want a positive duration such as 10m", c.ResumeTimeout)
	}
	if c.MaxPacketSize = *maxPkt; c.MaxPacketSize != 0 && (c.MaxPacketSize < 1200 || c.MaxPacketSize > 1452) {
		bad("--max-packet-size %d: want 1200 to 1452 bytes (QUIC's minimum to what a 1500-byte MTU carries), or 0 to discover", c.MaxPacketSize)
	}
	switch *pRelay {
	case "on":
	case "off":
		c.NoPeerRelay = true
	default:
		bad("--peer-relay %q: want on or off", *pRelay)
	}
	if c.PeerRelayRate = *pRelayBW; c.PeerRelayRate < 64<<10 {
		bad("--peer-relay-max-bps %d: want at least 65536 (64 KiB/s); turn relaying off with --peer-relay off", c.PeerRelayRate)
	}
	if c.ConnsPerPeer = *connsPer; c.ConnsPerPeer < 1 || c.ConnsPerPeer > MaxConnsPerPeer {
		bad("--conns-per-peer %d: want 1 to %d (1 carries every tunnelled connection to a peer on one QUIC connection)", c.ConnsPerPeer, MaxConnsPerPeer)
	}
	if c.TunnelWait = *dialTO; c.TunnelWait <= 0 {
		bad("--dial-timeout %v: want a positive duration such as 5m", c.TunnelWait)
	}
	c.MPCForward = *mpcFwd
	if c.MPCForward && c.MPC == nil {
		bad("--mpc-forward needs -mpc")
	}
	c.ForwardAnyHost = *fwdAny
	c.GatewayAnyHost = *gwAny
	for _, f := range forwards {
		fw, err := ParseForward(f)
		if err != nil {
			bad("%v", err)
			continue
		}
		if !fw.Listen.Addr().IsLoopback() && !c.ForwardAnyHost {
			bad("--forward %s: %v is not a loopback address: add --forward-any-host if you really mean to expose it", f, fw.Listen.Addr())
			continue
		}
		c.Forwards = append(c.Forwards, fw)
	}
	if *admin != "off" && *admin != "" {
		if c.AdminListen, err = netip.ParseAddrPort(*admin); err != nil {
			bad("--admin-listen %q: want IP:PORT, e.g. %s, or off", *admin, DefaultAdminListen)
		} else if !c.AdminListen.Addr().IsLoopback() && !*adminAny {
			bad("--admin-listen %v is not a loopback address: add --admin-any-host if you really mean to expose the API", c.AdminListen)
		}
	}
	c.RelayFlags = relayFl(bad)
	c.StateDir = *stateDir
	if c.StateDir == "" && c.Study != "" && *pid >= 0 {
		c.StateDir = defaultStateDir(c.Study, *pid)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return c, nil
}

// LevelTrace is below Debug: per-packet detail (-v -v).
const LevelTrace = slog.LevelDebug - 4

// socksFromURI turns sfkit's socks5://HOST:PORT into IP:PORT.
func socksFromURI(s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "socks5" && u.Scheme != "socks5h") || u.Port() == "" {
		return "", errors.New("want socks5://HOST:PORT, e.g. socks5://localhost:7080")
	}
	host := u.Hostname()
	if host == "localhost" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, u.Port()), nil
}

// countFlag counts how often a boolean flag is given (-v -v); from the
// environment it takes a number.
type countFlag int

func (c *countFlag) String() string   { return strconv.Itoa(int(*c)) }
func (c *countFlag) IsBoolFlag() bool { return true }

func (c *countFlag) Set(v string) error {
	switch b, err := strconv.ParseBool(v); {
	case err == nil && b:
		*c++
	case err == nil:
	default:
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return errors.New("want a count")
		}
		*c = countFlag(n)
	}
	return nil
}

// Registry is the configuration of the reference registry server.
type Registry struct {
	Listen   string
	Tokens   string
	Data     string
	TLSCert  string
	TLSKey   string
	LogLevel slog.Level
	// Cloud identity tokens, accepted when OIDCIssuer is set.
	OIDCIssuer   string
	OIDCAudience string
	OIDCJWKS     string
	Members      string
	// EntryTTL is how long an entry lives without a refresh from its party.
	EntryTTL time.Duration
}

// ParseRegistry parses the arguments of `sfkit-proxy registry`.
func ParseRegistry(args []string, out io.Writer) (*Registry, error) {
	fs := flag.NewFlagSet("sfkit-proxy registry", flag.ContinueOnError)
	var (
		listen   = fs.String("listen", "127.0.0.1:8080", "HTTP(S) listen address")
		tokens   = fs.String("tokens", "", "tokens file: lines 'TOKEN STUDY PID', # comments (required unless --oidc-issuer is given)")
		data     = fs.String("data", "", "directory where the registry keeps its state (required)")
		cert     = fs.String("tls-cert", "", "TLS certificate file (serve HTTPS)")
		key      = fs.String("tls-key", "", "TLS key file")
		logLevel = fs.String("log-level", "info", "debug, info, warn or error")
		issuer   = fs.String("oidc-issuer", "", "accept cloud identity tokens from this issuer, e.g. https://accounts.google.com")
		audience = fs.String("oidc-audience", "", "the audience those tokens must carry: the registry URL parties use")
		jwks     = fs.String("oidc-jwks", "", "the issuer's signing keys: a JWKS file or URL")
		members  = fs.String("members", "", "members file: lines 'IDENTITY STUDY PID' (IDENTITY: the token's email, else sub)")
		ttl      = fs.Duration("entry-ttl", DefaultEntryTTL, "drop a party's entry when it has not refreshed it for this long (parties refresh every minute)")
		_        = fs.String("config", "", "config file of 'flag value' lines")
	)
	fs.Usage = Usage(fs, out, RegistryEnvPrefix, "sfkit-proxy registry [flags]\n\nRuns the reference registry that parties publish their addresses and keys to.")
	if err := parse(fs, args, RegistryEnvPrefix); err != nil {
		return nil, err
	}
	c := &Registry{Listen: *listen, Tokens: *tokens, Data: *data, TLSCert: *cert, TLSKey: *key,
		OIDCIssuer: *issuer, OIDCAudience: *audience, OIDCJWKS: *jwks, Members: *members, EntryTTL: *ttl}
	var errs []error
	if c.Tokens == "" && c.OIDCIssuer == "" {
		errs = append(errs, errors.New("--tokens is required (or --oidc-issuer with its flags): a file of 'TOKEN STUDY PID' lines"))
	}
	if n := countSet(c.OIDCIssuer, c.OIDCAudience, c.OIDCJWKS, c.Members); n != 0 && n != 4 {
		errs = append(errs, errors.New("--oidc-issuer, --oidc-audience, --oidc-jwks and --members go together"))
	}
	if c.Data == "" {
		errs = append(errs, errors.New("--data is required: a directory for the registry's state"))
	}
	if c.EntryTTL < 2*PublishInterval {
		errs = append(errs, fmt.Errorf("--entry-ttl %v is too short: parties refresh every %v, so use at least %v", c.EntryTTL, PublishInterval, 2*PublishInterval))
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		errs = append(errs, errors.New("--tls-cert and --tls-key go together"))
	}
	if _, _, err := splitHostPort(c.Listen); err != nil {
		errs = append(errs, fmt.Errorf("--listen %q: want host:port", c.Listen))
	}
	var err error
	if c.LogLevel, err = ParseLevel(*logLevel); err != nil {
		errs = append(errs, fmt.Errorf("--log-level: %v", err))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return c, nil
}

func parse(fs *flag.FlagSet, args []string, prefix string, opts ...ff.Option) error {
	return ParseFlags(fs, args, append([]ff.Option{
		ff.WithEnvVarPrefix(prefix),
		ff.WithConfigFileFlag("config"),
		ff.WithConfigFileParser(ff.PlainParser),
	}, opts...)...)
}

// ParseFlags parses with ff. The usage is printed for -h only; any other
// error is one line that points to -h. It returns ErrHelp after -h.
func ParseFlags(fs *flag.FlagSet, args []string, opts ...ff.Option) error {
	fs.SetOutput(io.Discard)
	usage := fs.Usage
	fs.Usage = func() {} // flag calls it on every error
	err := ff.Parse(fs, args, opts...)
	fs.Usage = usage
	if errors.Is(err, flag.ErrHelp) {
		usage()
		return ErrHelp
	}
	if err != nil {
		return fmt.Errorf("%v (%s -h lists the flags)", err, fs.Name())
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q: every setting is a --flag", fs.Arg(0))
	}
	return nil
}

// EnvName is the environment variable that sets the sidecar's flag name.
func EnvName(name string) string { return envName(EnvPrefix, name) }

func envName(prefix, name string) string {
	return prefix + "_" + strings.ToUpper(strings.NewReplacer("-", "_", ".", "_").Replace(name))
}

// Usage returns a usage function listing every flag with its default and,
// when prefix is not empty, its environment variable.
func Usage(fs *flag.FlagSet, out io.Writer, prefix, head string) func() {
	return func() {
		fmt.Fprintf(out, "Usage: %s\n\nFlags", head)
		if prefix != "" {
			fmt.Fprint(out, " (each also read from the environment variable shown)")
		}
		fmt.Fprintln(out, ":")
		fs.VisitAll(func(f *flag.Flag) {
			def, env := "", ""
			if f.DefValue != "" && f.DefValue != "-1" {
				def = fmt.Sprintf(" (default %q)", f.DefValue)
			}
			if prefix != "" {
				env = " [$" + envName(prefix, f.Name) + "]"
			}
			fmt.Fprintf(out, "  --%s\n        %s%s%s\n", f.Name, f.Usage, def, env)
		})
	}
}

// ParseLevel parses a log level name.
func ParseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("%q: want debug, info, warn or error", s)
	}
	return l, nil
}

func countSet(ss ...string) int {
	n := 0
	for _, s := range ss {
		if s != "" {
			n++
		}
	}
	return n
}

func validStudy(s string) bool {
	if len(s) > 128 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return false
		}
	}
	return true
}

// ValidStudy reports whether s is an acceptable study ID.
func ValidStudy(s string) bool { return s != "" && validStudy(s) }

func splitHostPort(s string) (string, uint16, error) {
	i := strings.LastIndexByte(s, ':')
	if i <= 0 {
		return "", 0, errors.New("missing port")
	}
	p, err := strconv.ParseUint(s[i+1:], 10, 16)
	if err != nil {
		return "", 0, err
	}
	return s[:i], uint16(p), nil
}

func defaultStateDir(study string, pid int) string {
	base := os.Getenv("XDG_STATE_HOME")
	if base == "" {
		if home, err := os.UserHomeDir(); err == nil {
			base = filepath.Join(home, ".local", "state")
		} else {
			base = os.TempDir()
		}
	}
	return filepath.Join(base, "sfkit-proxy", fmt.Sprintf("%s-%d", study, pid))
}

// listFlag collects a repeatable, comma-separated flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

// AdminClient is the configuration of `sfkit-proxy status` and
// `sfkit-proxy ping`: they find the API from the sidecar's own
// --admin-listen, SFKIT_PROXY_ADMIN_LISTEN or --config file.
type AdminClient struct {
	Addr  string
	JSON  bool
	Count int
	PID   int
}

// ParseAdminClient parses the arguments of cmd ("status" or "ping"). ping
// Netcheck is how `sfkit-proxy netcheck` runs.
type Netcheck struct {
	STUN      []string
	UDPListen netip.AddrPort
	RelayFlags
	JSON bool
	// Admin is the running sidecar's management API, asked for its peers
	// (what each published of its NAT, and its path now); "" asks none.
	Admin string
}

// ParseNetcheck reads netcheck's flags: the sidecar's STUN, UDP and relay
// flags (from its environment variables and config file too, so that it
// checks what the sidecar would use), and --json.
func ParseNetcheck(args []string, out io.Writer) (*Netcheck, error) {
	fs := flag.NewFlagSet("sfkit-proxy netcheck", flag.ContinueOnError)
	stunList := stunFlag(fs)
	udp := fs.String("udp-listen", "0.0.0.0:0", "UDP address to check from")
	relayFl := addRelayFlags(fs)
	jsonOut := fs.Bool("json", false, "print JSON")
	admin := fs.String("admin-listen", DefaultAdminListen, "the running sidecar's management API, asked for its peers (off: none)")
	_ = fs.String("config", "", "the sidecar's config file")
	fs.Usage = Usage(fs, out, EnvPrefix, "sfkit-proxy netcheck [flags]\n\nTells what this network lets the sidecar do: the NAT's mapping behaviour (from two STUN servers),\nwhether UDP gets out, whether the TURN relays answer, and what paths to expect to peers: by their\nkind, and, when the sidecar runs, to each of its peers, with the path it has now.")
	if err := ParseFlags(fs, args, ff.WithEnvVarPrefix(EnvPrefix), ff.WithConfigFileFlag("config"),
		ff.WithConfigFileParser(ff.PlainParser), ff.WithIgnoreUndefined(true)); err != nil {
		return nil, err
	}
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	c := &Netcheck{STUN: stunList(bad), RelayFlags: relayFl(bad), JSON: *jsonOut}
	if *admin != "off" {
		c.Admin = *admin
	}
	var err error
	if c.UDPListen, err = netip.ParseAddrPort(*udp); err != nil {
		bad("--udp-listen %q: want IP:PORT, e.g. 0.0.0.0:0", *udp)
	}
	if fs.NArg() > 0 {
		bad("unexpected argument %q", fs.Arg(0))
	}
	return c, errors.Join(errs...)
}

// takes the party id as its one argument.
func ParseAdminClient(cmd string, args []string, out io.Writer) (*AdminClient, error) {
	fs := flag.NewFlagSet("sfkit-proxy "+cmd, flag.ContinueOnError)
	addr := fs.String("admin-listen", DefaultAdminListen, "the sidecar's management API address")
	jsonOut := fs.Bool("json", false, "print JSON")
	count := fs.Int("count", 3, "pings to send (ping)")
	_ = fs.String("config", "", "the sidecar's config file")
	head := "sfkit-proxy status [flags]\n\nPrints the sidecar's state and each peer's."
	if cmd == "ping" {
		head = "sfkit-proxy ping [flags] PID\n\nMeasures the round trip through the tunnel to party PID and names the path."
	}
	fs.Usage = Usage(fs, out, EnvPrefix, head)
	// Take the party id out first: flag stops at the first non-flag.
	var rest []string
	var pidArg string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if cmd == "ping" && pidArg == "" && !strings.HasPrefix(a, "-") && (i == 0 || !takesValue(args[i-1])) {
			pidArg = a
			continue
		}
		rest = append(rest, a)
	}
	if err := ParseFlags(fs, rest, ff.WithEnvVarPrefix(EnvPrefix), ff.WithConfigFileFlag("config"),
		ff.WithConfigFileParser(ff.PlainParser), ff.WithIgnoreUndefined(true)); err != nil {
		return nil, err
	}
	c := &AdminClient{Addr: *addr, JSON: *jsonOut, Count: *count, PID: -1}
	if cmd == "ping" {
		pid, err := strconv.Atoi(pidArg)
		if err != nil || pid < 0 {
			return nil, fmt.Errorf("ping needs a party id: sfkit-proxy ping PID")
		}
		c.PID = pid
		if c.Count < 1 || c.Count > 100 {
			return nil, fmt.Errorf("--count %d: want 1 to 100", c.Count)
		}
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return c, nil
}

// GatewayClient is how `sfkit-proxy gateway add|list|rm` runs.
type GatewayClient struct {
	Addr   string // the sidecar's management API
	JSON   bool
	Action string // add, list or rm
	Proto  string // tcp or udp
	Listen string // [IP:]PORT, as given
	PID    int
	Port   uint16
	Label  string
	// Limits of a public gateway (add); zero leaves the defaults.
	AllowFrom   []string
	ConnRate    float64
	MaxConns    int
	IdleTimeout time.Duration
	Drain       bool // rm: let open connections finish
}

// ParseGatewayClient parses the arguments of `sfkit-proxy gateway`.
func ParseGatewayClient(args []string, out io.Writer) (*GatewayClient, error) {
	fs := flag.NewFlagSet("sfkit-proxy gateway", flag.ContinueOnError)
	var (
		addr    = fs.String("admin-listen", DefaultAdminListen, "the sidecar's management API address")
		jsonOut = fs.Bool("json", false, "print JSON")
		label   = fs.String("label", "", "add: a name for people (at most 64 characters)")
		allow   = fs.String("allow-from", "", "add: the source CIDRs a public gateway accepts, comma-separated (default: any)")
		rateF   = fs.Float64("conn-rate", 0, "add: new connections (udp: client addresses) per second from one source (default: 10 for a public gateway, else no limit)")
		maxC    = fs.Int("max-conns", 0, "add: connections (udp: client addresses) open at once (default: 256 public, 1024 loopback)")
		idle    = fs.Duration("idle-timeout", 0, "add: cut a connection idle this long (default: 30m for a public gateway, else never; udp: 2m)")
		drain   = fs.Bool("drain", true, "rm: let open connections finish (--drain=false resets them)")
	)
	_ = fs.String("config", "", "the sidecar's config file")
	fs.Usage = Usage(fs, out, EnvPrefix, "sfkit-proxy gateway add|list|rm [flags] [tcp|udp [IP:]PORT [PID PORT]]\n\n"+
		"Adds (add tcp|udp [IP:]PORT PID PORT), lists (list) and removes (rm tcp|udp [IP:]PORT) the running sidecar's\n"+
		"gateways: local sockets whose connections (tcp) or datagrams (udp) go to party PID's 127.0.0.1:PORT. IP is\n"+
		"127.0.0.1 when left out; one off loopback (public) needs the sidecar started with --gateway-any-host.")
	pos, rest := splitArgs(args, "json", "drain")
	if err := ParseFlags(fs, rest, ff.WithEnvVarPrefix(EnvPrefix), ff.WithConfigFileFlag("config"),
		ff.WithConfigFileParser(ff.PlainParser), ff.WithIgnoreUndefined(true)); err != nil {
		return nil, err
	}
	c := &GatewayClient{Addr: *addr, JSON: *jsonOut, Label: *label, ConnRate: *rateF, MaxConns: *maxC, IdleTimeout: *idle, Drain: *drain}
	if *allow != "" {
		c.AllowFrom = strings.Split(*allow, ",")
	}
	if len(pos) == 0 {
		return nil, fmt.Errorf("gateway needs an action: add, list or rm (sfkit-proxy gateway -h)")
	}
	c.Action, pos = pos[0], pos[1:]
	want := map[string]int{"add": 4, "list": 0, "rm": 2}
	n, ok := want[c.Action]
	if !ok {
		return nil, fmt.Errorf("gateway %s: want add, list or rm", c.Action)
	}
	if len(pos) != n {
		return nil, fmt.Errorf("gateway %s takes %d arguments, got %d: sfkit-proxy gateway -h", c.Action, n, len(pos))
	}
	if n >= 2 {
		c.Proto, c.Listen = pos[0], pos[1]
	}
	if n == 4 {
		pid, err := strconv.Atoi(pos[2])
		if err != nil || pid < 0 {
			return nil, fmt.Errorf("gateway add: party %q: want a party id, 0 or more", pos[2])
		}
		port, err := strconv.ParseUint(pos[3], 10, 16)
		if err != nil || port == 0 {
			return nil, fmt.Errorf("gateway add: port %q: want 1 to 65535", pos[3])
		}
		c.PID, c.Port = pid, uint16(port)
	}
	return c, nil
}

// ProbeClient is how `sfkit-proxy probe open|list|rm|check` runs.
type ProbeClient struct {
	Addr      string // the sidecar's management API
	JSON      bool
	Action    string // open, list, rm or check
	Proto     string
	Listen    string // [IP:]PORT (open, rm), or IP:PORT to reach (check)
	Requester string
	Token     string
	TTL       time.Duration
	Timeout   time.Duration
}

// ParseProbeClient parses the arguments of `sfkit-proxy probe`.
func ParseProbeClient(args []string, out io.Writer) (*ProbeClient, error) {
	fs := flag.NewFlagSet("sfkit-proxy probe", flag.ContinueOnError)
	var (
		addr    = fs.String("admin-listen", DefaultAdminListen, "the sidecar's management API address")
		jsonOut = fs.Bool("json", false, "print JSON")
		req     = fs.String("requester", "", "open: the IP or CIDR that may read the token (required)")
		token   = fs.String("token", "", "open: the token to answer with (required; the requester chose it)")
		ttl     = fs.Duration("ttl", 0, "open: close the probe after this long (default 1m, at most 10m)")
		timeout = fs.Duration("timeout", 5*time.Second, "check: how long to wait for the answer")
	)
	_ = fs.String("config", "", "the sidecar's config file")
	fs.Usage = Usage(fs, out, EnvPrefix, "sfkit-proxy probe open|list|rm|check [flags] [tcp|udp ADDR [TOKEN]]\n\n"+
		"Proves that an address is reachable from outside. open tcp|udp [IP:]PORT --requester CIDR --token T opens a\n"+
		"temporary listener on the running sidecar that answers the requester with the token, and nobody else with\n"+
		"anything (off loopback it needs --gateway-any-host); list and rm tcp|udp [IP:]PORT manage them; the requester\n"+
		"runs check tcp|udp IP:PORT TOKEN, which prints reachable, or why not.")
	pos, rest := splitArgs(args, "json")
	if err := ParseFlags(fs, rest, ff.WithEnvVarPrefix(EnvPrefix), ff.WithConfigFileFlag("config"),
		ff.WithConfigFileParser(ff.PlainParser), ff.WithIgnoreUndefined(true)); err != nil {
		return nil, err
	}
	c := &ProbeClient{Addr: *addr, JSON: *jsonOut, Requester: *req, Token: *token, TTL: *ttl, Timeout: *timeout}
	if len(pos) == 0 {
		return nil, fmt.Errorf("probe needs an action: open, list, rm or check (sfkit-proxy probe -h)")
	}
	c.Action, pos = pos[0], pos[1:]
	want := map[string]int{"open": 2, "list": 0, "rm": 2, "check": 3}
	n, ok := want[c.Action]
	if !ok {
		return nil, fmt.Errorf("probe %s: want open, list, rm or check", c.Action)
	}
	if len(pos) != n {
		return nil, fmt.Errorf("probe %s takes %d arguments, got %d: sfkit-proxy probe -h", c.Action, n, len(pos))
	}
	if n >= 2 {
		c.Proto, c.Listen = pos[0], pos[1]
	}
	if n == 3 {
		c.Token = pos[2]
	}
	if c.Action == "open" && (c.Requester == "" || c.Token == "") {
		return nil, fmt.Errorf("probe open needs --requester IP/CIDR and --token TOKEN")
	}
	return c, nil
}

// splitArgs separates a command's positional arguments from its flags,
// wherever they stand; every flag but the bool ones named takes the next
// argument as its value unless written -flag=value.
func splitArgs(args []string, bools ...string) (pos, flags []string) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") || a == "-" {
			pos = append(pos, a)
			continue
		}
		flags = append(flags, a)
		name := strings.TrimLeft(a, "-")
		if !strings.Contains(a, "=") && i+1 < len(args) && !slices.Contains(bools, name) && name != "h" && name != "help" {
			i++
			flags = append(flags, args[i])
		}
	}
	return pos, flags
}

func takesValue(flagArg string) bool {
	name := strings.TrimLeft(flagArg, "-")
	return (name == "admin-listen" || name == "count" || name == "config") && !strings.Contains(flagArg, "=")
}
