package identity

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestIdentityPersists(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	a, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, keyFile))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("key mode = %v; want 0600", fi.Mode().Perm())
	}
	b, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if a.Pin != b.Pin || len(a.Pin) != 43 {
		t.Errorf("pins %q, %q; want the same 43-character pin twice", a.Pin, b.Pin)
	}
	c, err := Load(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if c.Pin == a.Pin {
		t.Error("two state dirs gave the same pin")
	}
}

func TestIdentityRefusesBadKeys(t *testing.T) {
	tests := []struct {
		name    string
		content string
		mode    os.FileMode
		want    string
	}{
		{"readable by others", "", 0o644, "chmod 600"},
		{"not pem", "hello", 0o600, "not PEM"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if tt.content == "" {
				if _, err := Load(dir); err != nil {
					t.Fatal(err)
				}
			} else if err := os.WriteFile(filepath.Join(dir, keyFile), []byte(tt.content), tt.mode); err != nil {
				t.Fatal(err)
			}
			os.Chmod(filepath.Join(dir, keyFile), tt.mode)
			if _, err := Load(dir); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Load = %v; want error containing %q", err, tt.want)
			}
		})
	}
}
