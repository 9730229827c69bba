// Package websitetest is a fake of the sfkit website's WebSocket relay
// (/api/ice), written from what the website does: it checks the Origin,
// the credential and the study header (401, 400, 403, 409), holds every
// party at a barrier until all the study's participants have connected
// (a reusable barrier: a party that reconnects alone waits until all the
// others reconnect too), overwrites sourcePID and studyID, forwards each
// message to its target or answers an error message, drops a connection
// that sends an unknown type, and keeps no state.
package websitetest

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"
)

// Server is the fake relay; it serves /api/ice.
type Server struct {
	// Study is the one study it knows.
	Study string
	// Participants are the study's users; a user's party id is its index.
	Participants []string
	// Keys maps raw auth keys (the whole Authorization header) to users.
	Keys map[string]string
	// Bearer, if set, maps an access token ("Authorization: Bearer TOKEN")
	// to a user, as the website asks Google's tokeninfo.
	Bearer func(token string) (user string, ok bool)
	// Origin is the Origin the relay expects: its own wss://HOST.
	Origin string

	mu      sync.Mutex // guards parties, waiting, round, dropped
	parties map[int]*websocket.Conn
	waiting int           // parties at the barrier
	round   chan struct{} // closed when the barrier opens
	dropped int           // connections dropped for a bad message
}

// Dropped counts the connections dropped for a bad message.
func (s *Server) Dropped() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dropped
}

// message is the one message shape; unknown fields are refused.
type message struct {
	Type      string `json:"type"`
	Data      string `json:"data"`
	StudyID   string `json:"studyID"`
	SourcePID int    `json:"sourcePID"`
	TargetPID int    `json:"targetPID"`
}

func (s *Server) refuse(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(message{Type: "error", Data: msg, SourcePID: -1, TargetPID: -1})
}

func (s *Server) user(auth string) (string, bool) {
	if tok, ok := strings.CutPrefix(auth, "Bearer "); ok && s.Bearer != nil {
		return s.Bearer(tok)
	}
	u, ok := s.Keys[auth]
	return u, ok
}

// ServeHTTP serves the relay at /api/ice.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/api/ice" {
		http.NotFound(w, r)
		return
	}
	if r.Header.Get("Origin") != s.Origin {
		s.refuse(w, http.StatusUnauthorized, "Unexpected Origin header")
		return
	}
	user, ok := s.user(r.Header.Get("Authorization"))
	if !ok {
		s.refuse(w, http.StatusUnauthorized, "Missing authentication")
		return
	}
	study := r.Header.Get("X-MPC-Study-ID")
	if study == "" {
		s.refuse(w, http.StatusBadRequest, "Missing X-MPC-Study-ID header")
		return
	}
	pid := -1
	if study == s.Study {
		for i, u := range s.Participants {
			if u == user {
				pid = i
			}
		}
	}
	if pid < 0 {
		s.refuse(w, http.StatusForbidden, fmt.Sprintf("User %s is not in study %s", user, study))
		return
	}
	s.mu.Lock()
	if s.parties == nil {
		s.parties = make(map[int]*websocket.Conn)
	}
	if _, dup := s.parties[pid]; dup {
		s.mu.Unlock()
		s.refuse(w, http.StatusConflict, fmt.Sprintf("Party %d is already connected to study %s", pid, study))
		return
	}
	s.parties[pid] = nil // taken, until the upgrade is done
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.parties, pid)
		s.mu.Unlock()
	}()
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{OriginPatterns: []string{"*"}})
	if err != nil {
		return
	}
	defer c.CloseNow()
	s.mu.Lock()
	s.parties[pid] = c
	s.mu.Unlock()
	// Read from the start, to notice a party that leaves while it waits;
	// what it sends is handled once the barrier opens.
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	in := make(chan []byte, 64)
	go func() {
		defer cancel()
		for {
			_, b, err := c.Read(ctx)
			if err != nil {
				return
			}
			select {
			case in <- b:
			case <-ctx.Done():
				return
			}
		}
	}()
	if !s.barrier(ctx) {
		return
	}
	for {
		var b []byte
		select {
		case <-ctx.Done():
			return
		case b = <-in:
		}
		var m message
		dec := json.NewDecoder(strings.NewReader(string(b)))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&m); err != nil || !knownType(m.Type) {
			s.mu.Lock()
			s.dropped++
			s.mu.Unlock()
			c.Close(websocket.StatusInternalError, "bad message")
			return
		}
		m.SourcePID, m.StudyID = pid, study
		s.mu.Lock()
		target := s.parties[m.TargetPID]
		s.mu.Unlock()
		switch {
		case m.TargetPID < 0:
			wsjson.Write(ctx, c, message{Type: "error", Data: fmt.Sprintf("Missing target PID: %+v", m), SourcePID: -1, TargetPID: -1})
		case target == nil || m.TargetPID == pid: // absent, or not yet upgraded
			wsjson.Write(ctx, c, message{Type: "error", Data: fmt.Sprintf("Unexpected target id %d", m.TargetPID), SourcePID: -1, TargetPID: -1})
		default:
			wsjson.Write(ctx, target, m)
		}
	}
}

func knownType(t string) bool {
	return t == "candidate" || t == "credential" || t == "certificate" || t == "error"
}

// barrier waits until as many parties as the study has are waiting, like
// Python's asyncio.Barrier: it opens for that many and then fills anew. A
// party that leaves while waiting no longer counts.
func (s *Server) barrier(ctx context.Context) bool {
	s.mu.Lock()
	if s.round == nil {
		s.round = make(chan struct{})
	}
	round := s.round
	s.waiting++
	if s.waiting == len(s.Participants) {
		close(s.round)
		s.round, s.waiting = make(chan struct{}), 0
	}
	s.mu.Unlock()
	select {
	case <-round:
		return true
	case <-ctx.Done():
		s.mu.Lock()
		if s.round == round {
			s.waiting--
		}
		s.mu.Unlock()
		return false
	}
}

// Connected lists the parties connected now.
func (s *Server) Connected() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []int
	for pid, c := range s.parties {
		if c != nil {
			out = append(out, pid)
		}
	}
	return out
}

// Kick closes party pid's connection, as a restart of the website would.
func (s *Server) Kick(pid int) {
	s.mu.Lock()
	c := s.parties[pid]
	s.mu.Unlock()
	if c != nil {
		c.Close(websocket.StatusGoingAway, "restarting")
	}
}
