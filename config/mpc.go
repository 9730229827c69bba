package config

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// MPC is what the sidecar takes from an MPC program's configGlobal.toml
// (sfgwas's format): which party listens where for which other party. For
// each pair of parties i < j, party i listens on servers.party<i>.ports.party<j>
// + t for t < mpc_num_threads, and party j dials servers.party<i>.ipaddr at
// that port (127.0.0.1 once sfkit has rewritten the addresses).
type MPC struct {
	Threads int
	// Parties are the party ids of the servers table, in order.
	Parties []int
	// routes maps an address a party j dials to the party i it means:
	// every party's listening ports for this party (see Routes).
	routes map[netip.AddrPort]int
	// Listens are this party's own listening ports, by the party they are for.
	Listens map[netip.AddrPort]int
}

type mpcFile struct {
	Threads *int                 `toml:"mpc_num_threads"`
	Servers map[string]mpcServer `toml:"servers"`
}

type mpcServer struct {
	IPAddr string         `toml:"ipaddr"`
	Ports  map[string]any `toml:"ports"`
}

// LoadMPC reads path as party self's MPC config. A malformed file, or one
// in which one address would mean two parties, is refused with an error
// that says where.
func LoadMPC(path string, self int) (*MPC, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("-mpc: %w", err)
	}
	defer f.Close()
	m, err := ParseMPC(f, self)
	if err != nil {
		return nil, fmt.Errorf("-mpc %s: %w", path, err)
	}
	return m, nil
}

// partyKey reads "party<N>".
func partyKey(s string) (int, bool) {
	n, err := strconv.Atoi(strings.TrimPrefix(s, "party"))
	return n, err == nil && n >= 0 && "party"+strconv.Itoa(n) == s
}

// ParseMPC reads an MPC config for party self.
func ParseMPC(r io.Reader, self int) (*MPC, error) {
	var f mpcFile
	if _, err := toml.NewDecoder(r).Decode(&f); err != nil {
		return nil, fmt.Errorf("not valid TOML: %w", err)
	}
	if f.Threads == nil || *f.Threads < 1 || *f.Threads > 1024 {
		return nil, errors.New("mpc_num_threads must be set, 1 to 1024")
	}
	m := &MPC{Threads: *f.Threads, routes: make(map[netip.AddrPort]int), Listens: make(map[netip.AddrPort]int)}
	servers := make(map[int]mpcServer)
	for k, s := range f.Servers {
		pid, ok := partyKey(k)
		if !ok {
			return nil, fmt.Errorf("servers.%s: want servers.partyN", k)
		}
		servers[pid] = s
		m.Parties = append(m.Parties, pid)
	}
	slices.Sort(m.Parties)
	if _, ok := servers[self]; !ok {
		return nil, fmt.Errorf("no servers.party%d: is -pid %d right?", self, self)
	}
	// port returns where party i listens for party j.
	port := func(i, j int) (uint16, error) {
		v, ok := servers[i].Ports["party"+strconv.Itoa(j)]
		if !ok {
			return 0, fmt.Errorf("servers.party%d.ports has no party%d", i, j)
		}
		var n int64
		var err error
		switch v := v.(type) {
		case string:
			n, err = strconv.ParseInt(strings.TrimSpace(v), 10, 32)
		case int64:
			n = v
		default:
			err = errors.New("not a number")
		}
		if err != nil || n < 1 || n+int64(m.Threads)-1 > 65535 {
			return 0, fmt.Errorf("servers.party%d.ports.party%d = %v: want a port such that port + mpc_num_threads - 1 <= 65535", i, j, v)
		}
		return uint16(n), nil
	}
	desc := func(listen bool, pid int) string {
		if listen {
			return fmt.Sprintf("this party's listening port for party %d", pid)
		}
		return fmt.Sprintf("party %d's listening port for this party", pid)
	}
	// add maps base+t for every thread t, refusing an address that would
	// mean two things.
	add := func(listen bool, ip netip.Addr, base uint16, pid int) error {
		into := m.routes
		if listen {
			into = m.Listens
		}
		for t := range m.Threads {
			ap := netip.AddrPortFrom(ip, base+uint16(t))
			for _, other := range []struct {
				listen bool
				m      map[netip.AddrPort]int
			}{{false, m.routes}, {true, m.Listens}} {
				if old, dup := other.m[ap]; dup && (other.listen != listen || old != pid) {
					return fmt.Errorf("%v is both %s and %s (ports + mpc_num_threads %d overlap): give each pair its own ports",
						ap, desc(other.listen, old), desc(listen, pid), m.Threads)
				}
			}
			into[ap] = pid
		}
		return nil
	}
	loopbacks := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")}
	for _, i := range m.Parties {
		if i == self {
			continue
		}
		ips := loopbacks
		if s := servers[i].IPAddr; s != "" && s != "localhost" {
			ip, err := netip.ParseAddr(s)
			if err != nil {
				return nil, fmt.Errorf("servers.party%d.ipaddr %q: want an IP address", i, s)
			}
			if !ip.IsLoopback() {
				ips = append(slices.Clone(loopbacks), ip)
			}
		}
		if i > self {
			// This party listens for party i, on every address.
			base, err := port(self, i)
			if err != nil {
				return nil, err
			}
			for _, ip := range loopbacks {
				if err := add(true, ip, base, i); err != nil {
					return nil, err
				}
			}
			continue
		}
		base, err := port(i, self)
		if err != nil {
			return nil, err
		}
		for _, ip := range ips {
			if err := add(false, ip, base, i); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// Route says which party a connection to host:port means: the party that
// listens there for this one. host is an IP address or localhost.
func (m *MPC) Route(host string, port uint16) (int, bool) {
	if host == "localhost" {
		host = "127.0.0.1"
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return 0, false
	}
	pid, ok := m.routes[netip.AddrPortFrom(ip.Unmap(), port)]
	return pid, ok
}

// ListenerFor says which party this party's MPC program listens on port
// for, if any: only that party may reach it.
func (m *MPC) ListenerFor(port uint16) (int, bool) {
	pid, ok := m.Listens[netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), port)]
	return pid, ok
}

// ListenPorts are this party's own listening ports: what it declares open
// to its peers by starting with -mpc.
func (m *MPC) ListenPorts() PortSet {
	ports := make([]uint16, 0, len(m.Listens))
	for ap := range m.Listens {
		ports = append(ports, ap.Port())
	}
	return PortsOf(ports...)
}

// PeerPorts lists the loopback ports that other parties listen on for
// this one (forward mode listens on them), with the party of each, in
// order.
func (m *MPC) PeerPorts() []Forward {
	var out []Forward
	for ap, pid := range m.routes {
		if ap.Addr() == netip.AddrFrom4([4]byte{127, 0, 0, 1}) {
			out = append(out, Forward{Listen: ap, PID: pid, Port: ap.Port()})
		}
	}
	slices.SortFunc(out, func(a, b Forward) int { return int(a.Listen.Port()) - int(b.Listen.Port()) })
	return out
}

// Forward is a local listener whose connections go to a peer's port.
type Forward struct {
	Listen netip.AddrPort
	PID    int
	Port   uint16
}

// ParseForward reads LOCAL=PID:PORT, LOCAL being PORT or IP:PORT (127.0.0.1
// when no IP is given). It takes any IP; ParseSidecar refuses one that is
// not loopback without --forward-any-host.
func ParseForward(s string) (Forward, error) {
	local, remote, ok := strings.Cut(s, "=")
	pidS, portS, ok2 := strings.Cut(remote, ":")
	bad := fmt.Errorf("--forward %q: want LOCAL=PID:PORT, e.g. 8040=0:8040 or 127.0.0.1:8040=0:8040", s)
	if !ok || !ok2 {
		return Forward{}, bad
	}
	var f Forward
	if p, err := strconv.ParseUint(local, 10, 16); err == nil && p > 0 {
		f.Listen = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(p))
	} else if ap, err := netip.ParseAddrPort(local); err == nil && ap.Port() > 0 {
		f.Listen = ap
	} else {
		return Forward{}, bad
	}
	pid, err1 := strconv.Atoi(pidS)
	port, err2 := strconv.ParseUint(portS, 10, 16)
	if err1 != nil || err2 != nil || pid < 0 || port == 0 {
		return Forward{}, bad
	}
	f.PID, f.Port = pid, uint16(port)
	return f, nil
}
