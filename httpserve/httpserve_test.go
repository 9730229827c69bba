package httpserve

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"
)

func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// TestServeUntilCancelled: requests are served until ctx ends; then Serve
// returns ctx's error and nothing listens any more.
func TestServeUntilCancelled(t *testing.T) {
	ln := listen(t)
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, hs, ln, "", "") }()
	resp, err := http.Get("http://" + ln.Addr().String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || string(b) != "ok" {
		t.Fatalf("GET = %q, %v; want %q", b, err, "ok")
	}
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Serve = %v; want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after its context ended")
	}
	if c, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		c.Close()
		t.Error("the listener still accepts after Serve returned")
	}
}

// TestServeClosesListenerOnFailure: a key pair that does not load ends
// Serve at once, with the listener closed.
func TestServeClosesListenerOnFailure(t *testing.T) {
	ln := listen(t)
	missing := filepath.Join(t.TempDir(), "missing.pem")
	err := Serve(context.Background(), &http.Server{}, ln, missing, missing)
	if err == nil {
		t.Fatal("Serve with a missing key pair = nil; want an error")
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Serve failed = %v; want net.ErrClosed", err)
	}
}
