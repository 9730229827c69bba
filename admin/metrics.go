package admin

import (
	"cmp"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"sfkit-proxy/dgram"
	"sfkit-proxy/gateway"
	"sfkit-proxy/status"
)

// Metric descriptions. Everything is read from one Status snapshot per
// scrape, so the numbers agree with /v1/status.
var (
	descPeerBytes   = prometheus.NewDesc("sfkit_proxy_peer_bytes_total", "Bytes of tunnelled TCP data exchanged with a peer.", []string{"peer", "path", "direction"}, nil)
	descPeerConns   = prometheus.NewDesc("sfkit_proxy_peer_connections_total", "Tunnelled TCP connections opened with a peer, either direction.", []string{"peer", "path"}, nil)
	descPeerOpen    = prometheus.NewDesc("sfkit_proxy_peer_open_connections", "Tunnelled TCP connections open now.", []string{"peer"}, nil)
	descPeerState   = prometheus.NewDesc("sfkit_proxy_peer_state", "1 for the peer's current state (connecting, direct, relayed, repairing, unreachable).", []string{"peer", "state"}, nil)
	descPeerRTT     = prometheus.NewDesc("sfkit_proxy_peer_rtt_seconds", "Smoothed round-trip time of the QUIC connection to the peer.", []string{"peer"}, nil)
	descHandshakes  = prometheus.NewDesc("sfkit_proxy_handshakes_total", "QUIC handshakes with peers by role and outcome.", []string{"role", "outcome"}, nil)
	descChecks      = prometheus.NewDesc("sfkit_proxy_holepunch_checks_total", "Connectivity checks (hole punching) sent and answered.", []string{"outcome"}, nil)
	descSTUN        = prometheus.NewDesc("sfkit_proxy_stun_refreshes_total", "STUN binding rounds by outcome.", []string{"outcome"}, nil)
	descMapping     = prometheus.NewDesc("sfkit_proxy_stun_mapping_changes_total", "Times the external address changed.", nil, nil)
	descSOCKS       = prometheus.NewDesc("sfkit_proxy_socks_requests_total", "SOCKS CONNECT requests by target and outcome.", []string{"target", "outcome"}, nil)
	descRegistryUp  = prometheus.NewDesc("sfkit_proxy_registry_up", "1 if the last registry request succeeded.", nil, nil)
	descResumed     = prometheus.NewDesc("sfkit_proxy_flows_resumed_total", "Tunnelled TCP connections carried on over a new QUIC connection after their path died.", nil, nil)
	descMoved       = prometheus.NewDesc("sfkit_proxy_flows_moved_total", "Tunnelled TCP connections moved between the QUIC connections of a peer's pool.", nil, nil)
	descStalls      = prometheus.NewDesc("sfkit_proxy_path_stalls_total", "Paths dropped because they carried nothing though packets arrived, and a full-size probe got no answer (a path MTU that shrank).", nil, nil)
	descRaises      = prometheus.NewDesc("sfkit_proxy_packet_size_raises_total", "Connections replaced because the path carried larger packets again (its MTU grew back).", nil, nil)
	descPeerPacket  = prometheus.NewDesc("sfkit_proxy_peer_packet_size_bytes", "The largest QUIC packet sent to the peer now, in bytes of UDP payload (path MTU discovery).", []string{"peer"}, nil)
	descRelaySess   = prometheus.NewDesc("sfkit_proxy_peer_relay_sessions", "Sessions this party relays for other parties now.", nil, nil)
	descRelayBytes  = prometheus.NewDesc("sfkit_proxy_peer_relay_bytes_total", "Bytes this party relayed for other parties.", nil, nil)
	descRelayDrops  = prometheus.NewDesc("sfkit_proxy_peer_relay_dropped_total", "Relayed packets dropped: over the rate, a full queue, an unknown session or a sender that is not its end.", nil, nil)
	descRelayPair   = prometheus.NewDesc("sfkit_proxy_peer_relay_session_bytes_total", "Bytes relayed in a live session, by its ends and direction (from, to).", []string{"from", "to"}, nil)
	descRelayRefuse = prometheus.NewDesc("sfkit_proxy_peer_relay_refused_total", "Relay sessions refused.", nil, nil)
	descRelayRaw    = prometheus.NewDesc("sfkit_proxy_peer_relay_raw_packets_total", "Relayed packets taken (in) and sent (out) raw, as UDP packets of their own rather than datagrams, as a relay or an end.", []string{"direction"}, nil)
	descPoolOpened  = prometheus.NewDesc("sfkit_proxy_pool_conns_opened_total", "QUIC connections added to peers' pools.", nil, nil)
	descPeerQUIC    = prometheus.NewDesc("sfkit_proxy_peer_quic_conns", "QUIC connections to the peer (its pool).", []string{"peer"}, nil)
	descPeerWaiting = prometheus.NewDesc("sfkit_proxy_peer_waiting_connections", "The peer's tunnelled connections waiting for a local program to listen on their port.", []string{"peer"}, nil)
	descFlowResets  = prometheus.NewDesc("sfkit_proxy_flows_reset_total", "Tunnelled TCP connections reset, by reason.", []string{"reason"}, nil)
	descRepairs     = prometheus.NewDesc("sfkit_proxy_path_repairs_total", "Paths to a peer repaired after they died.", []string{"peer"}, nil)
	descLastRepair  = prometheus.NewDesc("sfkit_proxy_path_last_repair_seconds", "How long the last repair of the path to a peer took.", []string{"peer"}, nil)
	descGwBytes     = prometheus.NewDesc("sfkit_proxy_gateway_bytes_total", "Bytes a gateway carried, toward its peer (sent) and back (received).", []string{"gateway", "direction"}, nil)
	descGwConns     = prometheus.NewDesc("sfkit_proxy_gateway_connections_total", "Connections a gateway accepted and carried.", []string{"gateway"}, nil)
	descGwOpen      = prometheus.NewDesc("sfkit_proxy_gateway_open_connections", "A gateway's connections open now.", []string{"gateway"}, nil)
	descGwRefused   = prometheus.NewDesc("sfkit_proxy_gateway_refused_total", "Connections a gateway refused, by reason (source, rate, max_conns, tunnel).", []string{"gateway", "reason"}, nil)
	descUDPDgrams   = prometheus.NewDesc("sfkit_proxy_udp_datagrams_total", "UDP datagrams through the tunnel: this party's associations' to peers (sent) and back (received), peers' to local ports here (served) and back (answered).", []string{"direction"}, nil)
	descUDPBytes    = prometheus.NewDesc("sfkit_proxy_udp_bytes_total", "Payload bytes of those UDP datagrams, by the same directions.", []string{"direction"}, nil)
	descUDPDropped  = prometheus.NewDesc("sfkit_proxy_udp_dropped_total", "UDP datagrams dropped, by reason.", []string{"reason"}, nil)
	descUDPAssocs   = prometheus.NewDesc("sfkit_proxy_udp_associations", "UDP associations open here (SOCKS UDP ASSOCIATE, UDP gateways' clients).", nil, nil)
	descUDPSockets  = prometheus.NewDesc("sfkit_proxy_udp_peer_sockets", "Local UDP sockets held for peers' associations.", nil, nil)
	peerStatesShown = []string{"connecting", "direct", "relayed", "repairing", "unreachable"}
)

type collector struct{ status func() status.Status }

func (c collector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(c, ch) }

func (c collector) Collect(ch chan<- prometheus.Metric) {
	s := c.status()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, p := range s.Peers {
		pid := strconv.Itoa(p.PID)
		for _, t := range p.Traffic {
			counter(descPeerBytes, t.BytesSent, pid, t.Path, "sent")
			counter(descPeerBytes, t.BytesReceived, pid, t.Path, "received")
			counter(descPeerConns, t.Conns, pid, t.Path)
		}
		gauge(descPeerOpen, float64(p.OpenConns), pid)
		gauge(descPeerQUIC, float64(p.QUICConns), pid)
		gauge(descPeerWaiting, float64(p.WaitingConns), pid)
		for _, st := range peerStatesShown {
			v := 0.0
			if p.State == st {
				v = 1
			}
			gauge(descPeerState, v, pid, st)
		}
		gauge(descPeerRTT, p.RTTMillis/1000, pid)
		if p.PacketSize > 0 {
			gauge(descPeerPacket, float64(p.PacketSize), pid)
		}
		counter(descRepairs, p.Repairs, pid)
		gauge(descLastRepair, p.LastRepairSeconds, pid)
	}
	k := s.Counters
	counter(descHandshakes, k.DialsOK, "dial", "ok")
	counter(descHandshakes, k.DialsFailed, "dial", "failed")
	counter(descHandshakes, k.AcceptsOK, "accept", "ok")
	counter(descHandshakes, k.AcceptsRejected, "accept", "rejected")
	counter(descChecks, k.ChecksSent, "sent")
	counter(descChecks, k.ChecksAnswered, "answered")
	counter(descSTUN, s.STUN.Refreshes, "ok")
	counter(descSTUN, s.STUN.Failures, "failed")
	counter(descMapping, s.STUN.MappingChanges)
	keys := make([]string, 0, len(k.SOCKS))
	for key := range k.SOCKS {
		keys = append(keys, key)
	}
	sort.Strings(keys)
	for _, key := range keys {
		target, outcome, _ := strings.Cut(key, "/")
		counter(descSOCKS, k.SOCKS[key], target, outcome)
	}
	counter(descResumed, k.FlowsResumed)
	counter(descMoved, k.FlowsMoved)
	counter(descPoolOpened, k.PoolConnsOpened)
	counter(descStalls, k.PathStalls)
	counter(descRaises, k.PacketSizeRaises)
	gauge(descRelaySess, float64(s.PeerRelay.Sessions))
	counter(descRelayBytes, s.PeerRelay.BytesForwarded)
	counter(descRelayDrops, s.PeerRelay.Dropped)
	counter(descRelayRefuse, s.PeerRelay.Refused)
	counter(descRelayRaw, s.PeerRelay.RawIn, "in")
	counter(descRelayRaw, s.PeerRelay.RawOut, "out")
	pairs := map[[2]int]uint64{} // sessions of one pair add up: one series each way
	for _, r := range s.PeerRelay.Relaying {
		pairs[[2]int{r.A, r.B}] += r.BytesAB
		pairs[[2]int{r.B, r.A}] += r.BytesBA
	}
	for _, k := range slices.SortedFunc(maps.Keys(pairs), func(a, b [2]int) int { return cmp.Or(a[0]-b[0], a[1]-b[1]) }) {
		counter(descRelayPair, pairs[k], strconv.Itoa(k[0]), strconv.Itoa(k[1]))
	}
	for _, why := range slices.Sorted(maps.Keys(k.FlowsReset)) {
		counter(descFlowResets, k.FlowsReset[why], why)
	}
	for _, g := range s.Gateways { // at most gateway.MaxGateways: a bounded label
		name := g.Proto + "/" + g.Listen
		counter(descGwBytes, g.BytesToPeer, name, "sent")
		counter(descGwBytes, g.BytesFromPeer, name, "received")
		counter(descGwConns, g.Conns, name)
		gauge(descGwOpen, float64(g.Open), name)
		for _, why := range gateway.ReasonNames() {
			counter(descGwRefused, g.Refused[why], name, why)
		}
	}
	u := s.UDP
	for _, d := range []struct {
		name     string
		n, bytes uint64
	}{{"sent", u.Sent, u.SentBytes}, {"received", u.Received, u.ReceivedBytes}, {"served", u.Served, u.ServedBytes}, {"answered", u.Answered, u.AnsweredBytes}} {
		counter(descUDPDgrams, d.n, d.name)
		counter(descUDPBytes, d.bytes, d.name)
	}
	for _, why := range dgram.DropReasons() {
		counter(descUDPDropped, u.Dropped[why], why)
	}
	gauge(descUDPAssocs, float64(u.Associations))
	gauge(descUDPSockets, float64(u.PeerSockets))
	up := 0.0
	if s.Registry.Reachable {
		up = 1
	}
	gauge(descRegistryUp, up)
}
