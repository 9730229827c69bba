package docs

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	md := "# t\n\n<!-- run: scripts/docs-lab.sh hello -->\n```sh\necho hi\necho there\n```\n\n" +
		"<!-- not run: needs a cloud VM -->\n```sh\ncurl http://metadata/\n```\n\n```text\nlog line\n```\n"
	blocks, err := Parse([]byte(md))
	if err != nil {
		t.Fatal(err)
	}
	if len(blocks) != 3 {
		t.Fatalf("got %d blocks, want 3", len(blocks))
	}
	if b := blocks[0]; b.Run != "scripts/docs-lab.sh" || b.Name != "hello" || b.Text != "echo hi\necho there\n" || b.Lang != "sh" || b.Line != 4 {
		t.Errorf("first block: %+v", b)
	}
	if b := blocks[1]; b.NotRun != "needs a cloud VM" || b.Run != "" || !b.Marked() {
		t.Errorf("second block: %+v", b)
	}
	if b := blocks[2]; b.Marked() || b.Lang != "text" {
		t.Errorf("third block: %+v", b)
	}
	if b, err := Named(blocks, "hello"); err != nil || b.Line != 4 {
		t.Errorf("Named(hello) = %+v, %v", b, err)
	}
	if _, err := Named(blocks, "absent"); err == nil {
		t.Error("Named(absent) found a block")
	}
	for _, bad := range []string{
		"<!-- run: scripts/docs-lab.sh -->\n```sh\nx\n```\n",
		"<!-- not run: -->\n```sh\nx\n```\n",
		"```sh\nnever closed\n",
	} {
		if _, err := Parse([]byte(bad)); err == nil {
			t.Errorf("Parse(%q) gave no error", bad)
		}
	}
}

// TestEveryCommandIsRunOrSaysWhyNot holds the pages to their markers:
// every shell block says which lab runs it, or why none can; a lab named
// by a marker exists and fetches that block by its name; names are unique
// on a page.
func TestEveryCommandIsRunOrSaysWhyNot(t *testing.T) {
	root := "../.."
	pages, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	pages = append(pages, filepath.Join(root, "README.md"))
	runs := 0
	for _, page := range pages {
		rel, _ := filepath.Rel(root, page)
		md, err := os.ReadFile(page)
		if err != nil {
			t.Fatal(err)
		}
		blocks, err := Parse(md)
		if err != nil {
			t.Errorf("%s: %v", rel, err)
			continue
		}
		names := map[string]bool{}
		for _, b := range blocks {
			switch b.Lang {
			case "sh", "bash", "shell", "console":
			default:
				continue
			}
			if !b.Marked() {
				t.Errorf("%s:%d: a %s block with no marker above it: add <!-- run: SCRIPT NAME --> or <!-- not run: WHY -->", rel, b.Line, b.Lang)
				continue
			}
			if b.Run == "" {
				continue
			}
			runs++
			if names[b.Name] {
				t.Errorf("%s:%d: block name %q used twice on the page", rel, b.Line, b.Name)
			}
			names[b.Name] = true
			script, err := os.ReadFile(filepath.Join(root, b.Run))
			if err != nil {
				t.Errorf("%s:%d: the marker's lab: %v", rel, b.Line, err)
				continue
			}
			// The lab fetches the block: docblock, or a wrapper of it
			// (doc_block, run_block, …_block), with the page and the name.
			fetch := regexp.MustCompile(`(?m)\b(docblock|\w*_block)\b[^\n]*\s"?` + regexp.QuoteMeta(rel) + `"?\s+` + regexp.QuoteMeta(b.Name) + `([^\w-]|$)`)
			if !fetch.Match(script) {
				t.Errorf("%s:%d: %s does not fetch block %q of %s (docblock %s %s)", rel, b.Line, b.Run, b.Name, rel, rel, b.Name)
			}
			if strings.TrimSpace(b.Text) == "" {
				t.Errorf("%s:%d: block %q is empty", rel, b.Line, b.Name)
			}
		}
	}
	if runs == 0 {
		t.Error("no page has a block that a lab runs")
	}
}
