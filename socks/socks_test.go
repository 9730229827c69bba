package socks

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/splice"
)

// echoServer answers each connection with what it reads.
func echoServer(t *testing.T) *net.TCPListener {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	testkit.Serve(t, ln, func(c net.Conn) { defer c.Close(); io.Copy(c, c) })
	return ln
}

// closedPort is a loopback port nothing listens on.
func closedPort(t *testing.T) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

type dialRecord struct {
	mu    sync.Mutex
	calls []string
}

func startServer(t *testing.T, opts Options) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- New(opts).Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Serve = %v; want context.Canceled", err)
		}
	})
	return ln.Addr().String()
}

// greet connects to proxy and negotiates no authentication.
func greet(t *testing.T, proxy string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", proxy)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte{5, 1, 0})
	var sel [2]byte
	if _, err := io.ReadFull(c, sel[:]); err != nil || sel != [2]byte{5, 0} {
		t.Fatalf("method selection = %v, %v", sel, err)
	}
	return c
}

// connect performs a SOCKS5 CONNECT and returns the reply code and conn.
func connect(t *testing.T, proxy string, atyp byte, host string, port uint16) (byte, net.Conn) {
	t.Helper()
	c := greet(t, proxy)
	req := []byte{5, 1, 0, atyp}
	if atyp == 3 {
		req = append(req, byte(len(host)))
		req = append(req, host...)
	} else {
		req = append(req, netip.MustParseAddr(host).AsSlice()...)
	}
	req = append(req, byte(port>>8), byte(port))
	c.Write(req)
	var rep [10]byte
	if _, err := io.ReadFull(c, rep[:]); err != nil {
		t.Fatalf("reply: %v", err)
	}
	c.SetDeadline(time.Time{})
	return rep[1], c
}

func TestRouting(t *testing.T) {
	echo := echoServer(t)
	echoPort := uint16(echo.Addr().(*net.TCPAddr).Port)
	rec := &dialRecord{}
	proxy := startServer(t, Options{
		Peers: netip.MustParsePrefix("10.0.0.0/24"), Self: 0, Direct: true,
		PeerAllows: func(pid int, port uint16) bool { return port != 22 },
		DialPeer: func(ctx context.Context, pid int, port uint16) (splice.Conn, error) {
			rec.mu.Lock()
			rec.calls = append(rec.calls, fmt.Sprintf("%d:%d", pid, port))
			rec.mu.Unlock()
			if pid == 9 {
				return nil, fmt.Errorf("party 9 port %d: %w", port, syscall.ECONNREFUSED)
			}
			c, err := net.Dial("tcp", echo.Addr().String()) // stands for the tunnel
			if err != nil {
				return nil, err
			}
			return tcpConn{c.(*net.TCPConn)}, nil
		},
	})
	tests := []struct {
		name  string
		atyp  byte
		host  string
		port  uint16
		code  byte
		calls string
	}{
		{"peer by IPv4", 1, "10.0.0.2", 8020, 0, "2:8020"},
		{"peer by name (socks5h)", 3, "10.0.0.3", 8021, 0, "3:8021"},
		{"own virtual address is local", 1, "10.0.0.0", echoPort, 0, ""},
		{"direct by name", 3, "localhost", echoPort, 0, ""},
		{"peer port not published", 1, "10.0.0.2", 22, 2, ""},
		{"peer refuses", 1, "10.0.0.9", 80, 5, "9:80"},
		{"empty name", 3, "", 80, 2, ""},
		{"direct to a closed port", 1, "127.0.0.1", closedPort(t), 5, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec.mu.Lock()
			rec.calls = nil
			rec.mu.Unlock()
			code, c := connect(t, proxy, tt.atyp, tt.host, tt.port)
			if code != tt.code {
				t.Fatalf("CONNECT %s:%d reply = %d; want %d", tt.host, tt.port, code, tt.code)
			}
			rec.mu.Lock()
			calls := strings.Join(rec.calls, ",")
			rec.mu.Unlock()
			if calls != tt.calls {
				t.Errorf("peer dials = %q; want %q", calls, tt.calls)
			}
			if code != 0 {
				return
			}
			c.Write([]byte("hello"))
			buf := make([]byte, 5)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello" {
				t.Errorf("echo = %q, %v", buf, err)
			}
		})
	}
}

// refusedError stands for quicmux's refusals (a port refused, a budget
// spent): no errno in it, yet it is syscall.ECONNREFUSED by errors.Is.
type refusedError struct{}

func (refusedError) Error() string        { return "too many open tunnelled connections" }
func (refusedError) Is(target error) bool { return target == syscall.ECONNREFUSED }

// TestDialErrorReplies: the reply to a CONNECT whose dial fails is chosen
// by the error's value (errors.Is), never by its text.
func TestDialErrorReplies(t *testing.T) {
	const (
		netUnreachable  = 3
		hostUnreachable = 4
		refused         = 5
	)
	tests := []struct {
		name string
		err  error
		want byte
	}{
		{"ECONNREFUSED wrapped", fmt.Errorf("party 1 port 80: %w", syscall.ECONNREFUSED), refused},
		{"the kernel's refusal", &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}, refused},
		{"an error that is ECONNREFUSED", refusedError{}, refused},
		{"an error that is ECONNREFUSED, wrapped", fmt.Errorf("party 1 port 80: %w", refusedError{}), refused},
		{"ENETUNREACH wrapped", fmt.Errorf("dial: %w", os.NewSyscallError("connect", syscall.ENETUNREACH)), netUnreachable},
		{"ENETUNREACH whose text says refused", fmt.Errorf("refused: %w", syscall.ENETUNREACH), netUnreachable},
		{"refused in the text only", errors.New("connection refused by peer's local port"), hostUnreachable},
		{"unreachable network in the text only", errors.New("network is unreachable"), hostUnreachable},
		{"no path yet", fmt.Errorf("party 1: %w", context.DeadlineExceeded), hostUnreachable},
	}
	var dialErr error // what DialPeer fails with
	var reported error
	var mu sync.Mutex
	proxy := startServer(t, Options{
		Peers: netip.MustParsePrefix("10.0.0.0/24"), Self: 0,
		DialPeer: func(context.Context, int, uint16) (splice.Conn, error) {
			mu.Lock()
			defer mu.Unlock()
			return nil, dialErr
		},
		OnConnect: func(_ string, _ int, err error) {
			mu.Lock()
			defer mu.Unlock()
			reported = err
		},
	})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mu.Lock()
			dialErr, reported = tt.err, nil
			mu.Unlock()
			if code, _ := connect(t, proxy, 1, "10.0.0.1", 80); code != tt.want {
				t.Errorf("CONNECT failing with %q = reply %d; want %d", tt.err, code, tt.want)
			}
			mu.Lock()
			got := reported
			mu.Unlock()
			if !errors.Is(got, tt.err) {
				t.Errorf("OnConnect told %v; want %v", got, tt.err)
			}
			if err := replyError(tt.err); !errors.Is(err, tt.err) {
				t.Errorf("replyError(%q) = %v; want it to wrap the cause", tt.err, err)
			}
		})
	}
}

func TestDirectDenied(t *testing.T) {
	echo := echoServer(t)
	proxy := startServer(t, Options{Peers: netip.MustParsePrefix("10.0.0.0/24"), Direct: false,
		DialPeer: func(context.Context, int, uint16) (splice.Conn, error) { return nil, errors.New("unused") }})
	if code, _ := connect(t, proxy, 1, "127.0.0.1", uint16(echo.Addr().(*net.TCPAddr).Port)); code != 2 {
		t.Errorf("direct CONNECT with --direct deny = %d; want 2 (not allowed)", code)
	}
}

func TestStalledClientTimesOutWithoutBlockingOthers(t *testing.T) {
	echo := echoServer(t)
	proxy := startServer(t, Options{Peers: netip.MustParsePrefix("10.0.0.0/24"), Direct: true,
		HandshakeTimeout: 300 * time.Millisecond,
		DialPeer:         func(context.Context, int, uint16) (splice.Conn, error) { return nil, errors.New("unused") }})
	stalled, err := net.Dial("tcp", proxy)
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Close()
	stalled.Write([]byte{5}) // a greeting cut short, then silence
	// Meanwhile another client is served.
	if code, _ := connect(t, proxy, 1, "127.0.0.1", uint16(echo.Addr().(*net.TCPAddr).Port)); code != 0 {
		t.Errorf("second client's CONNECT = %d; want 0", code)
	}
	stalled.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(stalled); err != nil {
		t.Errorf("stalled client: %v; want the server to close it (EOF)", err)
	}
}

// resetAfter serves each connection by writing n bytes and then resetting
// it; it reports on got what it read before (an error when the client
// reset the connection).
func resetAfter(t *testing.T, n int, got chan<- error) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	testkit.Serve(t, ln, func(c net.Conn) {
		tc := c.(*net.TCPConn)
		if n > 0 {
			tc.Write(make([]byte, n))
			time.Sleep(50 * time.Millisecond)
			tc.SetLinger(0)
			tc.Close()
			return
		}
		_, err := io.Copy(io.Discard, tc)
		got <- err
		tc.Close()
	})
	return ln
}

// TestResetsStayResets: a target that resets its connection resets the
// SOCKS client's (never a clean EOF, which would look like a complete
// transfer), and a client that resets resets the target's, through the
// tunnel and direct alike.
func TestResetsStayResets(t *testing.T) {
	got := make(chan error, 4)
	resetter := resetAfter(t, 100_000, nil)
	reader := resetAfter(t, 0, got)
	var target string // where the fake tunnel goes
	proxy := startServer(t, Options{
		Peers: netip.MustParsePrefix("10.0.0.0/24"), Self: 0, Direct: true,
		DialPeer: func(ctx context.Context, pid int, port uint16) (splice.Conn, error) {
			c, err := net.Dial("tcp", target)
			if err != nil {
				return nil, err
			}
			return tcpConn{c.(*net.TCPConn)}, nil
		},
	})
	for _, via := range []struct {
		name string
		atyp byte
		host func(net.Listener) (string, uint16)
	}{
		{"tunnel", 1, func(ln net.Listener) (string, uint16) { target = ln.Addr().String(); return "10.0.0.1", 9 }},
		{"direct", 1, func(ln net.Listener) (string, uint16) { return "127.0.0.1", uint16(ln.Addr().(*net.TCPAddr).Port) }},
	} {
		t.Run(via.name+"/far end resets", func(t *testing.T) {
			host, port := via.host(resetter)
			code, c := connect(t, proxy, via.atyp, host, port)
			if code != 0 {
				t.Fatalf("CONNECT = %d", code)
			}
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, err := io.Copy(io.Discard, c)
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("client read %d bytes, then %v; want ECONNRESET", n, err)
			}
		})
		t.Run(via.name+"/client resets", func(t *testing.T) {
			host, port := via.host(reader)
			code, c := connect(t, proxy, via.atyp, host, port)
			if code != 0 {
				t.Fatalf("CONNECT = %d", code)
			}
			c.Write([]byte("partial request"))
			time.Sleep(50 * time.Millisecond)
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
			select {
			case err := <-got:
				if !errors.Is(err, syscall.ECONNRESET) {
					t.Errorf("target read to %v; want ECONNRESET", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("target never saw the client's end")
			}
		})
	}
}
