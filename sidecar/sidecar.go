// Package sidecar builds and runs the sidecar: the SOCKS front, the one
// UDP socket with its QUIC peers, STUN, relays, peer discovery (our
// registry or the sfkit website's relay), forwards and the management API.
package sidecar

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/google"
	"golang.org/x/sync/errgroup"

	"sfkit-proxy/admin"
	"sfkit-proxy/config"
	"sfkit-proxy/dgram"
	"sfkit-proxy/gateway"
	"sfkit-proxy/httpserve"
	"sfkit-proxy/identity"
	"sfkit-proxy/metadata"
	"sfkit-proxy/quicmux"
	"sfkit-proxy/quicmux/header"
	"sfkit-proxy/registry"
	"sfkit-proxy/relay"
	"sfkit-proxy/socks"
	"sfkit-proxy/splice"
	"sfkit-proxy/status"
	"sfkit-proxy/stun"
	"sfkit-proxy/website"
)

// Listening is where a started sidecar listens.
type Listening struct {
	SOCKS, Admin netip.AddrPort // Admin is zero when the API is off
	UDP          netip.AddrPort // the socket of QUIC and STUN
}

// farWaitGrace is how much longer a CONNECT to a peer waits than
// --dial-timeout: a peer's port that never listens is given up by the peer
// after its own --dial-timeout (the same, by default), and its refusal must
// reach the program as "connection refused", not be overtaken here by a
// timeout ("host unreachable").
const farWaitGrace = 10 * time.Second

// Run builds the sidecar's parts in dependency order and runs them until
// ctx ends or one fails. onReady, if set, is told where it listens once
// everything is listening.
func Run(ctx context.Context, cfg *config.Sidecar, log *slog.Logger, onReady func(Listening)) error {
	log = log.With("party", cfg.PID)
	id, err := identity.Load(cfg.StateDir)
	if err != nil {
		return err
	}
	if (cfg.Registry.Scheme == "http" || cfg.Registry.Scheme == "ws") && !config.IsLoopbackHost(cfg.Registry.Hostname()) {
		log.Warn("registry URL is not encrypted: credentials and addresses cross the network in the clear; use https:// or wss:// outside a lab", "registry", cfg.Registry.Redacted())
	}
	if what := needsCABundle(cfg); len(what) > 0 && !haveCABundle(os.Getenv, caFiles, caDirs) {
		log.Warn("no CA certificates on this system: TLS servers cannot be verified, and connecting to them will fail; "+
			"mount a CA bundle (docker run -v /etc/ssl/certs:/etc/ssl/certs:ro) or set SSL_CERT_FILE",
			"needed_by", strings.Join(what, ", "), "looked_in", strings.Join(append(caFiles, caDirs...), ","))
	}
	st := &state{socks: make(map[string]uint64)}
	disc, err := discovery(ctx, cfg, id, st, log)
	if err != nil {
		return err
	}
	if !cfg.SOCKSListen.Addr().IsLoopback() {
		log.Warn("SOCKS listener is not on loopback: anyone who can reach it can use this party's tunnels", "addr", cfg.SOCKSListen)
	}
	// Clients are local: no TCP keepalive (it costs syscalls per connection).
	lc := net.ListenConfig{KeepAlive: -1}
	ln, err := lc.Listen(ctx, "tcp", cfg.SOCKSListen.String())
	if err != nil {
		return fmt.Errorf("socks listen %v: %w (is another sidecar running? pick another --socks-listen)", cfg.SOCKSListen, err)
	}
	var adminLn net.Listener
	if cfg.AdminListen.IsValid() {
		if !cfg.AdminListen.Addr().IsLoopback() {
			log.Warn("management API is not on loopback: anyone who can reach it sees this party's status", "addr", cfg.AdminListen)
		}
		if adminLn, err = net.Listen("tcp", cfg.AdminListen.String()); err != nil {
			ln.Close()
			return fmt.Errorf("admin listen %v: %w (pick another --admin-listen, or off)", cfg.AdminListen, err)
		}
	}
	closeListeners := func() {
		ln.Close()
		if adminLn != nil {
			adminLn.Close()
		}
	}
	rl, renewing, err := allocateRelay(ctx, cfg, log)
	if err != nil {
		closeListeners()
		return err
	}
	// What this sidecar listens on is never a peer's to reach.
	own := []uint16{listenPort(ln)}
	if adminLn != nil {
		own = append(own, listenPort(adminLn))
	}
	// Nor are its gateways, those of the flags and those added later: a
	// peer's connection to one would go on, as this party, to another.
	var gws *gateway.Manager // made below, before anything runs
	var srv *socks.Server
	probes := gateway.NewProbes(cfg.GatewayAnyHost)
	defer probes.Close()
	ownPort := func(port uint16) bool {
		return config.PortsOf(own...).Contains(port) || gws.Listens("tcp", port) || probes.Listens("tcp", port)
	}
	// Nor, for UDP, the QUIC socket, the SOCKS front's UDP associations'
	// sockets, UDP gateways and probes, and the TURN client's socket: a
	// peer's datagram to one would speak as this party, or as its local
	// client. (They are all set before anything runs.)
	var mux *quicmux.Mux
	ownUDP := func(port uint16) bool {
		return mux.LocalAddr().Port() == port || srv.ListensUDP(port) || gws.Listens("udp", port) || probes.Listens("udp", port) ||
			renewing != nil && renewing.ClientPort() == port
	}
	udp := dgram.New(dgram.Options{Logger: log, Self: cfg.PID,
		Allow: func(pid int, port uint16) bool { return !ownUDP(port) && cfg.Allows(pid, port) },
		Send: func(pid int, b []byte) error {
			err := mux.SendDatagram(pid, b)
			if errors.Is(err, quicmux.ErrNoPath) {
				return dgram.ErrNoPath(err)
			}
			return err
		}})
	defer udp.Close()
	if cfg.AllowPorts.Empty() {
		log.Info("no local port is open to peers: they can reach nothing here; give -mpc (its listening ports open) or --allow-ports PORTS to open some")
	}
	checkKey := identity.CheckKeyOf(id)
	stunNow := make(chan struct{}, 1)
	mux, err = quicmux.Listen(cfg.UDPListen, rl, quicmux.Options{
		Logger: log, Study: cfg.Study, PID: cfg.PID, Identity: id, CheckKey: checkKey,
		AllowPort: cfg.Allows, OwnPort: ownPort,
		WaitPort: cfg.Waits, LocalWait: cfg.TunnelWait,
		Virtual: cfg.PeersCIDR, ResumeTimeout: cfg.ResumeTimeout,
		ConnsPerPeer: cfg.ConnsPerPeer, MaxPacketSize: cfg.MaxPacketSize,
		NoPeerRelay: cfg.NoPeerRelay, PeerRelayRate: cfg.PeerRelayRate,
		Datagram: udp.Receive,
		// A dead path may be a new NAT mapping: ask STUN now, so that a
		// change is published at once.
		OnPathLost: func() {
			select {
			case stunNow <- struct{}{}:
			default:
			}
		},
	})
	if err != nil {
		closeListeners()
		return err
	}
	self := &local{mux: mux, log: log.With("component", "discovery"), kick: make(chan struct{}, 1),
		addrs: config.AddrPolicy{Loopback: config.IsLoopbackHost(cfg.Registry.Hostname()), Virtual: cfg.PeersCIDR},
		entry: registry.Entry{PID: cfg.PID, Pin: id.Pin, CheckKey: checkKey.Public(), Instance: identity.NewInstance(),
			NAT: stun.NATUnknown, AllowPorts: cfg.AllowPorts.String()}}
	if rl != nil && rl.Addr.IsValid() {
		self.entry.Candidates = []registry.Candidate{{Kind: registry.KindRelay, Addr: rl.Addr}}
	}
	if renewing != nil {
		// A new allocation (the old one lost, or the first one late) is
		// sent from and published at once.
		renewing.OnChange = func(addr netip.AddrPort, server string) {
			mux.SetRelayAddr(addr, server)
			self.setRelay(addr)
		}
	}
	policy := &peerPolicy{ports: make(map[int]config.PortSet)}
	var symmetricWarned atomic.Bool // once a run
	ka := &stun.Keepalive{Client: mux.STUN(), Servers: cfg.STUN, Network: mux.Network(), Now: stunNow,
		OnMapping: func(m stun.Mapping) {
			st.setMapping(m)
			self.setMapping(m)
			if m.NAT == stun.NATEndpointDependent && rl == nil && symmetricWarned.CompareAndSwap(false, true) {
				warnSymmetric(log, cfg.NoPeerRelay)
			}
		},
		OnRound: func(err error) {
			if st.stunRound(err) && err != nil {
				log.Warn("stun failed; peers may not reach this party from outside its network", "err", err)
			}
		}}
	dialPeer := func(ctx context.Context, pid int, port uint16) (splice.Conn, error) {
		return mux.Dial(ctx, pid, port)
	}
	openUDP := func(recv func(int, uint16, []byte)) (*dgram.Assoc, error) { return udp.Open(recv) }
	opts := socks.Options{
		Logger: log, Peers: cfg.PeersCIDR, Self: cfg.PID, Direct: cfg.Direct, PeerAllows: policy.allows,
		DialPeer: dialPeer, ConnectTimeout: cfg.TunnelWait + farWaitGrace, OnConnect: st.socksRequest,
		UDP: func(recv func(int, uint16, []byte)) (socks.UDPAssoc, error) { return assocOrNil(openUDP(recv)) },
	}
	if cfg.MPC != nil {
		opts.Route = cfg.MPC.Route
	}
	srv = socks.New(opts)
	gws = gateway.New(gateway.Options{Logger: log, DialPeer: dialPeer, PeerAllows: policy.allows, Self: cfg.PID,
		AnyHost: cfg.GatewayAnyHost, ConnectTimeout: cfg.TunnelWait + farWaitGrace,
		UDP: func(recv func(int, uint16, []byte)) (gateway.UDPAssoc, error) { return assocOrNil(openUDP(recv)) }})
	forwards := cfg.Forwards
	if cfg.MPCForward {
		forwards = append(forwards, cfg.MPC.PeerPorts()...)
	}
	addForwards(gws, forwards, log)
	log.Info("sidecar starting", "study", cfg.Study, "socks", ln.Addr(), "udp", mux.LocalAddr(), "pin", id.Pin,
		"virtual_addr", cfg.VirtualAddr(cfg.PID), "allow_ports", cfg.AllowPorts.String(), "wait_ports", cfg.WaitPorts.String(), "discovery", cfg.Registry.Redacted())

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return mux.Run(gctx) })
	if renewing != nil {
		g.Go(func() error { return renewing.Run(gctx) })
	}
	g.Go(func() error { return ka.Run(gctx) })
	g.Go(func() error {
		return disc.Run(gctx, self.snapshot, self.kick, func(v []registry.Entry) { apply(v, cfg.PID, mux, policy) })
	})
	g.Go(func() error { return srv.Serve(gctx, ln) })
	g.Go(func() error { return gws.Run(gctx) })
	where := Listening{SOCKS: netip.MustParseAddrPort(ln.Addr().String()), UDP: mux.LocalAddr()}
	if adminLn != nil {
		where.Admin = netip.MustParseAddrPort(adminLn.Addr().String())
		h := admin.NewHandler(admin.Options{
			Logger: log,
			Status: func() status.Status { return st.status(cfg, mux, gws, udp, where.SOCKS) },
			Ping: func(ctx context.Context, pid int) (time.Duration, string, string, error) {
				rtt, path, where, err := mux.Ping(ctx, pid)
				return rtt, path.String(), where, err
			},
			Ready:    st.ready,
			Debug:    cfg.AdminDebug,
			Gateways: gws,
			Probes:   probes,
		})
		g.Go(func() error {
			return httpserve.Serve(gctx, &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}, adminLn, "", "")
		})
	}
	if onReady != nil {
		onReady(where)
	}
	err = g.Wait()
	log.Info("sidecar stopped")
	return err
}

// discovery builds the way to find peers that cfg.Registry names, with
// its credential.
func discovery(ctx context.Context, cfg *config.Sidecar, id *identity.Identity, st *state, log *slog.Logger) (Discovery, error) {
	if cfg.Website() {
		auth, src, err := websiteCredential(ctx, cfg)
		if err != nil {
			return nil, err
		}
		log.Info("website relay credential", "source", src)
		return website.New(website.Options{URL: cfg.Registry, Study: cfg.Study, PID: cfg.PID, Parties: cfg.Parties, Auth: auth,
			Cert: id.Cert.Certificate[0], Logger: log, OnResult: func(err error) { st.registryResult(err, err == nil) }}), nil
	}
	token, src, err := credential(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	reg := &registry.Client{Base: cfg.Registry, Study: cfg.Study, PID: cfg.PID, Token: token,
		HTTP: &http.Client{Timeout: 45 * time.Second}}
	return &registryDiscovery{reg: reg, credSource: src, st: st, log: log.With("component", "registry")}, nil
}

// forward is a local listener whose connections go to a peer's port.
// addForwards makes a gateway of each forward (--forward, --mpc-forward).
// A port something else already listens on (the local program itself) is
// left alone, and the log says so; so does it of a forward off loopback
// (--forward-any-host).
func addForwards(gws *gateway.Manager, fs []config.Forward, log *slog.Logger) {
	for _, f := range fs {
		if !f.Listen.Addr().IsLoopback() {
			log.Warn("forward listener is not on loopback: anyone who can reach it can use this tunnel to the peer", "listen", f.Listen, "peer", f.PID, "port", f.Port)
		}
		_, err := gws.Add(gateway.Spec{Proto: "tcp", Listen: f.Listen, PID: f.PID, Port: f.Port, Source: "flag"})
		switch {
		case errors.Is(err, gateway.ErrInUse):
			log.Info("not forwarding a port a local program already uses", "listen", f.Listen, "peer", f.PID, "port", f.Port)
		case err != nil:
			log.Warn("cannot listen for a forward; skipping it", "listen", f.Listen, "peer", f.PID, "port", f.Port, "err", err)
		default:
			log.Info("forwarding", "listen", f.Listen, "peer", f.PID, "port", f.Port)
		}
	}
}

// assocOrNil is an opened association as the interface its user takes:
// nil, not a typed nil, on error.
func assocOrNil(a *dgram.Assoc, err error) (interface {
	Send(int, uint16, []byte) error
	Close()
}, error) {
	if err != nil {
		return nil, err
	}
	return a, nil
}

// listenPort is the port ln listens on.
func listenPort(ln net.Listener) uint16 { return uint16(ln.Addr().(*net.TCPAddr).Port) }

// warnSymmetric says what an endpoint-dependent ("symmetric") NAT with no
// TURN relay means for this party's paths.
func warnSymmetric(log *slog.Logger, noPeerRelay bool) {
	if noPeerRelay {
		log.Warn("behind an endpoint-dependent (\"symmetric\") NAT, with no TURN relay and --peer-relay off: " +
			"only peers with public addresses can be reached; give --relay, or turn peer relays on (sfkit-proxy netcheck tells more)")
		return
	}
	log.Warn("behind an endpoint-dependent (\"symmetric\") NAT, with no TURN relay: peers with public addresses are reached directly, " +
		"the others only through a party of the study that reaches both (a peer relay); sfkit-proxy netcheck tells more")
}

// allocateRelay gets a relayed address from the first --relay that gives
// one, kept allocated by the Renewing it returns (run it): a lost
// allocation is made again, and so is one that failed here. Until then
// the sidecar runs with direct paths and peer relays, and says so.
func allocateRelay(ctx context.Context, cfg *config.Sidecar, log *slog.Logger) (*quicmux.Relay, *relay.Renewing, error) {
	if len(cfg.Relays) == 0 {
		return nil, nil, nil
	}
	o, err := relayOptions(cfg.RelayFlags, log)
	if err != nil {
		return nil, nil, err
	}
	actx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	a, err := relay.Allocate(actx, o)
	rl := &quicmux.Relay{Server: cfg.Relays[0]}
	if err != nil {
		log.Warn("no relay allocated yet (trying again in the background): parties that no direct path reaches go through a peer relay meanwhile, or stay unreachable", "err", err)
		a = nil
	} else {
		log.Info("relay allocated", "relay", a.Server, "addr", a.Addr)
		rl.Addr, rl.Server = a.Addr, a.Server
	}
	r := relay.NewRenewing(a, o)
	rl.Conn = r
	return rl, r, nil
}

// relayOptions are the relay package's options for cfg: its URLs, and
// the credentials and CAs read from their files.
func relayOptions(cfg config.RelayFlags, log *slog.Logger) (relay.Options, error) {
	o := relay.Options{User: cfg.RelayUser, Logger: log}
	for _, r := range cfg.Relays {
		u, err := relay.ParseURL(r)
		if err != nil {
			return o, err
		}
		o.URLs = append(o.URLs, u)
	}
	readSecret := func(flag, path string) (string, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("read %s: %w", flag, err)
		}
		if v := strings.TrimSpace(string(b)); v != "" {
			return v, nil
		}
		return "", fmt.Errorf("%s %s is empty", flag, path)
	}
	var err error
	if cfg.RelaySecretFile != "" {
		if o.Secret, err = readSecret("--relay-secret-file", cfg.RelaySecretFile); err != nil {
			return o, err
		}
	} else if o.Password, err = readSecret("--relay-password-file", cfg.RelayPasswordFile); err != nil {
		return o, err
	}
	if cfg.RelayCA != "" {
		pem, err := os.ReadFile(cfg.RelayCA)
		if err != nil {
			return o, fmt.Errorf("read --relay-ca: %w", err)
		}
		o.RootCAs = x509.NewCertPool()
		if !o.RootCAs.AppendCertsFromPEM(pem) {
			return o, fmt.Errorf("--relay-ca %s holds no PEM certificate", cfg.RelayCA)
		}
	}
	return o, nil
}

// credential returns where the registry token comes from: a key file or
// --auth-key when given, else the cloud instance's metadata endpoint.
func credential(ctx context.Context, cfg *config.Sidecar, log *slog.Logger) (registry.TokenFunc, string, error) {
	if cfg.AuthKeyFile != "" || cfg.AuthKey != "" {
		src := "--auth-key-file"
		if cfg.AuthKeyFile == "" {
			src = "--auth-key"
		}
		log.Info("registry credential", "source", src)
		tf, err := staticToken(cfg)
		return tf, src, err
	}
	// The audience is the registry URL, so a token is good for this registry only.
	s, err := metadata.Discover(ctx, cfg.Registry.String(), metadata.Options{})
	if err != nil {
		return nil, "", fmt.Errorf("no registry credential: give --auth-key-file PATH or set %s; on a cloud VM the metadata endpoint is used, but %w (on AWS, use a key file)",
			config.EnvName("auth-key"), err)
	}
	src := s.Provider + " metadata"
	log.Info("registry credential", "source", src)
	return func(ctx context.Context, refresh bool) (string, error) {
		if refresh {
			s.Invalidate()
		}
		t, err := s.TokenContext(ctx)
		if err != nil {
			return "", err
		}
		return t.AccessToken, nil
	}, src, nil
}

// staticToken reads the bearer token from --auth-key-file (again on every
// refresh, so a rotated file is picked up) or --auth-key.
func staticToken(cfg *config.Sidecar) (registry.TokenFunc, error) {
	read := func() (string, error) {
		if cfg.AuthKeyFile == "" {
			return cfg.AuthKey, nil
		}
		b, err := os.ReadFile(cfg.AuthKeyFile)
		if err != nil {
			return "", fmt.Errorf("read --auth-key-file: %w", err)
		}
		tok := strings.TrimSpace(string(b))
		if tok == "" {
			return "", fmt.Errorf("--auth-key-file %s is empty: put the registry token in it", cfg.AuthKeyFile)
		}
		return tok, nil
	}
	tok, err := read()
	if err != nil {
		return nil, err
	}
	var mu sync.Mutex // guards tok
	return func(_ context.Context, refresh bool) (string, error) {
		mu.Lock()
		defer mu.Unlock()
		if refresh {
			t, err := read()
			if err != nil {
				return "", err
			}
			tok = t
		}
		return tok, nil
	}, nil
}

// state is what the sidecar knows of itself, for the management API.
type state struct {
	mu             sync.Mutex // guards everything below
	mapping        stun.Mapping
	stunDone       bool
	stunErr        string
	stunOK         uint64
	stunFailed     uint64
	mappingChanges uint64
	published      bool
	regOK          bool
	regErr         string
	socks          map[string]uint64 // "target/outcome" → count
}

func (st *state) setMapping(m stun.Mapping) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.mapping.Addr.IsValid() && st.mapping.Addr != m.Addr {
		st.mappingChanges++
	}
	st.mapping = m
}

// stunRound records a STUN round; it reports whether the outcome changed
// (so that a failure is logged once, not every round).
func (st *state) stunRound(err error) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	prev := st.stunErr
	if err != nil {
		st.stunFailed++
		st.stunErr = err.Error()
		return prev == ""
	}
	st.stunOK++
	st.stunDone = true
	st.stunErr = ""
	return prev != ""
}

func (st *state) registryResult(err error, publish bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.regOK = err == nil
	st.regErr = ""
	if err != nil {
		st.regErr = err.Error()
	} else if publish {
		st.published = true
	}
}

func (st *state) socksRequest(dest string, pid int, err error) {
	target := "direct"
	if pid >= 0 {
		target = "peer"
	}
	outcome := "unreachable"
	switch {
	case err == nil:
		outcome = "ok"
	case errors.Is(err, header.ErrNotAllowed), errors.Is(err, socks.ErrNotAllowed):
		outcome = "not_allowed"
	case errors.Is(err, socks.ErrDirectDenied):
		outcome = "denied"
	case errors.Is(err, syscall.ECONNREFUSED):
		outcome = "refused"
	}
	st.mu.Lock()
	st.socks[target+"/"+outcome]++
	st.mu.Unlock()
}

func (st *state) ready() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	switch {
	case !st.published:
		return errors.New("not registered yet")
	case !st.stunDone:
		return errors.New("external address not learned yet (STUN)")
	}
	return nil
}

// status is the sidecar's status: its own parts from st and cfg, the
// peers and counters from the mux (Mux.UpdateStatus).
func (st *state) status(cfg *config.Sidecar, mux *quicmux.Mux, gws *gateway.Manager, udp *dgram.Carrier, socksAddr netip.AddrPort) status.Status {
	st.mu.Lock()
	s := status.Status{
		Study: cfg.Study, PID: cfg.PID, VirtualAddr: cfg.VirtualAddr(cfg.PID).String(), SOCKS: socksAddr.String(),
		NAT:      st.mapping.NAT,
		Registry: status.Registry{URL: cfg.Registry.Redacted(), Reachable: st.regOK, Published: st.published, LastError: st.regErr},
		STUN: status.STUN{Done: st.stunDone, LastError: st.stunErr, Refreshes: st.stunOK, Failures: st.stunFailed,
			MappingChanges: st.mappingChanges},
		Counters: status.Counters{SOCKS: make(map[string]uint64, len(st.socks))},
		Peers:    []status.Peer{}, // [] in JSON, not null, with no peer yet
	}
	if st.mapping.Addr.IsValid() {
		s.ExternalAddr = st.mapping.Addr.String()
	}
	if s.NAT == "" {
		s.NAT = stun.NATUnknown
	}
	for k, v := range st.socks {
		s.Counters.SOCKS[k] = v
	}
	st.mu.Unlock()
	mux.UpdateStatus(&s)
	gws.UpdateStatus(&s)
	udp.UpdateStatus(&s)
	return s
}

// websiteCredential returns the website relay's Authorization header: the
// raw auth key when one is given, else "Bearer " and a Google OAuth2 access
// token from the default credentials (on GCE, the metadata server's
// service account), through golang.org/x/oauth2/google.
func websiteCredential(ctx context.Context, cfg *config.Sidecar) (func(context.Context, bool) (string, error), string, error) {
	if cfg.AuthKeyFile != "" || cfg.AuthKey != "" {
		tf, err := staticToken(cfg)
		src := "-auth-key"
		if cfg.AuthKeyFile != "" {
			src = "--auth-key-file"
		}
		return tf, src, err
	}
	scopes := []string{"openid", "email", "profile"}
	find := func(ctx context.Context) (oauth2.TokenSource, error) {
		creds, err := google.FindDefaultCredentials(ctx, scopes...)
		if err != nil {
			return nil, fmt.Errorf("no website relay credential: give -auth-key KEY (or set %s), or run where Google default credentials exist: %w",
				config.EnvName("auth-key"), err)
		}
		return oauth2.ReuseTokenSource(nil, creds.TokenSource), nil
	}
	ts, err := find(ctx)
	if err != nil {
		return nil, "", err
	}
	var mu sync.Mutex // guards ts
	return func(_ context.Context, refresh bool) (string, error) {
		mu.Lock()
		defer mu.Unlock()
		if refresh {
			if ts, err = find(ctx); err != nil {
				return "", err
			}
		}
		t, err := ts.Token()
		if err != nil {
			return "", fmt.Errorf("google access token: %w", err)
		}
		return "Bearer " + t.AccessToken, nil
	}, "google default credentials", nil
}
