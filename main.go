// Command sfkit-proxy is the sidecar that lets the parties of a secure
// multi-party computation reach each other through NATs: a SOCKS5 proxy on
// localhost whose connections to 10.0.0.N:PORT arrive at party N's
// 127.0.0.1:PORT over end-to-end encrypted QUIC.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"sfkit-proxy/admin"
	"sfkit-proxy/config"
	"sfkit-proxy/demo"
	"sfkit-proxy/registry"
	"sfkit-proxy/sidecar"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	switch {
	case err == nil, errors.Is(err, config.ErrHelp):
	case errors.Is(err, context.Canceled):
	default:
		fmt.Fprintf(os.Stderr, "sfkit-proxy: %v\n", err)
		os.Exit(1)
	}
}

// run dispatches on the subcommand.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		switch args[0] {
		case "registry":
			cfg, err := config.ParseRegistry(args[1:], stderr)
			if err != nil {
				return err
			}
			return registry.Run(ctx, cfg, newLogger(stderr, cfg.LogLevel))
		case "status", "ping":
			cfg, err := config.ParseAdminClient(args[0], args[1:], stderr)
			if err != nil {
				return err
			}
			return admin.RunClient(ctx, args[0], cfg, stdout)
		case "gateway":
			cfg, err := config.ParseGatewayClient(args[1:], stderr)
			if err != nil {
				return err
			}
			return admin.RunGateway(ctx, cfg, stdout)
		case "probe":
			cfg, err := config.ParseProbeClient(args[1:], stderr)
			if err != nil {
				return err
			}
			return admin.RunProbe(ctx, cfg, stdout)
		case "netcheck":
			cfg, err := config.ParseNetcheck(args[1:], stderr)
			if err != nil {
				return err
			}
			return sidecar.Netcheck(ctx, cfg, stdout)
		case "demo":
			return demo.Run(ctx, args[1:], stdout, stderr)
		case "version":
			fmt.Fprintln(stdout, "sfkit-proxy", version())
			return nil
		}
	}
	cfg, err := config.ParseSidecar(args, stderr)
	if err != nil {
		return err
	}
	return sidecar.Run(ctx, cfg, newLogger(stderr, cfg.LogLevel), nil)
}

func newLogger(w io.Writer, level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

func version() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "(devel)" && bi.Main.Version != "" {
			// A module version, or one Go made from the checkout's
			// commit (v0.0.0-TIME-REVISION, +dirty with local changes).
			return bi.Main.Version
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				return bi.Main.Version + " " + s.Value
			}
		}
		return bi.Main.Version
	}
	return "unknown"
}
