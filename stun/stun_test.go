package stun

import (
	"context"
	"encoding/hex"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	pion "github.com/pion/stun/v3"
)

// coturnResponse is the answer of a real coturn 4.6.1 (Debian 12) to a
// binding request with transaction ID 01..0c from 127.0.0.1:40404: it carries
// XOR-MAPPED-ADDRESS, MAPPED-ADDRESS, RESPONSE-ORIGIN and SOFTWARE, and no
// FINGERPRINT.
const coturnResponse = "0101003c2112a4420102030405060708090a0b0c002000080001bcc65e12a4430001000800019dd47f000001802b0008000187dc7f00000180220014436f7475726e2d342e362e312027476f72737427"

func TestParseCoturnResponse(t *testing.T) {
	b, _ := hex.DecodeString(coturnResponse)
	m, err := Parse(b)
	if err != nil {
		t.Fatalf("Parse(coturn) = %v", err)
	}
	want := netip.MustParseAddrPort("127.0.0.1:40404")
	if m.Request || m.Mapped != want {
		t.Errorf("Parse(coturn) = request %v mapped %v; want response mapped %v", m.Request, m.Mapped, want)
	}
	if m.TxID != (TxID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}) {
		t.Errorf("TxID = %x", m.TxID)
	}
	if err := m.Verify("anything"); !errors.Is(err, ErrIntegrity) {
		t.Errorf("Verify on a message without integrity = %v; want ErrIntegrity", err)
	}
}

func TestRoundTrip(t *testing.T) {
	tx := NewTxID()
	mapped := netip.MustParseAddrPort("203.0.113.7:4242")
	tests := []struct {
		name    string
		pkt     []byte
		request bool
		user    string
		key     string
	}{
		{"plain request", Request(tx), true, "", ""},
		{"check request", CheckRequest(tx, "s:1:0", "key-of-party-one"), true, "s:1:0", "key-of-party-one"},
		{"plain response", Response(tx, mapped, ""), false, "", ""},
		{"check response", Response(tx, mapped, "key-of-party-one"), false, "", "key-of-party-one"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if !Is(tt.pkt) {
				t.Fatalf("Is(%x) = false", tt.pkt)
			}
			m, err := Parse(tt.pkt)
			if err != nil {
				t.Fatalf("Parse = %v", err)
			}
			if m.TxID != tx || m.Request != tt.request || m.Username != tt.user {
				t.Errorf("Parse = tx %x request %v user %q; want %x %v %q", m.TxID, m.Request, m.Username, tx, tt.request, tt.user)
			}
			if !tt.request && m.Mapped != mapped {
				t.Errorf("Mapped = %v; want %v", m.Mapped, mapped)
			}
			if tt.key != "" {
				if err := m.Verify(tt.key); err != nil {
					t.Errorf("Verify(right key) = %v", err)
				}
				if err := m.Verify("wrong-key-wrong-key"); !errors.Is(err, ErrIntegrity) {
					t.Errorf("Verify(wrong key) = %v; want ErrIntegrity", err)
				}
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	good := Request(NewTxID())
	flipped := append([]byte(nil), good...)
	flipped[len(flipped)-1] ^= 0xff // breaks the fingerprint
	tests := []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"quic long header", []byte{0xc0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0}},
		{"truncated", good[:10]},
		{"bad fingerprint", flipped},
		{"response without address", pion.MustBuild(pion.BindingSuccess, pion.TransactionID).Raw},
		{"error response", pion.MustBuild(pion.BindingError, pion.TransactionID).Raw},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if m, err := Parse(tt.b); err == nil {
				t.Errorf("Parse(%x) = %+v; want error", tt.b, m)
			}
		})
	}
}

func TestAnswer(t *testing.T) {
	from := netip.MustParseAddrPort("198.51.100.9:999")
	tx := NewTxID()
	signed, _ := Parse(CheckRequest(tx, "s:1:0", "the-right-key-123"))
	plain, _ := Parse(Request(tx))
	tests := []struct {
		name  string
		m     *Message
		key   string
		reply bool
	}{
		{"plain server answers plain request", plain, "", true},
		{"check with right key", signed, "the-right-key-123", true},
		{"check with wrong key ignored", signed, "another-key-12345", false},
		{"unsigned request ignored by a keyed responder", plain, "the-right-key-123", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := Answer(tt.m, from, tt.key)
			if (resp != nil) != tt.reply {
				t.Fatalf("Answer = %x; want reply %v", resp, tt.reply)
			}
			if resp == nil {
				return
			}
			m, err := Parse(resp)
			if err != nil || m.Mapped != from || m.TxID != tx {
				t.Errorf("reply = %+v, %v; want mapped %v", m, err, from)
			}
			if tt.key != "" && m.Verify(tt.key) != nil {
				t.Error("keyed reply does not verify")
			}
		})
	}
}

// loopbackClient is a client on its own UDP socket, fed by a reader as
// quicmux feeds it from the shared socket.
func loopbackClient(t *testing.T) (*Client, *net.UDPConn) {
	t.Helper()
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	c := NewClient(pc)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if m, err := Parse(buf[:n]); err == nil {
				c.Handle(m, from)
			}
		}
	}()
	t.Cleanup(func() { pc.Close(); <-done })
	return c, pc
}

func startServer(t *testing.T) netip.AddrPort {
	t.Helper()
	spc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, spc, slog.New(slog.DiscardHandler)) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Serve = %v; want context.Canceled", err)
		}
	})
	return spc.LocalAddr().(*net.UDPAddr).AddrPort()
}

func TestBindLoopback(t *testing.T) {
	server := startServer(t)
	c, pc := loopbackClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := c.Bind(ctx, server)
	if err != nil {
		t.Fatalf("Bind = %v", err)
	}
	if want := pc.LocalAddr().(*net.UDPAddr).AddrPort(); got != want {
		t.Errorf("Bind = %v; want %v", got, want)
	}
}

func TestBindTimesOutWithoutServer(t *testing.T) {
	c, _ := loopbackClient(t)
	// A port with nobody behind it: take one and close it.
	dead, _ := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	addr := dead.LocalAddr().(*net.UDPAddr).AddrPort()
	dead.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := c.Bind(ctx, addr); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Bind(dead) = %v; want DeadlineExceeded", err)
	}
}

func TestKeepaliveReportsMappingAndNAT(t *testing.T) {
	s1, s2 := startServer(t), startServer(t)
	c, pc := loopbackClient(t)
	got := make(chan Mapping, 1)
	ctx, cancel := context.WithCancel(context.Background())
	k := &Keepalive{Client: c, Servers: []string{"127.0.0.1:1", s1.String(), s2.String()}, Network: "udp4",
		OnMapping: func(m Mapping) { got <- m; cancel() }}
	go k.Run(ctx)
	select {
	case m := <-got:
		want := Mapping{Addr: pc.LocalAddr().(*net.UDPAddr).AddrPort(), NAT: NATEndpointIndependent}
		if m != want {
			t.Errorf("mapping = %+v; want %+v", m, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no mapping reported")
	}
}

func FuzzParse(f *testing.F) {
	b, _ := hex.DecodeString(coturnResponse)
	f.Add(b)
	tx := NewTxID()
	f.Add(Request(tx))
	f.Add(CheckRequest(tx, "s:1:0", "k0123456789abcdef"))
	f.Add(Response(tx, netip.MustParseAddrPort("[2001:db8::1]:9"), "k0123456789abcdef"))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Parse(b)
		if err != nil {
			return
		}
		m.Verify("k0123456789abcdef")
		Answer(m, netip.MustParseAddrPort("127.0.0.1:1"), "k0123456789abcdef")
	})
}

// discard is a Sender that writes nowhere.
type discard struct{}

func (discard) WriteTo(b []byte, _ net.Addr) (int, error) { return len(b), nil }

// TestPendingIsBounded: a Client remembers at most maxPending unanswered
// transactions, refusing to send more (ErrTooManyPending) rather than
// growing, and an answer still reaches one it remembers.
func TestPendingIsBounded(t *testing.T) {
	c := NewClient(discard{})
	to := netip.MustParseAddrPort("127.0.0.1:9")
	var first TxID
	for i := range maxPending {
		tx := NewTxID()
		if i == 0 {
			first = tx
		}
		if err := c.Send(to, Request(tx), tx, "", func(Result) {}); err != nil {
			t.Fatalf("send %d of %d: %v", i, maxPending, err)
		}
	}
	tx := NewTxID()
	if err := c.Send(to, Request(tx), tx, "", func(Result) {}); !errors.Is(err, ErrTooManyPending) {
		t.Fatalf("send past the bound = %v; want ErrTooManyPending", err)
	}
	c.mu.Lock()
	n := len(c.pending)
	c.mu.Unlock()
	if n != maxPending {
		t.Errorf("%d transactions remembered; want %d", n, maxPending)
	}
	m, err := Parse(Response(first, to, ""))
	if err != nil {
		t.Fatal(err)
	}
	if !c.Handle(m, to) {
		t.Error("the answer to a remembered transaction was not taken")
	}
}
