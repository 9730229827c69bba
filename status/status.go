// Package status is the sidecar's status as its management API serves it
// (GET /v1/status, POST /v1/ping) and its client reads it: plain JSON
// types, no behaviour. Each part is filled by the component it describes
// (the sidecar its own fields, quicmux its peers and counters), not copied
// field by field by someone else.
package status

import "time"

// Status is what GET /v1/status returns.
type Status struct {
	Study        string   `json:"study"`
	PID          int      `json:"pid"`
	VirtualAddr  string   `json:"virtual_addr"`
	SOCKS        string   `json:"socks"`
	ExternalAddr string   `json:"external_addr,omitempty"`
	NAT          string   `json:"nat"`
	Registry     Registry `json:"registry"`
	STUN         STUN     `json:"stun"`
	Peers        []Peer   `json:"peers"`
	Counters     Counters `json:"counters"`
	// PeerRelay is what it relays for the other parties.
	PeerRelay PeerRelay `json:"peer_relay"`
	// Socket is what the kernel gave the UDP socket that carries QUIC.
	Socket Socket `json:"udp_socket"`
	// Gateways are the listeners that carry connections to peers
	// (GET /v1/gateways gives the same).
	Gateways []Gateway `json:"gateways"`
	// UDP is the datagrams carried through the tunnel.
	UDP UDP `json:"udp"`
}

// UDP is what the tunnel carried of UDP: this party's associations'
// datagrams to peers (sent) and their answers (received), and the peers'
// datagrams to local ports here (served) and the answers (answered).
// Payload bytes only; dropped counts datagrams by reason.
type UDP struct {
	Associations  int               `json:"associations"` // open here (SOCKS UDP ASSOCIATE, UDP gateways' clients)
	PeerSockets   int               `json:"peer_sockets"` // peers' associations' sockets to local ports
	Sent          uint64            `json:"sent"`
	SentBytes     uint64            `json:"sent_bytes"`
	Received      uint64            `json:"received"`
	ReceivedBytes uint64            `json:"received_bytes"`
	Served        uint64            `json:"served"`
	ServedBytes   uint64            `json:"served_bytes"`
	Answered      uint64            `json:"answered"`
	AnsweredBytes uint64            `json:"answered_bytes"`
	Dropped       map[string]uint64 `json:"dropped,omitempty"`
}

// Gateway is one gateway: a local listener whose connections go to a
// peer's port. Sent is toward the peer, received from it.
type Gateway struct {
	Proto       string   `json:"proto"`
	Listen      string   `json:"listen"`
	PID         int      `json:"pid"`
	Port        uint16   `json:"port"`
	Label       string   `json:"label,omitempty"`
	Source      string   `json:"source"` // "flag" or "api"
	Public      bool     `json:"public"`
	AllowFrom   []string `json:"allow_from,omitempty"`
	ConnRate    float64  `json:"conn_rate,omitempty"` // new connections per second per source
	MaxConns    int      `json:"max_conns"`
	IdleTimeout string   `json:"idle_timeout,omitempty"`
	Conns       uint64   `json:"conns"` // accepted and carried, all told
	Open        uint64   `json:"open"`
	// BytesToPeer and BytesFromPeer are the bytes carried each way.
	BytesToPeer   uint64 `json:"bytes_to_peer"`
	BytesFromPeer uint64 `json:"bytes_from_peer"`
	Rate          Rates  `json:"rate"`
	// Connections are the open connections (a UDP gateway's: its client
	// addresses), the oldest first, at most 64 listed.
	Connections []GatewayConn `json:"connections,omitempty"`
	// Refused counts connections refused, by reason: source (not in
	// allow_from), rate (over conn_rate), max_conns, tunnel (the dial to
	// the peer failed, or the peer refused).
	Refused map[string]uint64 `json:"refused"`
}

// GatewayConn is one open connection of a gateway: its client, and the
// bytes and rates toward the peer (sent) and back (received).
type GatewayConn struct {
	Client        string    `json:"client"`
	Since         time.Time `json:"since"`
	BytesToPeer   uint64    `json:"bytes_to_peer"`
	BytesFromPeer uint64    `json:"bytes_from_peer"`
	Rate          Rates     `json:"rate"`
}

// Socket is the shared UDP socket's kernel buffers as granted (the kernel
// caps what quic-go asks for at net.core.rmem_max and wmem_max unless the
// sidecar may force them), and whether the kernel offers segmentation
// offload (GSO: one system call sends many packets).
type Socket struct {
	ReadBuffer  int  `json:"read_buffer"`
	WriteBuffer int  `json:"write_buffer"`
	GSO         bool `json:"gso"`
}

// Registry says whether the registry is reachable.
type Registry struct {
	URL       string `json:"url"`
	Reachable bool   `json:"reachable"`
	Published bool   `json:"published"`
	LastError string `json:"last_error,omitempty"`
}

// STUN says what STUN learned and how often it worked.
type STUN struct {
	Done           bool   `json:"done"`
	LastError      string `json:"last_error,omitempty"`
	Refreshes      uint64 `json:"refreshes"`
	Failures       uint64 `json:"failures"`
	MappingChanges uint64 `json:"mapping_changes"`
}

// Peer is one other party as this sidecar sees it. Rates are bytes per
// second: current (the last few seconds), average (since the first
// connection) and the largest one-second sample.
type Peer struct {
	PID        int     `json:"pid"`
	State      string  `json:"state"`
	Path       string  `json:"path,omitempty"`
	Via        string  `json:"via,omitempty"` // the relay, when relayed
	NAT        string  `json:"nat,omitempty"` // what it published of its NAT ("none": a public address)
	RemoteAddr string  `json:"remote_addr,omitempty"`
	RTTMillis  float64 `json:"rtt_ms"`
	// PacketSize is the largest QUIC packet the connection sends now, in
	// bytes of UDP payload: what path MTU discovery found (1,200 at
	// first; up to 1,452 on a 1,500-byte MTU).
	PacketSize     int        `json:"packet_size,omitempty"`
	ConnectedSince *time.Time `json:"connected_since,omitempty"`
	OpenConns      int64      `json:"open_conns"`
	QUICConns      int        `json:"quic_conns"` // the pool that carries them
	// WaitingConns are the peer's connections waiting here for a local
	// program to listen on their port.
	WaitingConns  int           `json:"waiting_conns"`
	BytesSent     uint64        `json:"bytes_sent"`
	BytesReceived uint64        `json:"bytes_received"`
	Rate          Rates         `json:"rate"`
	LastError     string        `json:"last_error,omitempty"`
	Traffic       []PathTraffic `json:"traffic,omitempty"`
	// StateSince is when the state began: for repairing, when the path died.
	StateSince *time.Time `json:"state_since,omitempty"`
	// Repairs counts paths repaired; LastRepairSeconds is how long the last took.
	Repairs           uint64  `json:"repairs"`
	LastRepairSeconds float64 `json:"last_repair_seconds,omitempty"`
	// LastRepairReason is why the path was lost before the last repair:
	// stall (no progress while packets came: a shrunk MTU), dead (nothing
	// heard for 5 s) or lost (the connection ended with an error).
	LastRepairReason string `json:"last_repair_reason,omitempty"`
}

// Rates in bytes per second.
type Rates struct {
	CurrentSent     float64 `json:"current_sent"`
	CurrentReceived float64 `json:"current_received"`
	AverageSent     float64 `json:"average_sent"`
	AverageReceived float64 `json:"average_received"`
	MaxSent         float64 `json:"max_sent"`
	MaxReceived     float64 `json:"max_received"`
}

// PathTraffic is a peer's traffic over one kind of path.
type PathTraffic struct {
	Path          string `json:"path"`
	Conns         uint64 `json:"conns"`
	BytesSent     uint64 `json:"bytes_sent"`
	BytesReceived uint64 `json:"bytes_received"`
}

// Counters are event counts since start.
type Counters struct {
	DialsOK         uint64 `json:"dials_ok"`
	DialsFailed     uint64 `json:"dials_failed"`
	AcceptsOK       uint64 `json:"accepts_ok"`
	AcceptsRejected uint64 `json:"accepts_rejected"`
	ChecksSent      uint64 `json:"checks_sent"`
	ChecksAnswered  uint64 `json:"checks_answered"`
	// SOCKS counts CONNECT requests by "target/outcome", e.g. "peer/ok",
	// "direct/refused".
	SOCKS map[string]uint64 `json:"socks"`
	// FlowsResumed counts tunnelled connections carried on over a new
	// connection; FlowsReset counts resets by reason.
	FlowsResumed uint64            `json:"flows_resumed"`
	FlowsReset   map[string]uint64 `json:"flows_reset"`
	// FlowsMoved counts tunnelled connections moved between the QUIC
	// connections of a peer's pool; PoolConnsOpened counts the pool's
	// connections opened (dialer) or accepted.
	FlowsMoved      uint64 `json:"flows_moved"`
	PoolConnsOpened uint64 `json:"pool_conns_opened"`
	// PathStalls counts paths dropped because they carried nothing though
	// packets arrived, and a full-size probe got no answer (the path's MTU
	// shrank under QUIC's packet size).
	PathStalls uint64 `json:"path_stalls"`
	// PacketSizeRaises counts connections replaced because a trial found
	// the path carrying larger packets again (its MTU grew back).
	PacketSizeRaises uint64 `json:"packet_size_raises"`
}

// PeerRelay is what a party relays for the others of its study, and
// the sessions it is an end of.
type PeerRelay struct {
	Enabled bool `json:"enabled"`
	// Sessions are those it relays now; Ends, those it is an end of.
	Sessions int `json:"sessions"`
	Ends     int `json:"ends"`
	// RateLimit is the bytes per second it relays at most, all peers.
	RateLimit      int    `json:"rate_limit"`
	BytesForwarded uint64 `json:"bytes_forwarded"`
	// Dropped counts relayed packets dropped: over the rate, a full
	// queue, an unknown session, or a sender that is not its end.
	Dropped uint64 `json:"dropped"`
	// Refused counts sessions refused (off, no connection to both, over
	// the limit, a bad request).
	Refused uint64 `json:"refused"`
	// RawIn and RawOut count relayed packets it took and sent raw (as
	// UDP packets of their own, not datagrams of a peer connection), as a
	// relay or an end.
	RawIn  uint64 `json:"raw_in"`
	RawOut uint64 `json:"raw_out"`
	// Relaying lists the sessions it relays now.
	Relaying []RelaySession `json:"relaying,omitempty"`
}

// RelaySession is one session a party relays, between parties A and B:
// bytes forwarded each way, and their average rates since it began.
type RelaySession struct {
	A       int       `json:"a"`
	B       int       `json:"b"`
	Since   time.Time `json:"since"`
	BytesAB uint64    `json:"bytes_a_to_b"`
	BytesBA uint64    `json:"bytes_b_to_a"`
	RateAB  float64   `json:"rate_a_to_b"`
	RateBA  float64   `json:"rate_b_to_a"`
	// Raw is whether both its hops carry raw packets now (else datagrams
	// of the connections to A and B, on one hop or both).
	Raw bool `json:"raw"`
}

// Probe is an open probe: a temporary listener that answers its
// requester with a token, to prove the address is reachable.
type Probe struct {
	Proto     string    `json:"proto"`
	Listen    string    `json:"listen"`
	Requester []string  `json:"requester"`
	Expires   time.Time `json:"expires"`
	Answered  uint64    `json:"answered"` // requesters given the token
	Ignored   uint64    `json:"ignored"`  // others, given nothing
}

// PingResult is what POST /v1/ping returns.
type PingResult struct {
	PID        int       `json:"pid"`
	Path       string    `json:"path"`
	RemoteAddr string    `json:"remote_addr"`
	RTTMillis  []float64 `json:"rtt_ms"`
}
