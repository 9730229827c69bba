package sidecar

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"sfkit-proxy/backoff"
	"sfkit-proxy/config"
	"sfkit-proxy/quicmux"
	"sfkit-proxy/registry"
	"sfkit-proxy/stun"
)

// Discovery is how parties find each other: our registry (long poll) or
// the sfkit website's WebSocket relay. Run keeps this party's entry (self)
// known to the others, again whenever changed fires, and hands every new
// view of the other parties to view, until ctx ends. It returns early only
// for what needs a person (a refused credential); tunnels never depend on
// it staying up.
type Discovery interface {
	Run(ctx context.Context, self func() registry.Entry, changed <-chan struct{}, view func([]registry.Entry)) error
}

// local is this party's entry as discovery publishes it.
type local struct {
	mux   *quicmux.Mux
	addrs config.AddrPolicy // what may stand as a candidate
	log   *slog.Logger
	kick  chan struct{} // a token when the entry changed

	mu    sync.Mutex // guards entry
	entry registry.Entry
}

// setMapping records what STUN learned, to be published at once.
func (l *local) setMapping(m stun.Mapping) {
	l.mu.Lock()
	var cands []registry.Candidate
	for _, c := range l.entry.Candidates {
		if c.Kind != registry.KindSrflx {
			cands = append(cands, c)
		}
	}
	l.entry.Candidates = append(cands, registry.Candidate{Kind: registry.KindSrflx, Addr: m.Addr})
	l.entry.NAT = m.NAT
	l.mu.Unlock()
	l.log.Info("external address learned", "addr", m.Addr, "nat", m.NAT)
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

// setRelay records a new relayed address, to be published at once.
func (l *local) setRelay(addr netip.AddrPort) {
	l.mu.Lock()
	cands := []registry.Candidate{{Kind: registry.KindRelay, Addr: addr}}
	for _, c := range l.entry.Candidates {
		if c.Kind != registry.KindRelay {
			cands = append(cands, c)
		}
	}
	l.entry.Candidates = cands
	l.mu.Unlock()
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

// snapshot is the entry now, with the current host candidates.
func (l *local) snapshot() registry.Entry {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.entry
	e.Candidates = nil
	for _, h := range l.mux.HostCandidates() {
		if l.addrs.CheckCandidate(h) == nil && len(e.Candidates) < config.MaxCandidates-2 {
			e.Candidates = append(e.Candidates, registry.Candidate{Kind: registry.KindHost, Addr: h})
		}
	}
	for _, c := range l.entry.Candidates {
		if c.Kind != registry.KindHost {
			e.Candidates = append(e.Candidates, c)
		}
	}
	return e
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

// apply hands a view of the other parties to the mux, and their published
// ports to the policy.
func apply(entries []registry.Entry, self int, mux *quicmux.Mux, policy *peerPolicy) {
	infos := make([]quicmux.PeerInfo, 0, len(entries))
	ports := make(map[int]config.PortSet)
	for _, e := range entries {
		if e.PID == self {
			continue
		}
		in := quicmux.PeerInfo{PID: e.PID, Pin: e.Pin, CheckKey: e.CheckKey, Instance: e.Instance, NAT: peerNAT(e)}
		for _, c := range e.Candidates {
			in.Candidates = append(in.Candidates, c.Addr)
			if c.Kind == registry.KindRelay {
				in.Relays = append(in.Relays, c.Addr)
			}
		}
		infos = append(infos, in)
		if e.AllowPorts == "" {
			continue
		}
		if ps, err := config.ParsePorts(e.AllowPorts); err == nil {
			ports[e.PID] = ps
		}
	}
	policy.mu.Lock()
	policy.ports = ports
	policy.mu.Unlock()
	mux.SetPeers(infos)
}

// peerNAT is what e says of its party's NAT: "none" when the address STUN
// saw is one of its host addresses (a public address), else the mapping
// behaviour it published ("" when it published none: the sfkit website
// carries no NAT).
func peerNAT(e registry.Entry) string {
	hosts := map[netip.AddrPort]bool{}
	for _, c := range e.Candidates {
		if c.Kind == registry.KindHost {
			hosts[c.Addr] = true
		}
	}
	for _, c := range e.Candidates {
		if c.Kind == registry.KindSrflx && hosts[c.Addr] {
			return NATNone
		}
	}
	if e.NAT == stun.NATUnknown {
		return ""
	}
	return e.NAT
}

// registryDiscovery publishes to and long-polls our registry.
type registryDiscovery struct {
	reg        *registry.Client
	credSource string // where the token comes from, for error messages
	st         *state
	log        *slog.Logger
}

// Run publishes and watches until ctx ends, then removes the entry.
func (d *registryDiscovery) Run(ctx context.Context, self func() registry.Entry, changed <-chan struct{}, view func([]registry.Entry)) error {
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return d.publish(gctx, self, changed) })
	g.Go(func() error { return d.watch(gctx, view) })
	err := g.Wait()
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if derr := d.reg.Delete(dctx); derr != nil {
		d.log.Debug("registry entry not removed", "err", derr)
	}
	return err
}

// publish publishes now, on every change and every config.PublishInterval
// (so that the entry stays fresh), retrying with backoff. A credential or
// an entry the registry rejects before the first success ends the sidecar:
// that needs a person, not a retry.
func (d *registryDiscovery) publish(ctx context.Context, self func() registry.Entry, changed <-chan struct{}) error {
	published := false
	var bo backoff.Backoff
	for {
		e := self()
		err := d.reg.Publish(ctx, e)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		d.st.registryResult(err, true)
		if err != nil {
			var se *registry.StatusError
			if errors.As(err, &se) && (se.Code == http.StatusUnauthorized || se.Code == http.StatusForbidden) {
				if !published {
					return fmt.Errorf("registry rejected this party's credential from %s (%d: %s): check it, --study and --pid", d.credSource, se.Code, se.Msg)
				}
				d.log.Error("registry rejected this party's credential; retrying", "code", se.Code, "msg", se.Msg)
			} else if errors.As(err, &se) && (se.Code == http.StatusConflict || se.Code == http.StatusBadRequest) {
				if !published {
					return fmt.Errorf("registry refused this party's entry (%d: %s)", se.Code, se.Msg)
				}
				d.log.Error("registry refused this party's entry; retrying", "code", se.Code, "msg", se.Msg)
			} else {
				d.log.Warn("registry publish failed; retrying, existing tunnels keep working", "err", err, "in", bo.Next())
			}
			if err := bo.Wait(ctx); err != nil {
				return err
			}
			continue
		}
		if !published {
			d.log.Info("published to registry", "candidates", len(e.Candidates))
		}
		published = true
		bo.Reset()
		t := time.NewTimer(config.PublishInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-changed:
			t.Stop()
		case <-t.C:
		}
	}
}

// watch long-polls the registry and hands every new view on. A party
// whose entry went stale is gone (the reference registry drops such
// entries itself; others may not).
func (d *registryDiscovery) watch(ctx context.Context, view func([]registry.Entry)) error {
	var after uint64
	var bo backoff.Backoff
	failing := false
	for {
		l, err := d.reg.List(ctx, after, 25*time.Second)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		d.st.registryResult(err, false)
		if err != nil {
			if !failing {
				d.log.Warn("registry unreachable; retrying, existing tunnels keep working", "err", err)
			}
			failing = true
			if err := bo.Wait(ctx); err != nil {
				return err
			}
			continue
		}
		if failing {
			d.log.Info("registry reachable again")
		}
		bo.Reset()
		failing, after = false, l.Version
		view(l.Fresh(config.DefaultEntryTTL))
	}
}
