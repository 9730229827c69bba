package relay

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"sfkit-proxy/relay/relaytest"
)

func TestParseURL(t *testing.T) {
	tests := []struct {
		in, want string
		err      bool
	}{
		{"turn:relay.example.org", "turn:relay.example.org:3478?transport=udp", false},
		{"turn:203.0.113.10:3478?transport=tcp", "turn:203.0.113.10:3478?transport=tcp", false},
		{"turn:[2001:db8::1]:3478", "turn:[2001:db8::1]:3478?transport=udp", false},
		{"turns:relay.example.org", "turns:relay.example.org:5349", false},
		{"turns:relay.example.org:443?transport=tcp", "turns:relay.example.org:443", false},
		{"stun:relay.example.org", "", true},
		{"turns:x?transport=udp", "", true},
		{"turn:x:0", "", true},
		{"turn:", "", true},
		{"turn:a/b", "", true},
		{"turn:[", "", true},
		{"turn:-x.example", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			u, err := ParseURL(tt.in)
			if (err != nil) != tt.err || (err == nil && u.String() != tt.want) {
				t.Errorf("ParseURL(%q) = %v, %v; want %q (error %v)", tt.in, u, err, tt.want, tt.err)
			}
		})
	}
}

func TestRESTCredentials(t *testing.T) {
	// base64(HMAC-SHA1(secret, "EXPIRY:USER")); the expected password is
	// openssl's: printf '1700000000:party1' | openssl dgst -sha1 -hmac north -binary | base64
	u, p := RESTCredentials("north", "party1", time.Unix(1700000000, 0))
	if u != "1700000000:party1" || p != "cY4ydqZYJMOemq21D8wybLrhnMg=" {
		t.Errorf("RESTCredentials = %q, %q", u, p)
	}
}

// exchange sends through the allocation to a UDP socket and back.
func exchange(t *testing.T, a *Allocation) {
	t.Helper()
	peer, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	if _, err := a.Conn.WriteTo([]byte("through the relay"), peer.LocalAddr()); err != nil {
		t.Fatalf("WriteTo: %v", err)
	}
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 100)
	n, from, err := peer.ReadFromUDPAddrPort(buf)
	if err != nil || string(buf[:n]) != "through the relay" {
		t.Fatalf("peer got %q, %v", buf[:n], err)
	}
	if from != a.Addr {
		t.Errorf("peer saw it from %v; want the relayed address %v", from, a.Addr)
	}
	peer.WriteToUDPAddrPort([]byte("and back"), from)
	a.Conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _, err = a.Conn.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "and back" {
		t.Fatalf("allocation got %q, %v", buf[:n], err)
	}
}

func TestAllocateOverEachTransport(t *testing.T) {
	c := relaytest.Start(t, relaytest.Options{})
	for _, raw := range []string{"turn:" + c.Addr() + "?transport=udp", "turn:" + c.Addr() + "?transport=tcp", "turns:" + c.TLSAddr()} {
		t.Run(raw, func(t *testing.T) {
			u, err := ParseURL(raw)
			if err != nil {
				t.Fatal(err)
			}
			a, err := Allocate(context.Background(), Options{URLs: []URL{u}, User: c.User, Password: c.Pass, RootCAs: c.RootCAs})
			if err != nil {
				t.Fatalf("Allocate = %v", err)
			}
			defer a.Conn.Close()
			exchange(t, a)
		})
	}
}

func TestAllocateFallsThroughAndRejects(t *testing.T) {
	c := relaytest.Start(t, relaytest.Options{Secret: "the-shared-secret"})
	good, _ := ParseURL("turn:" + c.Addr())
	dead, _ := ParseURL("turn:127.0.0.1:1?transport=tcp")
	a, err := Allocate(context.Background(), Options{URLs: []URL{dead, good}, Secret: "the-shared-secret", User: "party1"})
	if err != nil {
		t.Fatalf("Allocate(dead, good) with the REST secret = %v", err)
	}
	if a.Server != good.String() {
		t.Errorf("server = %q; want %q", a.Server, good)
	}
	exchange(t, a)
	a.Conn.Close()
	_, err = Allocate(context.Background(), Options{URLs: []URL{good}, Secret: "wrong-secret", Timeout: 3 * time.Second})
	if err == nil || !strings.Contains(err.Error(), good.String()) {
		t.Errorf("Allocate with a wrong secret = %v; want an error naming the server", err)
	}
}

func FuzzParseRelayURL(f *testing.F) {
	for _, s := range []string{"turn:relay.example.org", "turn:203.0.113.10:3478?transport=tcp", "turns:[2001:db8::1]:5349"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURL(s)
		if err != nil {
			return
		}
		again, err := ParseURL(u.String())
		if err != nil || again != u {
			t.Errorf("ParseURL(%q).String() = %q parses back as %+v, %v", s, u, again, err)
		}
	})
}

// runRenewing runs a Renewing over a (nil: none yet) with the test
// server's credentials at u until the test ends; each new relayed
// address comes on the channel.
func runRenewing(t *testing.T, a *Allocation, u URL) (*Renewing, <-chan netip.AddrPort) {
	r := NewRenewing(a, Options{URLs: []URL{u}, User: "party", Password: "relay-password", Timeout: 2 * time.Second})
	changed := make(chan netip.AddrPort, 4)
	r.OnChange = func(a netip.AddrPort, _ string) { changed <- a }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		r.Close()
	})
	return r, changed
}

// TestRenewing: a Renewing whose server is not up at start allocates once
// it is, and allocates again when the server restarts (its TCP connection
// resets and the old allocation is gone), telling OnChange each time; the
// same socket carries through each allocation.
func TestRenewing(t *testing.T) {
	port := relaytest.FreePort(t)
	u, err := ParseURL(fmt.Sprintf("turn:127.0.0.1:%d?transport=tcp", port))
	if err != nil {
		t.Fatal(err)
	}
	r, changed := runRenewing(t, nil, u)
	if _, err := r.WriteTo([]byte("lost"), &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9}); err != nil {
		t.Errorf("a write with no allocation = %v; want it dropped quietly", err)
	}
	// A read waiting for an allocation ends when a deadline is set (as
	// quic-go's Transport.Close does to end its reader).
	read := make(chan error, 1)
	go func() {
		_, _, err := r.ReadFrom(make([]byte, 64))
		read <- err
	}()
	time.Sleep(100 * time.Millisecond)
	r.SetReadDeadline(time.Now())
	select {
	case err := <-read:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("ReadFrom after SetReadDeadline(now) = %v; want a deadline error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a read waiting for an allocation did not end at its deadline")
	}
	r.SetReadDeadline(time.Time{})
	wait := func(what string) netip.AddrPort {
		t.Helper()
		select {
		case a := <-changed:
			return a
		case <-time.After(40 * time.Second):
			t.Fatalf("no allocation %s", what)
		}
		return netip.AddrPort{}
	}
	c := relaytest.Start(t, relaytest.Options{Port: port})
	first := wait("once the server is up")
	exchange(t, &Allocation{Conn: r, Addr: first})
	c.Stop()
	relaytest.Start(t, relaytest.Options{Port: port})
	second := wait("after the server restarted")
	if r.Current() == nil || r.Current().Addr != second {
		t.Errorf("current allocation %v; want the one told, %v", r.Current(), second)
	}
	exchange(t, &Allocation{Conn: r, Addr: second})
}

// TestRenewingAfterUDPRestart: over UDP nothing fails when the server
// restarts (its Binding answers say the same address; the socket is
// fine), but the allocation is gone: Renewing asks the server whether it
// still holds it, and allocates again, telling OnChange.
func TestRenewingAfterUDPRestart(t *testing.T) {
	port := relaytest.FreePort(t)
	u, err := ParseURL(fmt.Sprintf("turn:127.0.0.1:%d?transport=udp", port))
	if err != nil {
		t.Fatal(err)
	}
	c := relaytest.Start(t, relaytest.Options{Port: port})
	a, err := Allocate(context.Background(), Options{URLs: []URL{u}, User: "party", Password: "relay-password", Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	r, changed := runRenewing(t, a, u)
	exchange(t, &Allocation{Conn: r, Addr: a.Addr})
	time.Sleep(2 * CheckInterval) // checks that find it held
	select {
	case a := <-changed:
		t.Fatalf("allocated again (%v) while the server held the allocation", a)
	default:
	}
	c.Stop()
	relaytest.Start(t, relaytest.Options{Port: port})
	select {
	case second := <-changed:
		exchange(t, &Allocation{Conn: r, Addr: second})
	case <-time.After(20 * time.Second):
		t.Fatal("no new allocation after the server restarted")
	}
}
