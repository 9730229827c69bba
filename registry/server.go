package registry

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"sfkit-proxy/config"
)

// Grant is what a token allows: writing one party's entry, reading its study.
type Grant struct {
	Study string
	PID   int
}

// ParseTokens reads a tokens file: lines "TOKEN STUDY PID", blank lines and
// '#' comments allowed. The map is keyed by the token's hash.
func ParseTokens(r *bufio.Scanner) (map[string]Grant, error) {
	return parseGrants(r, 16, hashToken)
}

// parseGrants reads lines "KEY STUDY PID"; keys shorter than minKey are
// refused, and key(KEY) indexes the map.
func parseGrants(r *bufio.Scanner, minKey int, key func(string) string) (map[string]Grant, error) {
	grants := make(map[string]Grant)
	for n := 1; r.Scan(); n++ {
		line := strings.TrimSpace(r.Text())
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = strings.TrimSpace(line[:i])
		}
		if line == "" {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 3 {
			return nil, fmt.Errorf("line %d: want 'TOKEN STUDY PID', got %d fields", n, len(f))
		}
		if len(f[0]) < minKey {
			return nil, fmt.Errorf("line %d: token too short: use at least %d random characters", n, minKey)
		}
		if !config.ValidStudy(f[1]) {
			return nil, fmt.Errorf("line %d: study %q: use letters, digits, '-', '_' or '.'", n, f[1])
		}
		pid, err := strconv.Atoi(f[2])
		if err != nil || pid < 0 {
			return nil, fmt.Errorf("line %d: pid %q: want a number 0 or more", n, f[2])
		}
		k := key(f[0])
		if _, dup := grants[k]; dup {
			return nil, fmt.Errorf("line %d: token repeated", n)
		}
		grants[k] = Grant{Study: f[1], PID: pid}
	}
	if err := r.Err(); err != nil {
		return nil, err
	}
	return grants, nil
}

// LoadTokens reads a tokens file from disk.
func LoadTokens(path string) (map[string]Grant, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("tokens file: %w", err)
	}
	defer f.Close()
	g, err := ParseTokens(bufio.NewScanner(f))
	if err != nil {
		return nil, fmt.Errorf("tokens file %s: %w", path, err)
	}
	return g, nil
}

func hashToken(t string) string {
	h := sha256.Sum256([]byte(t))
	return string(h[:])
}

// ServerOptions configure a Server. Zero values are documented per field.
type ServerOptions struct {
	// Grants maps hashed tokens to grants; build it with LoadTokens.
	Grants map[string]Grant
	// DataDir holds state.json; empty keeps state in memory only.
	DataDir string
	// Logger; nil discards.
	Logger *slog.Logger
	// MaxWait caps a long poll; zero means 60 s.
	MaxWait time.Duration
	// Rate limits requests per token per second; zero means 20 (burst 40).
	Rate float64
	// OIDC, if set, also accepts cloud identity tokens.
	OIDC *OIDC
	// Addrs says which candidates are refused; the zero policy refuses
	// loopback and allows every range. Set Loopback only where every party
	// runs on the registry's machine.
	Addrs config.AddrPolicy
	// EntryTTL is how long an entry lives without a refresh; zero means
	// config.DefaultEntryTTL.
	EntryTTL time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Server is the reference registry: an http.Handler.
type Server struct {
	opts ServerOptions
	log  *slog.Logger
	mux  *http.ServeMux

	mu       sync.Mutex // guards studies, changed, limiters
	studies  map[string]*study
	changed  chan struct{}           // closed and replaced on every change
	limiters map[Grant]*rate.Limiter // per party, not per token: cloud tokens rotate
}

type study struct {
	Version uint64        `json:"version"`
	Parties map[int]Entry `json:"parties"`
}

// NewServer returns a server with state loaded from opts.DataDir.
func NewServer(opts ServerOptions) (*Server, error) {
	if opts.MaxWait == 0 {
		opts.MaxWait = 60 * time.Second
	}
	if opts.Rate == 0 {
		opts.Rate = 20
	}
	if opts.EntryTTL == 0 {
		opts.EntryTTL = config.DefaultEntryTTL
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{opts: opts, log: log, studies: make(map[string]*study), changed: make(chan struct{}), limiters: make(map[Grant]*rate.Limiter)}
	if opts.DataDir != "" {
		if err := os.MkdirAll(opts.DataDir, 0o700); err != nil {
			return nil, fmt.Errorf("registry data dir: %w", err)
		}
		b, err := os.ReadFile(s.statePath())
		switch {
		case errors.Is(err, os.ErrNotExist):
		case err != nil:
			return nil, fmt.Errorf("registry state: %w", err)
		default:
			if err := json.Unmarshal(b, &s.studies); err != nil {
				return nil, fmt.Errorf("registry state %s is corrupt: %w (move it away to start empty)", s.statePath(), err)
			}
			// Parties could not refresh while the registry was down: give
			// every entry a full TTL from now.
			now := opts.Now().UTC()
			for _, st := range s.studies {
				for pid, e := range st.Parties {
					e.Updated = now
					st.Parties[pid] = e
				}
			}
		}
	}
	s.mux = http.NewServeMux()
	s.mux.HandleFunc("PUT /v1/studies/{study}/parties/{pid}", s.put)
	s.mux.HandleFunc("DELETE /v1/studies/{study}/parties/{pid}", s.delete)
	s.mux.HandleFunc("GET /v1/studies/{study}/parties", s.list)
	s.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	return s, nil
}

func (s *Server) statePath() string { return filepath.Join(s.opts.DataDir, "state.json") }

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

func httpError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

// authorize checks the bearer token and that it belongs to the study in the
// path. It writes the error and returns false when not.
func (s *Server) authorize(w http.ResponseWriter, r *http.Request) (Grant, bool) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || tok == "" {
		w.Header().Set("WWW-Authenticate", `Bearer realm="sfkit-proxy"`)
		httpError(w, http.StatusUnauthorized, "missing bearer token")
		return Grant{}, false
	}
	h := hashToken(tok)
	g, ok := s.opts.Grants[h]
	if !ok && s.opts.OIDC != nil && strings.Count(tok, ".") == 2 {
		var id string
		var err error
		if g, id, err = s.opts.OIDC.Grant(r.Context(), tok); err != nil {
			s.log.Info("identity token refused", "identity", id, "err", err)
			w.Header().Set("WWW-Authenticate", `Bearer realm="sfkit-proxy", error="invalid_token"`)
			httpError(w, http.StatusUnauthorized, "invalid identity token: "+err.Error())
			return Grant{}, false
		}
		ok = true
	}
	if !ok {
		w.Header().Set("WWW-Authenticate", `Bearer realm="sfkit-proxy", error="invalid_token"`)
		httpError(w, http.StatusUnauthorized, "unknown token")
		return Grant{}, false
	}
	s.mu.Lock()
	lim := s.limiters[g]
	if lim == nil {
		lim = rate.NewLimiter(rate.Limit(s.opts.Rate), int(2*s.opts.Rate))
		s.limiters[g] = lim
	}
	s.mu.Unlock()
	if !lim.Allow() {
		w.Header().Set("Retry-After", "1")
		httpError(w, http.StatusTooManyRequests, "too many requests: slow down")
		return Grant{}, false
	}
	if r.PathValue("study") != g.Study {
		httpError(w, http.StatusForbidden, "token is not valid for this study")
		return Grant{}, false
	}
	return g, true
}

func (s *Server) ownEntry(w http.ResponseWriter, r *http.Request) (Grant, bool) {
	g, ok := s.authorize(w, r)
	if !ok {
		return g, false
	}
	pid, err := strconv.Atoi(r.PathValue("pid"))
	if err != nil || pid < 0 {
		httpError(w, http.StatusBadRequest, "pid in path must be a number 0 or more")
		return g, false
	}
	if pid != g.PID {
		httpError(w, http.StatusForbidden, fmt.Sprintf("token may only write party %d's entry", g.PID))
		return g, false
	}
	return g, true
}

func (s *Server) put(w http.ResponseWriter, r *http.Request) {
	g, ok := s.ownEntry(w, r)
	if !ok {
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, MaxBody)
	e, err := DecodeEntry(r.Body)
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			httpError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("body over %d bytes", MaxBody))
			return
		}
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	if e.PID != g.PID {
		httpError(w, http.StatusBadRequest, "pid in body differs from pid in path")
		return
	}
	if err := e.CheckAddrs(s.opts.Addrs); err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	e.Updated = s.opts.Now().UTC()
	var holder = -1
	if err := s.update(g.Study, func(st *study) bool {
		for pid, o := range st.Parties {
			if pid != g.PID && o.Pin == e.Pin {
				holder = pid
				return false
			}
		}
		old, had := st.Parties[g.PID]
		st.Parties[g.PID] = e // a refresh: Updated is new either way
		old.Updated = e.Updated
		return !had || !equalEntry(old, e)
	}); err != nil {
		s.log.Error("registry state not saved", "err", err)
		httpError(w, http.StatusInternalServerError, "state not saved")
		return
	}
	if holder >= 0 {
		s.log.Warn("party published another party's pin", "study", g.Study, "pid", g.PID, "holder", holder)
		httpError(w, http.StatusConflict, fmt.Sprintf("pin is already published by party %d of this study: each party needs its own identity key (its own --state-dir)", holder))
		return
	}
	s.log.Debug("party published", "study", g.Study, "pid", g.PID)
	w.WriteHeader(http.StatusNoContent)
}

func equalEntry(a, b Entry) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return string(ja) == string(jb)
}

func (s *Server) delete(w http.ResponseWriter, r *http.Request) {
	g, ok := s.ownEntry(w, r)
	if !ok {
		return
	}
	if err := s.update(g.Study, func(st *study) bool {
		_, had := st.Parties[g.PID]
		delete(st.Parties, g.PID)
		return had
	}); err != nil {
		s.log.Error("registry state not saved", "err", err)
		httpError(w, http.StatusInternalServerError, "state not saved")
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// update applies f to the study under the lock, after dropping expired
// entries; when anything changed it bumps the version, saves and wakes
// long polls.
func (s *Server) update(name string, f func(*study) bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.studies[name]
	if st == nil {
		st = &study{Parties: make(map[int]Entry)}
		s.studies[name] = st
	}
	expired := s.expireLocked(name, st)
	if !f(st) && !expired {
		return nil
	}
	return s.changedLocked(st)
}

func (s *Server) changedLocked(st *study) error {
	st.Version++
	close(s.changed)
	s.changed = make(chan struct{})
	return s.saveLocked()
}

// expireLocked drops the entries of st not refreshed within the TTL: their
// sidecars were killed, or lost the registry for good. It reports whether
// it dropped any.
func (s *Server) expireLocked(name string, st *study) bool {
	now := s.opts.Now()
	dropped := false
	for pid, e := range st.Parties {
		if now.Sub(e.Updated) > s.opts.EntryTTL {
			s.log.Info("party entry expired", "study", name, "pid", pid, "last_seen", e.Updated)
			delete(st.Parties, pid)
			dropped = true
		}
	}
	return dropped
}

// nextExpiryLocked is when the first entry of st expires; zero for none.
func (s *Server) nextExpiryLocked(st *study) time.Time {
	var next time.Time
	for _, e := range st.Parties {
		if t := e.Updated.Add(s.opts.EntryTTL); next.IsZero() || t.Before(next) {
			next = t
		}
	}
	return next
}

func (s *Server) saveLocked() error {
	if s.opts.DataDir == "" {
		return nil
	}
	b, err := json.Marshal(s.studies)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(s.opts.DataDir, "state-*.tmp")
	if err != nil {
		return err
	}
	_, werr := tmp.Write(b)
	serr := tmp.Sync()
	cerr := tmp.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return os.Rename(tmp.Name(), s.statePath())
}

func (s *Server) list(w http.ResponseWriter, r *http.Request) {
	g, ok := s.authorize(w, r)
	if !ok {
		return
	}
	q := r.URL.Query()
	var after uint64
	if v := q.Get("after"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			httpError(w, http.StatusBadRequest, "after must be a version number")
			return
		}
		after = n
	}
	var wait time.Duration
	if v := q.Get("wait"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			httpError(w, http.StatusBadRequest, "wait must be a duration such as 25s")
			return
		}
		wait = min(d, s.opts.MaxWait)
	}
	ctx, cancel := context.WithTimeout(r.Context(), wait)
	defer cancel()
	for {
		s.mu.Lock()
		l := List{Parties: []Entry{}, Now: s.opts.Now().UTC()}
		var expiry time.Time
		if st := s.studies[g.Study]; st != nil {
			if s.expireLocked(g.Study, st) {
				if err := s.changedLocked(st); err != nil {
					s.log.Error("registry state not saved", "err", err)
				}
			}
			l.Version = st.Version
			for _, pid := range slices.Sorted(maps.Keys(st.Parties)) {
				l.Parties = append(l.Parties, st.Parties[pid])
			}
			expiry = s.nextExpiryLocked(st)
		}
		changed := s.changed
		s.mu.Unlock()
		if l.Version != after || wait == 0 {
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(l)
			return
		}
		// Wake when an entry expires, too: a killed party's peers learn
		// of it without anyone else publishing.
		var expires <-chan time.Time
		t := time.NewTimer(0)
		t.Stop()
		if !expiry.IsZero() {
			t.Reset(max(expiry.Sub(l.Now), 0) + 10*time.Millisecond)
			expires = t.C
		}
		select {
		case <-changed:
		case <-expires:
		case <-ctx.Done():
			wait = 0 // answer with what there is
		}
		t.Stop()
	}
}
