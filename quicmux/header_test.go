package quicmux

import (
	"errors"
	"io"
	"testing"
)

func TestRequestHeader(t *testing.T) {
	tests := []struct {
		name    string
		b       []byte
		port    uint16
		wantErr error
	}{
		{"port 8020", AppendRequest(nil, 8020), 8020, nil},
		{"port 65535", AppendRequest(nil, 65535), 65535, nil},
		{"short", []byte{1, 0}, 0, io.ErrUnexpectedEOF},
		{"future version", []byte{2, 0x1f, 0x54}, 0, ErrVersion},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			port, err := ParseRequest(tt.b)
			if !errors.Is(err, tt.wantErr) || port != tt.port {
				t.Errorf("ParseRequest(%x) = %d, %v; want %d, %v", tt.b, port, err, tt.port, tt.wantErr)
			}
		})
	}
}

func TestReply(t *testing.T) {
	tests := []struct {
		s    Status
		want error
	}{
		{StatusOK, nil},
		{StatusRefused, ErrRefused},
		{StatusNotAllowed, ErrNotAllowed},
		{StatusUnreachable, ErrUnreachable},
	}
	for _, tt := range tests {
		t.Run(tt.s.String(), func(t *testing.T) {
			if err := ParseReply(AppendReply(nil, tt.s)); !errors.Is(err, tt.want) {
				t.Errorf("ParseReply(%v) = %v; want %v", tt.s, err, tt.want)
			}
		})
	}
	if err := ParseReply([]byte{1, 99}); err == nil {
		t.Error("ParseReply(unknown status) = nil; want error")
	}
	if err := ParseReply([]byte{7, 0}); !errors.Is(err, ErrVersion) {
		t.Errorf("ParseReply(version 7) = %v; want ErrVersion", err)
	}
}

func FuzzParseRequest(f *testing.F) {
	f.Add(AppendRequest(nil, 8020))
	f.Add([]byte{2, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		port, err := ParseRequest(b)
		if err != nil {
			return
		}
		if got, _ := ParseRequest(AppendRequest(nil, port)); got != port {
			t.Errorf("round trip of %d = %d", port, got)
		}
	})
}

func FuzzParseReply(f *testing.F) {
	f.Add(AppendReply(nil, StatusOK))
	f.Add(AppendReply(nil, StatusRefused))
	f.Fuzz(func(t *testing.T, b []byte) { ParseReply(b) })
}
