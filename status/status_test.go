package status

import (
	"encoding/json"
	"testing"
	"time"
)

// TestJSONNames: the JSON names are what tests, labs and scripts parse;
// they must not change with the Go names.
func TestJSONNames(t *testing.T) {
	at := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	s := Status{
		Study: "s", PID: 1, VirtualAddr: "10.0.0.1", SOCKS: "127.0.0.1:7080", ExternalAddr: "192.0.2.1:4000", NAT: "cone",
		Registry: Registry{URL: "https://r", Reachable: true, Published: true, LastError: "e"},
		STUN:     STUN{Done: true, LastError: "e", Refreshes: 1, Failures: 2, MappingChanges: 3},
		Peers: []Peer{{PID: 2, State: "direct", Path: "direct", Via: "turn", RemoteAddr: "192.0.2.2:4000", RTTMillis: 1.5, PacketSize: 1432,
			ConnectedSince: &at, OpenConns: 1, QUICConns: 2, WaitingConns: 3, BytesSent: 4, BytesReceived: 5,
			Rate:      Rates{CurrentSent: 1, CurrentReceived: 2, AverageSent: 3, AverageReceived: 4, MaxSent: 5, MaxReceived: 6},
			LastError: "e", Traffic: []PathTraffic{{Path: "direct", Conns: 1, BytesSent: 2, BytesReceived: 3}},
			StateSince: &at, Repairs: 1, LastRepairSeconds: 0.5, LastRepairReason: "stall"}},
		Counters: Counters{DialsOK: 1, DialsFailed: 2, AcceptsOK: 3, AcceptsRejected: 4, ChecksSent: 5, ChecksAnswered: 6,
			SOCKS: map[string]uint64{"peer/ok": 7}, FlowsResumed: 8, FlowsReset: map[string]uint64{"timeout": 9},
			FlowsMoved: 10, PoolConnsOpened: 11, PathStalls: 12, PacketSizeRaises: 13},
		PeerRelay: PeerRelay{Enabled: true, Sessions: 1, Ends: 2, RateLimit: 3, BytesForwarded: 4, Dropped: 5, Refused: 6, RawIn: 7, RawOut: 8},
		Socket:    Socket{ReadBuffer: 1, WriteBuffer: 2, GSO: true},
		Gateways: []Gateway{{Proto: "tcp", Listen: "203.0.113.5:8443", PID: 2, Port: 8000, Label: "l", Source: "api", Public: true,
			AllowFrom: []string{"203.0.113.0/24"}, ConnRate: 10, MaxConns: 256, IdleTimeout: "30m0s", Conns: 1, Open: 2,
			BytesToPeer: 3, BytesFromPeer: 4, Rate: Rates{CurrentSent: 1}, Refused: map[string]uint64{"rate": 5}}},
		UDP: UDP{Associations: 1, PeerSockets: 2, Sent: 3, SentBytes: 4, Received: 5, ReceivedBytes: 6, Served: 7, ServedBytes: 8,
			Answered: 9, AnsweredBytes: 10, Dropped: map[string]uint64{"too_large": 11}},
	}
	const want = `{"study":"s","pid":1,"virtual_addr":"10.0.0.1","socks":"127.0.0.1:7080","external_addr":"192.0.2.1:4000","nat":"cone",` +
		`"registry":{"url":"https://r","reachable":true,"published":true,"last_error":"e"},` +
		`"stun":{"done":true,"last_error":"e","refreshes":1,"failures":2,"mapping_changes":3},` +
		`"peers":[{"pid":2,"state":"direct","path":"direct","via":"turn","remote_addr":"192.0.2.2:4000","rtt_ms":1.5,"packet_size":1432,` +
		`"connected_since":"2025-01-02T03:04:05Z","open_conns":1,"quic_conns":2,"waiting_conns":3,"bytes_sent":4,"bytes_received":5,` +
		`"rate":{"current_sent":1,"current_received":2,"average_sent":3,"average_received":4,"max_sent":5,"max_received":6},` +
		`"last_error":"e","traffic":[{"path":"direct","conns":1,"bytes_sent":2,"bytes_received":3}],` +
		`"state_since":"2025-01-02T03:04:05Z","repairs":1,"last_repair_seconds":0.5,"last_repair_reason":"stall"}],` +
		`"counters":{"dials_ok":1,"dials_failed":2,"accepts_ok":3,"accepts_rejected":4,"checks_sent":5,"checks_answered":6,` +
		`"socks":{"peer/ok":7},"flows_resumed":8,"flows_reset":{"timeout":9},"flows_moved":10,"pool_conns_opened":11,"path_stalls":12,"packet_size_raises":13},` +
		`"peer_relay":{"enabled":true,"sessions":1,"ends":2,"rate_limit":3,"bytes_forwarded":4,"dropped":5,"refused":6,"raw_in":7,"raw_out":8},` +
		`"udp_socket":{"read_buffer":1,"write_buffer":2,"gso":true},` +
		`"gateways":[{"proto":"tcp","listen":"203.0.113.5:8443","pid":2,"port":8000,"label":"l","source":"api","public":true,` +
		`"allow_from":["203.0.113.0/24"],"conn_rate":10,"max_conns":256,"idle_timeout":"30m0s","conns":1,"open":2,` +
		`"bytes_to_peer":3,"bytes_from_peer":4,"rate":{"current_sent":1,"current_received":0,"average_sent":0,"average_received":0,"max_sent":0,"max_received":0},` +
		`"refused":{"rate":5}}],` +
		`"udp":{"associations":1,"peer_sockets":2,"sent":3,"sent_bytes":4,"received":5,"received_bytes":6,"served":7,"served_bytes":8,` +
		`"answered":9,"answered_bytes":10,"dropped":{"too_large":11}}}`
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != want {
		t.Errorf("json.Marshal(Status) =\n%s\nwant\n%s", b, want)
	}
	p := PingResult{PID: 1, Path: "relayed", RemoteAddr: "192.0.2.3:3478", RTTMillis: []float64{1, 2}}
	const wantPing = `{"pid":1,"path":"relayed","remote_addr":"192.0.2.3:3478","rtt_ms":[1,2]}`
	if b, _ := json.Marshal(p); string(b) != wantPing {
		t.Errorf("json.Marshal(PingResult) = %s; want %s", b, wantPing)
	}
}
