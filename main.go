// Command sfkit-proxy is the sidecar that lets the parties of a secure
// multi-party computation reach each other through NATs: a SOCKS5 proxy on
// localhost whose connections to 10.0.0.N:PORT arrive at party N's
// 127.0.0.1:PORT over end-to-end encrypted QUIC.
package main

import (
	"context"
	"encoding/json"
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
			return runRegistry(ctx, cfg, newLogger(stderr, cfg.LogLevel))
		case "status", "ping":
			cfg, err := config.ParseAdminClient(args[0], args[1:], stderr)
			if err != nil {
				return err
			}
			return runAdminClient(ctx, args[0], cfg, stdout)
		case "demo":
			return runDemo(ctx, args[1:], stdout, stderr)
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
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				return bi.Main.Version + " " + s.Value
			}
		}
		return bi.Main.Version
	}
	return "unknown"
}

// runAdminClient prints the status of, or pings through, a running sidecar.
func runAdminClient(ctx context.Context, cmd string, cfg *config.AdminClient, stdout io.Writer) error {
	c := &admin.Client{Addr: cfg.Addr}
	if cmd == "ping" {
		r, err := c.Ping(ctx, cfg.PID, cfg.Count)
		if err != nil {
			return fmt.Errorf("ping party %d: %w", cfg.PID, err)
		}
		if cfg.JSON {
			return json.NewEncoder(stdout).Encode(r)
		}
		for _, ms := range r.RTTMillis {
			fmt.Fprintf(stdout, "pong from party %d via %s %s: time=%.2f ms\n", r.PID, r.Path, r.RemoteAddr, ms)
		}
		return nil
	}
	s, err := c.Status(ctx)
	if err != nil {
		return err
	}
	if cfg.JSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(s)
	}
	admin.PrintStatus(stdout, s)
	return nil
}
