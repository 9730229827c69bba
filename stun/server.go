package stun

import (
	"context"
	"errors"
	"log/slog"
	"net"
)

// Serve answers plain binding requests on pc until ctx ends, as a minimal
// STUN server (the demo's; real deployments use public servers or coturn).
// It closes pc when it returns.
func Serve(ctx context.Context, pc *net.UDPConn, log *slog.Logger) error {
	stop := context.AfterFunc(ctx, func() { pc.Close() })
	defer stop()
	defer pc.Close()
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return ctx.Err()
			}
			return err
		}
		m, err := Parse(buf[:n])
		if err != nil {
			log.Debug("ignoring bad stun packet", "from", from, "err", err)
			continue
		}
		if resp := Answer(m, from, ""); resp != nil {
			if _, err := pc.WriteToUDPAddrPort(resp, from); err != nil {
				log.Debug("stun reply failed", "to", from, "err", err)
			}
		}
	}
}
