// Package website finds the parties of a study through the sfkit website's
// WebSocket relay (wss://HOST/api/ice): the second way to find peers,
// beside our registry. The relay forwards JSON messages of four types
// between the parties of a study, after a barrier that waits for all of
// them, and keeps no state: each party tells every other one who it is,
// again whenever anything changes or the other one restarts.
package website

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"

	"sfkit-proxy/backoff"
	"sfkit-proxy/config"
	"sfkit-proxy/identity"
	"sfkit-proxy/registry"
)

// Message types; the relay drops a connection that sends any other.
const (
	TypeCandidate   = "candidate"
	TypeCredential  = "credential"
	TypeCertificate = "certificate"
	TypeError       = "error"
)

// Message is the relay's one message shape. The relay overwrites SourcePID
// and StudyID from the sender's identity and forwards it to TargetPID.
type Message struct {
	Type      string `json:"type"`
	Data      string `json:"data"`
	StudyID   string `json:"studyID"`
	SourcePID int    `json:"sourcePID"`
	TargetPID int    `json:"targetPID"`
}

// Credential is a credential message's data: the party's instance (ufrag)
// and its public check key (pwd).
type Credential struct {
	Ufrag string `json:"ufrag"`
	Pwd   string `json:"pwd"`
}

// Certificate is a certificate message's data: the party's certificate,
// whose key peers pin, and all its candidate addresses.
type Certificate struct {
	PEM   string   `json:"pem"`
	Addrs []string `json:"addrs"`
}

// Headers the relay reads.
const (
	HeaderStudy = "X-MPC-Study-ID"
)

// Options configure a Client. Zero values are documented per field.
type Options struct {
	// URL is the relay, ws:// or wss:// (required).
	URL     *url.URL
	Study   string
	PID     int
	Parties []int // the study's party ids (required)
	// Auth returns the Authorization header: the raw auth key, or "Bearer "
	// and an access token (required). refresh asks for a new one after a 401.
	Auth func(ctx context.Context, refresh bool) (string, error)
	// Cert is this party's certificate in DER (required): peers pin its key.
	Cert []byte
	// Logger; nil discards.
	Logger *slog.Logger
	// OnResult, if set, is told how each attempt to reach the relay ended:
	// nil once this party's information went out.
	OnResult func(err error)
	// HTTPClient dials the relay; nil means http.DefaultClient.
	HTTPClient *http.Client
	// Resend is how often everything is sent again; zero means
	// config.PublishInterval.
	Resend time.Duration
}

// Client talks to the relay.
type Client struct {
	opts Options
	log  *slog.Logger
}

// New returns a client.
func New(opts Options) *Client {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Resend == 0 {
		opts.Resend = config.PublishInterval
	}
	return &Client{opts: opts, log: opts.Logger.With("component", "website")}
}

// StatusError is the relay's refusal of a connection.
type StatusError struct {
	Code int
	Msg  string
}

func (e *StatusError) Error() string {
	hint := ""
	switch e.Code {
	case http.StatusUnauthorized:
		hint = ": the credential was refused (check -auth-key, or this machine's Google credentials)"
	case http.StatusBadRequest:
		hint = ": the request lacked the study (" + HeaderStudy + ")"
	case http.StatusForbidden:
		hint = ": this credential is not a participant of the study (check -study and the credential)"
	case http.StatusConflict:
		hint = ": this party is already connected (is another sidecar running as this party?)"
	}
	msg := strings.TrimSpace(e.Msg)
	if msg != "" {
		msg = " (" + msg + ")"
	}
	return fmt.Sprintf("website relay answered %d%s%s", e.Code, msg, hint)
}

// fatal says whether err needs a person rather than a retry: a credential
// or a study the relay refuses.
func fatal(err error) bool {
	var se *StatusError
	return errors.As(err, &se) && (se.Code == http.StatusUnauthorized || se.Code == http.StatusForbidden || se.Code == http.StatusBadRequest)
}

// Run keeps a connection to the relay, sends this party's entry (self) to
// every other party, again whenever changed fires, and hands the peers it
// learns of to view, until ctx ends. A refused credential or study ends it
// before the first success; later, and for any other failure, it
// reconnects in the background, and what it learned stays: tunnels never
// depend on the relay.
func (c *Client) Run(ctx context.Context, self func() registry.Entry, changed <-chan struct{}, view func([]registry.Entry)) error {
	peers := &peerSet{self: c.opts.PID, parties: c.opts.Parties, byPID: make(map[int]*peerState)}
	var bo backoff.Backoff
	everUp, refresh := false, false
	for {
		up, err := c.session(ctx, self, changed, peers, view, refresh)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		everUp = everUp || up
		if c.opts.OnResult != nil {
			c.opts.OnResult(err)
		}
		var se *StatusError
		refresh = errors.As(err, &se) && se.Code == http.StatusUnauthorized
		switch {
		case fatal(err) && !everUp:
			return err
		case fatal(err):
			c.log.Error("website relay refused this party; retrying, existing tunnels keep working", "err", err)
		default:
			c.log.Warn("website relay connection lost; reconnecting, existing tunnels keep working", "err", err, "in", bo.Next())
		}
		if up {
			bo.Reset()
		}
		if err := bo.Wait(ctx); err != nil {
			return err
		}
	}
}

// session is one connection to the relay; up says whether it got as far as
// sending this party's entry.
func (c *Client) session(ctx context.Context, self func() registry.Entry, changed <-chan struct{}, peers *peerSet,
	view func([]registry.Entry), refresh bool) (up bool, err error) {
	auth, err := c.opts.Auth(ctx, refresh)
	if err != nil {
		return false, fmt.Errorf("website relay credential: %w", err)
	}
	u := c.opts.URL
	origin := u.Scheme + "://" + u.Host
	hdr := http.Header{}
	hdr.Set("Authorization", auth)
	hdr.Set(HeaderStudy, c.opts.Study)
	hdr.Set("Origin", origin)
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	conn, resp, err := websocket.Dial(dctx, u.String(), &websocket.DialOptions{HTTPHeader: hdr, HTTPClient: c.opts.HTTPClient})
	cancel()
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
			return false, &StatusError{Code: resp.StatusCode, Msg: errorText(b)}
		}
		return false, fmt.Errorf("website relay %s: %w", u.Redacted(), err)
	}
	defer conn.CloseNow()
	c.log.Info("connected to the website relay; waiting for every party of the study", "url", u.Redacted())
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	msgs := make(chan Message)
	readErr := make(chan error, 1)
	go func() {
		for {
			var m Message
			if err := wsjson.Read(sctx, conn, &m); err != nil {
				readErr <- err
				return
			}
			select {
			case msgs <- m:
			case <-sctx.Done():
				readErr <- sctx.Err()
				return
			}
		}
	}()
	sendAll := func(to []int) error {
		e := self()
		for _, pid := range to {
			for _, m := range c.messages(e, pid) {
				wctx, cancel := context.WithTimeout(sctx, 10*time.Second)
				err := wsjson.Write(wctx, conn, m)
				cancel()
				if err != nil {
					return fmt.Errorf("website relay: send: %w", err)
				}
			}
		}
		return nil
	}
	if err := sendAll(peers.others()); err != nil {
		return false, err
	}
	if c.opts.OnResult != nil {
		c.opts.OnResult(nil)
	}
	resend := time.NewTicker(c.opts.Resend)
	defer resend.Stop()
	ping := time.NewTicker(30 * time.Second)
	defer ping.Stop()
	for {
		select {
		case <-ctx.Done():
			conn.Close(websocket.StatusNormalClosure, "sidecar stopping")
			return true, ctx.Err()
		case err := <-readErr:
			return true, fmt.Errorf("website relay: %w", err)
		case <-changed:
			err = sendAll(peers.others())
		case <-resend.C:
			err = sendAll(peers.others())
		case <-ping.C:
			pctx, cancel := context.WithTimeout(sctx, 15*time.Second)
			err = conn.Ping(pctx)
			cancel()
		case m := <-msgs:
			var answer bool
			answer, err = c.handle(m, peers, view)
			if err == nil && answer {
				err = sendAll([]int{m.SourcePID}) // a new instance: tell it who we are
			}
		}
		if err != nil {
			return true, err
		}
	}
}

// errorText is what a refusal's body says: the relay's error message, or
// the text itself.
func errorText(b []byte) string {
	var m Message
	if json.Unmarshal(b, &m) == nil && m.Data != "" {
		return m.Data
	}
	return string(b)
}

// messages are what tells party `to` about e: credential, certificate,
// then each candidate.
func (c *Client) messages(e registry.Entry, to int) []Message {
	js := func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	}
	msg := func(typ, data string) Message {
		return Message{Type: typ, Data: data, StudyID: c.opts.Study, SourcePID: c.opts.PID, TargetPID: to}
	}
	cert := Certificate{PEM: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.opts.Cert})), Addrs: []string{}}
	for _, cd := range e.Candidates {
		cert.Addrs = append(cert.Addrs, cd.Addr.String())
	}
	out := []Message{msg(TypeCredential, js(Credential{Ufrag: e.Instance, Pwd: e.CheckKey})), msg(TypeCertificate, js(cert))}
	for i, cd := range e.Candidates {
		out = append(out, msg(TypeCandidate, CandidateLine(i, cd)))
	}
	return out
}

// handle takes in one message. answer says the sender is a new instance,
// which has to be told who we are.
func (c *Client) handle(m Message, peers *peerSet, view func([]registry.Entry)) (answer bool, err error) {
	if m.Type == TypeError {
		c.log.Debug("website relay reports an error", "msg", m.Data)
		return false, nil
	}
	p := peers.of(m.SourcePID)
	if p == nil {
		c.log.Warn("ignoring a website relay message from a party not in the study", "from", m.SourcePID, "type", m.Type)
		return false, nil
	}
	log := c.log.With("peer", m.SourcePID, "type", m.Type)
	log.Log(context.Background(), config.LevelTrace, "website relay message", "data", m.Data)
	switch m.Type {
	case TypeCredential:
		var cr Credential
		if err := json.Unmarshal([]byte(m.Data), &cr); err != nil || cr.Ufrag == "" || len(cr.Ufrag) > 64 {
			log.Warn("ignoring a bad credential from a peer", "err", err)
			return false, nil
		}
		if _, err := identity.ParseCheckPublic(cr.Pwd); err != nil {
			log.Warn("ignoring a bad credential from a peer", "err", err)
			return false, nil
		}
		if cr.Ufrag != p.instance {
			*p = peerState{instance: cr.Ufrag, trickled: make(map[netip.AddrPort]string)}
			answer = true
		}
		p.checkKey = cr.Pwd
	case TypeCertificate:
		var ce Certificate
		if err := json.Unmarshal([]byte(m.Data), &ce); err != nil {
			log.Warn("ignoring a bad certificate from a peer", "err", err)
			return false, nil
		}
		blk, _ := pem.Decode([]byte(ce.PEM))
		if blk == nil {
			log.Warn("ignoring a certificate that is not PEM from a peer")
			return false, nil
		}
		cert, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			log.Warn("ignoring a bad certificate from a peer", "err", err)
			return false, nil
		}
		p.pin = identity.PinOf(cert)
		p.addrs = p.addrs[:0]
		for _, a := range ce.Addrs[:min(len(ce.Addrs), config.MaxCandidates)] {
			if ap, err := netip.ParseAddrPort(a); err == nil {
				p.addrs = append(p.addrs, ap)
			}
		}
	case TypeCandidate:
		kind, ap, err := ParseCandidateLine(m.Data)
		if err != nil {
			log.Warn("ignoring a bad candidate from a peer", "err", err)
			return false, nil
		}
		if len(p.trickled) < config.MaxCandidates {
			p.trickled[ap] = kind
		}
	default:
		log.Warn("ignoring a website relay message of unknown type")
		return false, nil
	}
	view(peers.entries())
	return answer, nil
}

// peerSet is what the relay told us of the other parties.
type peerSet struct {
	self    int
	parties []int
	byPID   map[int]*peerState
}

type peerState struct {
	instance, checkKey, pin string
	addrs                   []netip.AddrPort          // the certificate's: all of them
	trickled                map[netip.AddrPort]string // candidate messages: address → kind
}

func (ps *peerSet) others() []int {
	return slices.DeleteFunc(slices.Clone(ps.parties), func(pid int) bool { return pid == ps.self })
}

// of is the state of party pid, nil for a party not in the study.
func (ps *peerSet) of(pid int) *peerState {
	if pid == ps.self || !slices.Contains(ps.parties, pid) {
		return nil
	}
	p := ps.byPID[pid]
	if p == nil {
		p = &peerState{trickled: make(map[netip.AddrPort]string)}
		ps.byPID[pid] = p
	}
	return p
}

// entries are the parties we know enough of to reach: instance, check key
// and pin.
func (ps *peerSet) entries() []registry.Entry {
	var out []registry.Entry
	for _, pid := range slices.Sorted(maps.Keys(ps.byPID)) {
		p := ps.byPID[pid]
		if p.instance == "" || p.checkKey == "" || p.pin == "" {
			continue
		}
		e := registry.Entry{PID: pid, Pin: p.pin, CheckKey: p.checkKey, Instance: p.instance}
		seen := make(map[netip.AddrPort]bool)
		add := func(ap netip.AddrPort) {
			if seen[ap] {
				return
			}
			seen[ap] = true
			kind := p.trickled[ap]
			if kind == "" || kind == "prflx" {
				kind = registry.KindHost
			}
			e.Candidates = append(e.Candidates, registry.Candidate{Kind: kind, Addr: ap})
		}
		for _, ap := range p.addrs {
			add(ap)
		}
		for _, ap := range slices.SortedFunc(maps.Keys(p.trickled), netip.AddrPort.Compare) {
			add(ap)
		}
		out = append(out, e)
	}
	return out
}

// CandidateLine writes c as an ICE candidate attribute.
func CandidateLine(i int, c registry.Candidate) string {
	prio := map[string]int{registry.KindHost: 126, registry.KindSrflx: 100, registry.KindRelay: 0}[c.Kind]<<24 | (65535-i)<<8 | 255
	return fmt.Sprintf("candidate:%d 1 udp %d %s %d typ %s", i+1, prio, c.Addr.Addr(), c.Addr.Port(), c.Kind)
}

// ParseCandidateLine reads an ICE candidate attribute
// ("candidate:F C udp PRIO IP PORT typ TYPE …") for its kind and address.
func ParseCandidateLine(s string) (kind string, ap netip.AddrPort, err error) {
	f := strings.Fields(strings.TrimPrefix(s, "a="))
	if len(f) < 8 || !strings.HasPrefix(f[0], "candidate:") || !strings.EqualFold(f[2], "udp") || f[6] != "typ" {
		return "", ap, fmt.Errorf("candidate %q: want 'candidate:F C udp PRIO IP PORT typ TYPE'", s)
	}
	ip, err := netip.ParseAddr(f[4])
	port, perr := strconv.ParseUint(f[5], 10, 16)
	if err != nil || perr != nil || port == 0 {
		return "", ap, fmt.Errorf("candidate %q: bad address", s)
	}
	switch f[7] {
	case registry.KindHost, registry.KindSrflx, registry.KindRelay, "prflx":
	default:
		return "", ap, fmt.Errorf("candidate %q: unknown type %q", s, f[7])
	}
	return f[7], netip.AddrPortFrom(ip.Unmap(), uint16(port)), nil
}
