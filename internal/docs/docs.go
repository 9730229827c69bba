// Package docs reads the fenced code blocks of the project's Markdown pages
// and the marker above each one, which says which test runs it:
//
//	<!-- run: scripts/docs-lab.sh NAME -->      a lab runs this block (it names NAME)
//	<!-- not run: REASON -->                    why no test can run it here
//
// The marker is the line directly above the opening fence. Labs fetch a
// block by its name (scripts/docblock), so that what they run is what the
// page says.
package docs

import (
	"bufio"
	"bytes"
	"fmt"
	"strings"
)

// Block is one fenced code block.
type Block struct {
	Line   int    // line of the opening fence, from 1
	Lang   string // the fence's info string: sh, yaml, text, …
	Text   string // the lines between the fences, each ending in \n
	Run    string // the marker's script (scripts/docs-lab.sh), or ""
	Name   string // the marker's block name, or ""
	NotRun string // the marker's reason it is not run, or ""
}

// Marked reports whether the block says how it is tested.
func (b Block) Marked() bool { return b.Run != "" || b.NotRun != "" }

// Parse returns the fenced blocks of a Markdown page, in order. A marker
// that cannot be read, or a fence left open, is an error naming its line.
func Parse(md []byte) ([]Block, error) {
	var (
		blocks []Block
		cur    *Block
		fence  string
		prev   string
		n      int
		text   strings.Builder
	)
	sc := bufio.NewScanner(bytes.NewReader(md))
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for sc.Scan() {
		n++
		line := sc.Text()
		trimmed := strings.TrimSpace(line)
		if cur != nil {
			if trimmed == fence {
				cur.Text = text.String()
				blocks = append(blocks, *cur)
				cur = nil
			} else {
				text.WriteString(line)
				text.WriteByte('\n')
			}
			prev = line
			continue
		}
		if strings.HasPrefix(trimmed, "```") || strings.HasPrefix(trimmed, "~~~") {
			fence = trimmed[:3]
			b := Block{Line: n, Lang: strings.TrimSpace(trimmed[3:])}
			if err := b.marker(strings.TrimSpace(prev)); err != nil {
				return nil, fmt.Errorf("line %d: %w", n-1, err)
			}
			cur = &b
			text.Reset()
		}
		prev = line
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if cur != nil {
		return nil, fmt.Errorf("line %d: code block never closed", cur.Line)
	}
	return blocks, nil
}

// marker reads the line above a fence into b, if it is a marker.
func (b *Block) marker(line string) error {
	body, ok := strings.CutPrefix(line, "<!--")
	if !ok {
		return nil
	}
	body, ok = strings.CutSuffix(body, "-->")
	if !ok {
		return nil
	}
	body = strings.TrimSpace(body)
	switch {
	case strings.HasPrefix(body, "not run:"):
		b.NotRun = strings.TrimSpace(strings.TrimPrefix(body, "not run:"))
		if b.NotRun == "" {
			return fmt.Errorf("marker %q gives no reason: write <!-- not run: WHY -->", line)
		}
	case strings.HasPrefix(body, "run:"):
		f := strings.Fields(strings.TrimPrefix(body, "run:"))
		if len(f) != 2 {
			return fmt.Errorf("marker %q: write <!-- run: SCRIPT NAME -->", line)
		}
		b.Run, b.Name = f[0], f[1]
	}
	return nil
}

// Named returns the block whose run marker names name.
func Named(blocks []Block, name string) (Block, error) {
	for _, b := range blocks {
		if b.Name == name {
			return b, nil
		}
	}
	return Block{}, fmt.Errorf("no code block is marked <!-- run: … %s -->", name)
}
