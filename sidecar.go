package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"

	"sfkit-proxy/admin"
	"sfkit-proxy/config"
	"sfkit-proxy/metadata"
	"sfkit-proxy/quicmux"
	"sfkit-proxy/registry"
	"sfkit-proxy/relay"
	"sfkit-proxy/socks"
	"sfkit-proxy/stun"
)

// listening is where a started sidecar listens.
type listening struct {
	socks, admin netip.AddrPort // admin is zero when the API is off
}

// runSidecar builds the sidecar's parts in dependency order and runs them
// until ctx ends or one fails. onReady, if set, is told where it listens
// once everything is listening.
func runSidecar(ctx context.Context, cfg *config.Sidecar, log *slog.Logger, onReady func(listening)) error {
	log = log.With("party", cfg.PID)
	token, credSource, err := credential(ctx, cfg, log)
	if err != nil {
		return err
	}
	id, err := quicmux.LoadIdentity(cfg.StateDir)
	if err != nil {
		return err
	}
	if cfg.Registry.Scheme == "http" && !isLoopbackHost(cfg.Registry.Hostname()) {
		log.Warn("registry URL is plain http: tokens and addresses cross the network unencrypted; use https outside a lab", "registry", cfg.Registry.Redacted())
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
	rl, err := allocateRelay(ctx, cfg, log)
	if err != nil {
		closeListeners()
		return err
	}
	checkKey := quicmux.NewCheckKey()
	mux, err := quicmux.Listen(cfg.UDPListen, quicmux.Options{
		Logger: log, Study: cfg.Study, PID: cfg.PID, Identity: id, CheckKey: checkKey,
		AllowPort: cfg.AllowPorts.Contains, Relay: rl, Virtual: cfg.PeersCIDR,
	})
	if err != nil {
		closeListeners()
		return err
	}
	st := &state{socks: make(map[string]uint64)}
	reg := &registry.Client{Base: cfg.Registry, Study: cfg.Study, PID: cfg.PID, Token: token,
		HTTP: &http.Client{Timeout: 45 * time.Second}}
	pub := &publisher{reg: reg, mux: mux, st: st, credSource: credSource, log: log.With("component", "registry"), kick: make(chan struct{}, 1),
		addrs: config.AddrPolicy{Loopback: isLoopbackHost(cfg.Registry.Hostname()), Virtual: cfg.PeersCIDR},
		entry: registry.Entry{PID: cfg.PID, Pin: id.Pin, CheckKey: checkKey.Public(), Instance: quicmux.NewInstance(),
			NAT: stun.NATUnknown, AllowPorts: cfg.AllowPorts.String()}}
	if rl != nil {
		pub.entry.Candidates = []registry.Candidate{{Kind: registry.KindRelay, Addr: rl.Addr}}
	}
	policy := &peerPolicy{ports: make(map[int]config.PortSet)}
	ka := &stun.Keepalive{Client: mux.STUN(), Servers: cfg.STUN, Network: mux.Network(),
		OnMapping: func(m stun.Mapping) {
			st.setMapping(m)
			pub.setMapping(m)
		},
		OnRound: func(err error) {
			if st.stunRound(err) && err != nil {
				log.Warn("stun failed; peers may not reach this party from outside its network", "err", err)
			}
		}}
	srv := socks.New(socks.Options{
		Logger: log, Peers: cfg.PeersCIDR, Self: cfg.PID, Direct: cfg.Direct, PeerAllows: policy.allows,
		DialPeer: func(ctx context.Context, pid int, port uint16) (socks.Conn, error) {
			return mux.Dial(ctx, pid, port)
		},
		OnConnect: st.socksRequest,
	})
	log.Info("sidecar starting", "study", cfg.Study, "socks", ln.Addr(), "udp", mux.LocalAddr(), "pin", id.Pin,
		"virtual_addr", cfg.VirtualAddr(cfg.PID), "allow_ports", cfg.AllowPorts.String())

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return mux.Run(gctx) })
	g.Go(func() error { return ka.Run(gctx) })
	g.Go(func() error { return pub.run(gctx) })
	g.Go(func() error { return watch(gctx, reg, mux, policy, st, cfg.PID, log.With("component", "registry")) })
	g.Go(func() error { return srv.Serve(gctx, ln) })
	where := listening{socks: netip.MustParseAddrPort(ln.Addr().String())}
	if adminLn != nil {
		where.admin = netip.MustParseAddrPort(adminLn.Addr().String())
		h := admin.NewHandler(admin.Options{
			Logger: log,
			Status: func() admin.Status { return st.status(cfg, mux.Stats(), where.socks) },
			Ping: func(ctx context.Context, pid int) (time.Duration, string, string, error) {
				rtt, path, addr, err := mux.Ping(ctx, pid)
				return rtt, path, addr.String(), err
			},
			Ready: st.ready,
			Debug: cfg.AdminDebug,
		})
		g.Go(func() error {
			return serveHTTP(gctx, &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}, adminLn, "", "")
		})
	}
	if onReady != nil {
		onReady(where)
	}
	err = g.Wait()
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if derr := reg.Delete(dctx); derr != nil {
		log.Debug("registry entry not removed", "err", derr)
	}
	log.Info("sidecar stopped")
	return err
}

// allocateRelay gets a relayed address from the first --relay that gives
// one. Without one the sidecar still runs (direct paths only), and says so.
func allocateRelay(ctx context.Context, cfg *config.Sidecar, log *slog.Logger) (*quicmux.Relay, error) {
	if len(cfg.Relays) == 0 {
		return nil, nil
	}
	o := relay.Options{User: cfg.RelayUser, Logger: log}
	for _, r := range cfg.Relays {
		u, err := relay.ParseURL(r)
		if err != nil {
			return nil, err
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
			return nil, err
		}
	} else if o.Password, err = readSecret("--relay-password-file", cfg.RelayPasswordFile); err != nil {
		return nil, err
	}
	if cfg.RelayCA != "" {
		pem, err := os.ReadFile(cfg.RelayCA)
		if err != nil {
			return nil, fmt.Errorf("read --relay-ca: %w", err)
		}
		o.RootCAs = x509.NewCertPool()
		if !o.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--relay-ca %s holds no PEM certificate", cfg.RelayCA)
		}
	}
	actx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	a, err := relay.Allocate(actx, o)
	if err != nil {
		log.Warn("no relay allocated: parties that no direct path reaches stay unreachable", "err", err)
		return nil, nil
	}
	log.Info("relay allocated", "relay", a.Server, "addr", a.Addr)
	return &quicmux.Relay{Conn: a.Conn, Addr: a.Addr, Server: a.Server}, nil
}

func isLoopbackHost(h string) bool {
	if h == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(h)
	return err == nil && a.IsLoopback()
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

// publisher keeps this party's registry entry current.
type publisher struct {
	reg        *registry.Client
	mux        *quicmux.Mux
	st         *state
	credSource string // where the token comes from, for error messages
	log        *slog.Logger
	kick       chan struct{}
	addrs      config.AddrPolicy // what the registry takes as candidates

	mu    sync.Mutex // guards entry
	entry registry.Entry
}

// setMapping records what STUN learned and publishes it at once.
func (p *publisher) setMapping(m stun.Mapping) {
	p.mu.Lock()
	var cands []registry.Candidate
	for _, c := range p.entry.Candidates {
		if c.Kind != registry.KindSrflx {
			cands = append(cands, c)
		}
	}
	p.entry.Candidates = append(cands, registry.Candidate{Kind: registry.KindSrflx, Addr: m.Addr})
	p.entry.NAT = m.NAT
	p.mu.Unlock()
	p.log.Info("external address learned", "addr", m.Addr, "nat", m.NAT)
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func (p *publisher) snapshot() registry.Entry {
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.entry
	e.Candidates = nil
	for _, h := range p.mux.HostCandidates() {
		if p.addrs.CheckCandidate(h) == nil && len(e.Candidates) < config.MaxCandidates-2 {
			e.Candidates = append(e.Candidates, registry.Candidate{Kind: registry.KindHost, Addr: h})
		}
	}
	for _, c := range p.entry.Candidates {
		if c.Kind != registry.KindHost {
			e.Candidates = append(e.Candidates, c)
		}
	}
	return e
}

// run publishes now, on every change and every config.PublishInterval (so
// that the entry stays fresh), retrying with backoff. A credential or an
// entry the registry rejects before the first success ends the sidecar:
// that needs a person, not a retry.
func (p *publisher) run(ctx context.Context) error {
	published := false
	backoff := time.Second
	for {
		e := p.snapshot()
		err := p.reg.Publish(ctx, e)
		wait := config.PublishInterval
		if ctx.Err() != nil {
			return ctx.Err()
		}
		p.st.registryResult(err, true)
		if err != nil {
			var se *registry.StatusError
			if errors.As(err, &se) && (se.Code == http.StatusUnauthorized || se.Code == http.StatusForbidden) {
				if !published {
					return fmt.Errorf("registry rejected this party's credential from %s (%d: %s): check it, --study and --pid", p.credSource, se.Code, se.Msg)
				}
				p.log.Error("registry rejected this party's credential; retrying", "code", se.Code, "msg", se.Msg)
			} else if errors.As(err, &se) && (se.Code == http.StatusConflict || se.Code == http.StatusBadRequest) {
				if !published {
					return fmt.Errorf("registry refused this party's entry (%d: %s)", se.Code, se.Msg)
				}
				p.log.Error("registry refused this party's entry; retrying", "code", se.Code, "msg", se.Msg)
			} else {
				p.log.Warn("registry publish failed; retrying, existing tunnels keep working", "err", err, "in", backoff)
			}
			wait = backoff + rand.N(backoff/4+1)
			backoff = min(2*backoff, 30*time.Second)
		} else {
			if !published {
				p.log.Info("published to registry", "candidates", len(e.Candidates))
			}
			published = true
			backoff = time.Second
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-p.kick:
			t.Stop()
		case <-t.C:
		}
	}
}

// peerPolicy holds the ports each peer publishes as reachable.
type peerPolicy struct {
	mu    sync.Mutex // guards ports
	ports map[int]config.PortSet
}

func (pp *peerPolicy) allows(pid int, port uint16) bool {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	ps, ok := pp.ports[pid]
	return !ok || ps.Contains(port)
}

// watch long-polls the registry and hands every new view to the mux.
func watch(ctx context.Context, reg *registry.Client, mux *quicmux.Mux, policy *peerPolicy, st *state, self int, log *slog.Logger) error {
	var after uint64
	backoff := time.Second
	failing := false
	for {
		l, err := reg.List(ctx, after, 25*time.Second)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		st.registryResult(err, false)
		if err != nil {
			if !failing {
				log.Warn("registry unreachable; retrying, existing tunnels keep working", "err", err)
			}
			failing = true
			t := time.NewTimer(backoff + rand.N(backoff/4+1))
			select {
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			case <-t.C:
			}
			backoff = min(2*backoff, 30*time.Second)
			continue
		}
		if failing {
			log.Info("registry reachable again")
		}
		failing, backoff, after = false, time.Second, l.Version
		infos := make([]quicmux.PeerInfo, 0, len(l.Parties))
		ports := make(map[int]config.PortSet)
		// A party whose entry went stale is gone (the reference registry
		// drops such entries itself; others may not).
		for _, e := range l.Fresh(config.DefaultEntryTTL) {
			if e.PID == self {
				continue
			}
			in := quicmux.PeerInfo{PID: e.PID, Pin: e.Pin, CheckKey: e.CheckKey, Instance: e.Instance}
			for _, c := range e.Candidates {
				in.Candidates = append(in.Candidates, c.Addr)
				if c.Kind == registry.KindRelay {
					in.Relays = append(in.Relays, c.Addr)
				}
			}
			infos = append(infos, in)
			if ps, err := config.ParsePorts(e.AllowPorts); err == nil {
				ports[e.PID] = ps
			}
		}
		policy.mu.Lock()
		policy.ports = ports
		policy.mu.Unlock()
		mux.SetPeers(infos)
	}
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
	case errors.Is(err, quicmux.ErrNotAllowed), errors.Is(err, socks.ErrNotAllowed):
		outcome = "not_allowed"
	case errors.Is(err, socks.ErrDirectDenied):
		outcome = "denied"
	case errors.Is(err, quicmux.ErrRefused), errors.Is(err, syscall.ECONNREFUSED):
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

func (st *state) status(cfg *config.Sidecar, ms quicmux.Stats, socksAddr netip.AddrPort) admin.Status {
	st.mu.Lock()
	s := admin.Status{
		Study: cfg.Study, PID: cfg.PID, VirtualAddr: cfg.VirtualAddr(cfg.PID).String(), SOCKS: socksAddr.String(),
		NAT:      st.mapping.NAT,
		Registry: admin.RegistryStatus{URL: cfg.Registry.Redacted(), Reachable: st.regOK, Published: st.published, LastError: st.regErr},
		STUN: admin.STUNStatus{Done: st.stunDone, LastError: st.stunErr, Refreshes: st.stunOK, Failures: st.stunFailed,
			MappingChanges: st.mappingChanges},
		Counters: admin.Counters{DialsOK: ms.DialsOK, DialsFailed: ms.DialsFailed, AcceptsOK: ms.AcceptsOK,
			AcceptsRejected: ms.AcceptsRejected, ChecksSent: ms.ChecksSent, ChecksAnswered: ms.ChecksAnswered,
			SOCKS: make(map[string]uint64, len(st.socks))},
		Peers: []admin.Peer{},
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
	for _, p := range ms.Peers {
		ap := admin.Peer{PID: p.PID, State: p.State, Path: p.Path, Via: p.Via, RTTMillis: float64(p.RTT.Microseconds()) / 1000,
			OpenConns: p.OpenConns, BytesSent: p.BytesSent, BytesReceived: p.BytesRecv, LastError: p.LastError,
			Rate: admin.Rates{CurrentSent: p.RateSent, CurrentReceived: p.RateRecv, AverageSent: p.AvgSent,
				AverageReceived: p.AvgRecv, MaxSent: p.MaxSent, MaxReceived: p.MaxRecv}}
		if p.RemoteAddr.IsValid() {
			ap.RemoteAddr = p.RemoteAddr.String()
			since := p.Since
			ap.ConnectedSince = &since
		}
		for _, t := range p.Traffic {
			ap.Traffic = append(ap.Traffic, admin.PathTraffic{Path: t.Path, Conns: t.Conns, BytesSent: t.BytesSent, BytesReceived: t.BytesRecv})
		}
		s.Peers = append(s.Peers, ap)
	}
	return s
}
