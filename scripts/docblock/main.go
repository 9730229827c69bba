// Command docblock prints the code block of a Markdown page that a
// <!-- run: SCRIPT NAME --> marker names, so that a lab runs what the
// page says (package internal/docs).
//
//	go run ./scripts/docblock docs/operations.md registry
package main

import (
	"fmt"
	"os"

	"sfkit-proxy/internal/docs"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "docblock:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("usage: docblock FILE.md NAME")
	}
	md, err := os.ReadFile(args[0])
	if err != nil {
		return err
	}
	blocks, err := docs.Parse(md)
	if err != nil {
		return fmt.Errorf("%s: %w", args[0], err)
	}
	b, err := docs.Named(blocks, args[1])
	if err != nil {
		return fmt.Errorf("%s: %w", args[0], err)
	}
	_, err = os.Stdout.WriteString(b.Text)
	return err
}
