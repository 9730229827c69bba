package admin

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"sfkit-proxy/gateway"
	"sfkit-proxy/internal/testkit"
	"sfkit-proxy/splice"
	"sfkit-proxy/status"
)

type tcpConn struct{ *net.TCPConn }

func (c tcpConn) Reset() error { c.SetLinger(0); return c.Close() }

// TestGatewayAPI: the gateway routes add, get, list and remove gateways,
// refuse changes without the action header, refuse what the gateways
// refuse with the reason and its status code, and what they add carries
// connections (here to a local echo, standing for party 1's port).
func TestGatewayAPI(t *testing.T) {
	echo := testkit.Echo(t)
	gws := gateway.New(gateway.Options{Self: 0,
		PeerAllows: func(pid int, port uint16) bool { return port != 22 },
		DialPeer: func(ctx context.Context, pid int, port uint16) (splice.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", "127.0.0.1:"+strconv.Itoa(int(echo)))
			if err != nil {
				return nil, err
			}
			return tcpConn{c.(*net.TCPConn)}, nil
		}})
	t.Cleanup(gws.Close)
	ts := httptest.NewServer(NewHandler(Options{Status: func() status.Status { return status.Status{Gateways: gws.List()} },
		Ping: nil, Gateways: gws}))
	t.Cleanup(ts.Close)
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := free.Addr().String()
	free.Close()
	call := func(method, path, body string, action bool) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(method, ts.URL+path, strings.NewReader(body))
		if action {
			req.Header.Set(ActionHeader, "1")
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, c := range []struct {
		name, method, path, body string
		action                   bool
		want                     int
		says                     string
	}{
		{"add without the header", "POST", "/v1/gateways/tcp/" + addr, `{"pid":1,"port":7}`, false, 403, "header"},
		{"add with a bad body", "POST", "/v1/gateways/tcp/" + addr, `{"pid":1,"port":7,"color":"red"}`, true, 400, "unknown field"},
		{"add udp where none is carried", "POST", "/v1/gateways/udp/" + addr, `{"pid":1,"port":7}`, true, 400, "carries no UDP"},
		{"add to a port the peer does not allow", "POST", "/v1/gateways/tcp/" + addr, `{"pid":1,"port":22}`, true, 400, "does not allow port 22"},
		{"add a public one with no consent", "POST", "/v1/gateways/tcp/203.0.113.5:8080", `{"pid":1,"port":7}`, true, 403, "--gateway-any-host"},
		{"add a bad address", "POST", "/v1/gateways/tcp/nowhere", `{"pid":1,"port":7}`, true, 400, "[IP:]PORT"},
		{"add", "POST", "/v1/gateways/tcp/" + addr, `{"pid":1,"port":7,"label":"echo","idle_timeout":"1h"}`, true, 201, `"label": "echo"`},
		{"add it again", "POST", "/v1/gateways/tcp/" + addr, `{"pid":1,"port":7}`, true, 409, "already"},
		{"get", "GET", "/v1/gateways/tcp/" + addr, "", false, 200, `"idle_timeout": "1h0m0s"`},
		{"list", "GET", "/v1/gateways", "", false, 200, `"listen": "` + addr + `"`},
		{"status lists it", "GET", "/v1/status", "", false, 200, `"gateways"`},
	} {
		code, body := call(c.method, c.path, c.body, c.action)
		if code != c.want || !strings.Contains(body, c.says) {
			t.Errorf("%s: %d %s; want %d saying %q", c.name, code, body, c.want, c.says)
		}
	}
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte("hello"))
	conn.(*net.TCPConn).CloseWrite()
	if got, err := io.ReadAll(conn); string(got) != "hello" || err != nil {
		t.Errorf("through the gateway: %q, %v; want hello", got, err)
	}
	conn.Close()
	testkit.Eventually(t, "the gateway's counts", func() bool {
		_, body := call("GET", "/v1/gateways/tcp/"+addr, "", false)
		var g status.Gateway
		return json.Unmarshal([]byte(body), &g) == nil && g.Conns == 1 && g.BytesToPeer == 5 && g.BytesFromPeer == 5 && g.Open == 0
	})
	if code, body := call("DELETE", "/v1/gateways/tcp/"+addr, "", false); code != 403 {
		t.Errorf("remove without the header: %d %s; want 403", code, body)
	}
	if code, body := call("DELETE", "/v1/gateways/tcp/"+addr+"?drain=false", "", true); code != 200 || !strings.Contains(body, `"drain": false`) {
		t.Errorf("remove: %d %s; want 200, drain false", code, body)
	}
	if code, _ := call("GET", "/v1/gateways/tcp/"+addr, "", false); code != 404 {
		t.Errorf("get after remove: %d; want 404", code)
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Error("the removed gateway still accepts connections")
	}
}
