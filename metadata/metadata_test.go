package metadata

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"sfkit-proxy/metadata/metadatatest"
)

const audience = "https://registry.example.org/"

// closedAddr is a loopback host:port with nothing behind it.
func closedAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().String()
	ln.Close()
	return a
}

func fakes(t *testing.T, id metadatatest.Identity) (*metadatatest.Issuer, *metadatatest.Server, *httptest.Server, *httptest.Server) {
	t.Helper()
	is, err := metadatatest.NewIssuer("https://accounts.google.com")
	if err != nil {
		t.Fatal(err)
	}
	srv := &metadatatest.Server{}
	gce := httptest.NewServer(srv.GCE(is, id))
	azure := httptest.NewServer(srv.Azure(is, id))
	t.Cleanup(gce.Close)
	t.Cleanup(azure.Close)
	return is, srv, gce, azure
}

func TestDiscoverGCE(t *testing.T) {
	_, srv, gce, _ := fakes(t, metadatatest.Identity{Email: "party1@proj.iam.gserviceaccount.com"})
	t.Setenv("GCE_METADATA_HOST", strings.TrimPrefix(gce.URL, "http://"))
	s, err := Discover(context.Background(), audience, Options{AzureEndpoint: "http://" + closedAddr(t)})
	if err != nil {
		t.Fatalf("Discover = %v", err)
	}
	tok, err := s.TokenContext(context.Background())
	if err != nil || s.Provider != GCE || strings.Count(tok.AccessToken, ".") != 2 {
		t.Fatalf("token = %v, %v from %q; want a JWT from gce", tok, err, s.Provider)
	}
	if time.Until(tok.Expiry) < 50*time.Minute {
		t.Errorf("expiry = %v; want about an hour from now (read from the token)", tok.Expiry)
	}
	if srv.LastAudience() != audience || srv.Issued.Load() != 1 {
		t.Errorf("server saw audience %q and issued %d; want %q and 1", srv.LastAudience(), srv.Issued.Load(), audience)
	}
}

func TestDiscoverAzure(t *testing.T) {
	_, srv, _, azure := fakes(t, metadatatest.Identity{Subject: "5f3c-oid"})
	t.Setenv("GCE_METADATA_HOST", closedAddr(t))
	t.Setenv(AzureEndpointEnv, azure.URL)
	s, err := Discover(context.Background(), audience, Options{})
	if err != nil || s.Provider != Azure {
		t.Fatalf("Discover = %v, %v; want azure", s, err)
	}
	tok, _ := s.TokenContext(context.Background())
	if time.Until(tok.Expiry) < 50*time.Minute || srv.LastAudience() != audience {
		t.Errorf("expiry %v, resource %q; want an hour and %q", tok.Expiry, srv.LastAudience(), audience)
	}
}

func TestFakesEnforceHeaders(t *testing.T) {
	_, _, gce, azure := fakes(t, metadatatest.Identity{Email: "x@y"})
	tests := []struct {
		name, url string
		want      int
	}{
		{"gce without Metadata-Flavor", gce.URL + "/computeMetadata/v1/instance/service-accounts/default/identity?audience=a&format=full", 403},
		{"azure without Metadata", azure.URL + "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=a", 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := http.Get(tt.url)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.want {
				t.Errorf("GET without header = %d; want %d", resp.StatusCode, tt.want)
			}
		})
	}
}

func TestNoMetadataServer(t *testing.T) {
	t.Setenv("GCE_METADATA_HOST", closedAddr(t))
	_, err := Discover(context.Background(), audience, Options{AzureEndpoint: "http://" + closedAddr(t), ProbeTimeout: 500 * time.Millisecond})
	if !errors.Is(err, ErrNoCloud) || !strings.Contains(err.Error(), "gce:") || !strings.Contains(err.Error(), "azure:") {
		t.Errorf("Discover with no metadata server = %v; want ErrNoCloud naming both providers", err)
	}
}

func TestRefreshBeforeExpiry(t *testing.T) {
	_, srv, gce, _ := fakes(t, metadatatest.Identity{Email: "p@x", Lifetime: 5 * time.Minute})
	t.Setenv("GCE_METADATA_HOST", strings.TrimPrefix(gce.URL, "http://"))
	now := time.Now()
	s, err := Discover(context.Background(), audience, Options{Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	first, _ := s.TokenContext(context.Background())
	now = now.Add(3 * time.Minute) // two minutes left: still good
	if tok, _ := s.TokenContext(context.Background()); tok != first || srv.Issued.Load() != 1 {
		t.Fatalf("at 3 min: issued %d; want the cached token", srv.Issued.Load())
	}
	now = now.Add(90 * time.Second) // 30 s left: inside the refresh margin
	tok, err := s.TokenContext(context.Background())
	if err != nil || tok == first || srv.Issued.Load() != 2 {
		t.Errorf("at 4.5 min: %v, issued %d; want a fresh token", err, srv.Issued.Load())
	}
	s.Invalidate()
	if _, err := s.Token(); err != nil || srv.Issued.Load() != 3 {
		t.Errorf("after Invalidate: %v, issued %d; want a fresh token", err, srv.Issued.Load())
	}
}
