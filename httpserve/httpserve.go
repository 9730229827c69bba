// Package httpserve runs an http.Server for as long as a context lives:
// the management API, the reference registry and the demo's servers all
// serve this way.
package httpserve

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"
)

// ShutdownGrace is how long Serve lets requests in flight finish once its
// context ends.
const ShutdownGrace = 2 * time.Second

// Serve serves hs on ln until ctx ends, then shuts down gracefully (within
// ShutdownGrace) and returns ctx's error; with cert and key it serves
// HTTPS. It closes ln on every path. An error of serving ends it at once.
func Serve(ctx context.Context, hs *http.Server, ln net.Listener, cert, key string) error {
	errc := make(chan error, 1)
	go func() {
		if cert != "" {
			errc <- hs.ServeTLS(ln, cert, key)
		} else {
			errc <- hs.Serve(ln)
		}
	}()
	select {
	case err := <-errc:
		ln.Close() // Serve closed it; ServeTLS not when the key pair does not load
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ShutdownGrace)
	defer cancel()
	serr := hs.Shutdown(sctx)
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		serr = errors.Join(serr, err)
	}
	if serr != nil && !errors.Is(serr, context.DeadlineExceeded) {
		return serr
	}
	return ctx.Err()
}
