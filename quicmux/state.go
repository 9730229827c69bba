package quicmux

import "time"

// Peer states. A connected peer's state is its path's kind.
const (
	StateConnecting  = "connecting"  // no connection yet (or the peer restarted)
	StateDirect      = PathDirect    // connected directly
	StateRelayed     = PathRelayed   // connected through a relay
	StateRepairing   = "repairing"   // the path died; its tunnels wait for a new one
	StateUnreachable = "unreachable" // no path after 30 s of trying
)

// pathEvent is what happens to a peer's path.
type pathEvent int

const (
	evConnected pathEvent = iota // a connection is up (with its path kind)
	evLost                       // the connection died under live tunnels
	evSlow                       // 30 s without a path
	evGone                       // the peer stopped or restarted: nothing to repair
)

// pathState is a peer's path state: what it is, since when, and when the
// path was lost while repairing.
type pathState struct {
	state string
	since time.Time
	lost  time.Time // when repairing began; zero when not repairing
}

// next is the state after ev at now; kind is the path kind of a
// connection. repaired, when not zero, is how long a repair took.
func (s pathState) next(ev pathEvent, kind string, now time.Time) (n pathState, repaired time.Duration) {
	n = s
	switch ev {
	case evConnected:
		if !s.lost.IsZero() {
			repaired = now.Sub(s.lost)
		}
		n = pathState{state: kind, since: now}
	case evLost:
		if s.state == StateDirect || s.state == StateRelayed {
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
