package quicmux

import "time"

//go:generate stringer -type=State,PathKind,pathEvent,ResetReason -linecomment -output=enums_string.go

// State is a peer's state as status shows it. A connected peer's state is
// its path's kind.
type State uint8

// States.
const (
	StateConnecting  State = iota // connecting
	StateDirect                   // direct
	StateRelayed                  // relayed
	StateRepairing                // repairing
	StateUnreachable              // unreachable
)

// PathKind is what a connection runs over.
type PathKind uint8

// Path kinds.
const (
	PathNone    PathKind = iota // none
	PathDirect                  // direct
	PathRelayed                 // relayed
	// PathPeerRelayed: through another party of the study (peerrelay.go).
	PathPeerRelayed // peer-relayed
)

// connected is the state of a peer connected over a path of kind k.
func (k PathKind) connected() State {
	if k == PathRelayed || k == PathPeerRelayed {
		return StateRelayed
	}
	return StateDirect
}

// Connected reports whether s is a connected state (direct or relayed).
func (s State) Connected() bool { return s == StateDirect || s == StateRelayed }

// pathEvent is what happens to a peer's path.
type pathEvent uint8

const (
	evConnected pathEvent = iota // connected: a connection is up (with its path kind)
	evUpgraded                   // upgraded: the relayed connection moved to the direct path
	evLost                       // lost: the connection died under live tunnels
	evSlow                       // slow: 30 s without a path
	evGone                       // gone: the peer stopped or restarted, nothing to repair
)

// pathState is a peer's path state: what it is, since when, and when the
// path was lost while repairing.
type pathState struct {
	state State
	since time.Time
	lost  time.Time // when repairing began; zero when not repairing
}

// next is the state after ev at now; kind is the path kind of a new
// connection. repaired, when not zero, is how long a repair took. The
// peer's loop obeys it: in a connected state it watches its connection
// (keep), in any other it looks for one (connect).
func (s pathState) next(ev pathEvent, kind PathKind, now time.Time) (n pathState, repaired time.Duration) {
	n = s
	switch ev {
	case evConnected:
		if !s.lost.IsZero() {
			repaired = now.Sub(s.lost)
		}
		n = pathState{state: kind.connected(), since: now}
	case evUpgraded:
		if s.state == StateRelayed {
			n = pathState{state: StateDirect, since: now}
		}
	case evLost:
		if s.state.Connected() {
			n = pathState{state: StateRepairing, since: now, lost: now}
		}
	case evSlow:
		if s.state == StateConnecting || s.state == StateRepairing {
			n = pathState{state: StateUnreachable, since: now, lost: s.lost}
		}
	case evGone:
		n = pathState{state: StateConnecting, since: now}
	}
	if n.state == s.state && n.lost == s.lost {
		n.since = s.since
	}
	return n, repaired
}
