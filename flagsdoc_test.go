package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"

	"sfkit-proxy/config"
)

var updateDocs = flag.Bool("update", false, "rewrite docs/flags.md from the commands' -h (make docs)")

// flagLine is one flag of -h: "  --name", then "        usage (default "x") [$ENV]".
var flagLine = regexp.MustCompile(`^(.*?)(?: \(default (".*")\))?(?: \[\$([A-Z0-9_]+)\])?$`)

// flagsDoc renders every command's -h as docs/flags.md: so the page is
// what the binary says, and cannot drift from it.
func flagsDoc(t *testing.T) string {
	t.Helper()
	var doc strings.Builder
	doc.WriteString("# Flags\n\n" +
		"<!-- Generated from each command's -h by `make docs`; a test fails when it differs. Do not edit. -->\n\n" +
		"Every flag takes one dash or two, and is also read from the environment variable shown, and from a\n" +
		"config file (`--config FILE`, lines of `flag value`); flags beat the environment, which beats the file.\n")
	for _, cmd := range []string{"", "registry", "status", "ping", "gateway", "probe", "netcheck", "demo"} {
		args := []string{"-h"}
		title := "sfkit-proxy"
		if cmd != "" {
			args = []string{cmd, "-h"}
			title += " " + cmd
		}
		var out bytes.Buffer
		if err := run(context.Background(), args, &out, &out); !errors.Is(err, config.ErrHelp) {
			t.Fatalf("%s -h: %v; want the help", title, err)
		}
		lines := strings.Split(strings.TrimRight(out.String(), "\n"), "\n")
		usage, ok := strings.CutPrefix(lines[0], "Usage: ")
		if !ok {
			t.Fatalf("%s -h begins %q; want Usage:", title, lines[0])
		}
		fmt.Fprintf(&doc, "\n## `%s`\n\n```text\n%s\n```\n", title, usage)
		i := 1
		var about []string
		for ; i < len(lines) && !strings.HasPrefix(lines[i], "Flags (") && lines[i] != "Flags:"; i++ {
			if l := strings.TrimSpace(lines[i]); l != "" {
				about = append(about, l)
			}
		}
		if len(about) > 0 {
			fmt.Fprintf(&doc, "\n%s\n", strings.Join(about, "\n"))
		}
		doc.WriteString("\n| flag | environment | default | meaning |\n| --- | --- | --- | --- |\n")
		for i++; i+1 < len(lines); i += 2 {
			name, ok := strings.CutPrefix(lines[i], "  --")
			if !ok || !strings.HasPrefix(lines[i+1], "        ") {
				t.Fatalf("%s -h: line %q, %q is not a flag and its usage", title, lines[i], lines[i+1])
			}
			m := flagLine.FindStringSubmatch(strings.TrimSpace(lines[i+1]))
			env, def := "", ""
			if m[3] != "" {
				env = "`" + m[3] + "`"
			}
			if m[2] != "" {
				def = "`" + strings.Trim(m[2], `"`) + "`"
			}
			fmt.Fprintf(&doc, "| `--%s` | %s | %s | %s |\n", name, env, def, strings.ReplaceAll(m[1], "|", `\|`))
		}
	}
	return doc.String()
}

func TestFlagsDoc(t *testing.T) {
	want := flagsDoc(t)
	const path = "docs/flags.md"
	if *updateDocs {
		if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	have, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (make docs writes it)", err)
	}
	if string(have) != want {
		hl, wl := strings.Split(string(have), "\n"), strings.Split(want, "\n")
		for i := range max(len(hl), len(wl)) {
			var h, w string
			if i < len(hl) {
				h = hl[i]
			}
			if i < len(wl) {
				w = wl[i]
			}
			if h != w {
				t.Fatalf("%s differs from the commands' -h at line %d:\n have %q\n want %q\nrun make docs", path, i+1, h, w)
			}
		}
	}
}
