package quicmux

import (
	"testing"
	"time"
)

func TestPathStateTransitions(t *testing.T) {
	t0 := time.Unix(1000, 0)
	t1 := t0.Add(2300 * time.Millisecond)
	repairing := pathState{state: StateRepairing, since: t0, lost: t0}
	tests := []struct {
		name     string
		from     pathState
		ev       pathEvent
		kind     PathKind
		want     pathState
		repaired time.Duration
	}{
		{"first connection", pathState{state: StateConnecting, since: t0}, evConnected, PathDirect, pathState{state: StateDirect, since: t1}, 0},
		{"direct path lost", pathState{state: StateDirect, since: t0}, evLost, PathNone, pathState{state: StateRepairing, since: t1, lost: t1}, 0},
		{"relayed path lost", pathState{state: StateRelayed, since: t0}, evLost, PathNone, pathState{state: StateRepairing, since: t1, lost: t1}, 0},
		{"repaired via relay", repairing, evConnected, PathRelayed, pathState{state: StateRelayed, since: t1}, 2300 * time.Millisecond},
		{"repaired direct", repairing, evConnected, PathDirect, pathState{state: StateDirect, since: t1}, 2300 * time.Millisecond},
		{"repair takes long", repairing, evSlow, PathNone, pathState{state: StateUnreachable, since: t1, lost: t0}, 0},
		{"repaired after being unreachable", pathState{state: StateUnreachable, since: t0, lost: t0}, evConnected, PathDirect, pathState{state: StateDirect, since: t1}, 2300 * time.Millisecond},
		{"never connected, slow", pathState{state: StateConnecting, since: t0}, evSlow, PathNone, pathState{state: StateUnreachable, since: t1}, 0},
		{"lost while connecting: no change", pathState{state: StateConnecting, since: t0}, evLost, PathNone, pathState{state: StateConnecting, since: t0}, 0},
		{"lost again while repairing: keeps the start", repairing, evLost, PathNone, repairing, 0},
		{"peer restarted while repairing", repairing, evGone, PathNone, pathState{state: StateConnecting, since: t1}, 0},
		{"peer shut down", pathState{state: StateDirect, since: t0}, evGone, PathNone, pathState{state: StateConnecting, since: t1}, 0},
		{"slow while connected: no change", pathState{state: StateDirect, since: t0}, evSlow, PathNone, pathState{state: StateDirect, since: t0}, 0},
		{"relayed connection upgraded to direct", pathState{state: StateRelayed, since: t0}, evUpgraded, PathDirect, pathState{state: StateDirect, since: t1}, 0},
		{"upgrade while direct: no change", pathState{state: StateDirect, since: t0}, evUpgraded, PathDirect, pathState{state: StateDirect, since: t0}, 0},
		{"upgrade while repairing: no change", repairing, evUpgraded, PathDirect, repairing, 0},
		{"unreachable peer gone: connecting again", pathState{state: StateUnreachable, since: t0, lost: t0}, evGone, PathNone, pathState{state: StateConnecting, since: t1}, 0},
		{"first connection via relay", pathState{state: StateConnecting, since: t0}, evConnected, PathRelayed, pathState{state: StateRelayed, since: t1}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, repaired := tt.from.next(tt.ev, tt.kind, t1)
			if got != tt.want || repaired != tt.repaired {
				t.Errorf("%+v.next(%v, %v) = %+v, %v; want %+v, %v", tt.from, tt.ev, tt.kind, got, repaired, tt.want, tt.repaired)
			}
		})
	}
}
