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
		kind    Kind
		port    uint16
		wantErr error
	}{
		{"connect 8020", AppendRequest(nil, KindConnect, 8020), KindConnect, 8020, nil},
		{"connect 65535", AppendRequest(nil, KindConnect, 65535), KindConnect, 65535, nil},
		{"ping", AppendRequest(nil, KindPing, 0), KindPing, 0, nil},
		{"short", []byte{1, 0, 0}, 0, 0, io.ErrUnexpectedEOF},
		{"future version", []byte{2, 0, 0x1f, 0x54}, 0, 0, ErrVersion},
		{"unknown kind", []byte{1, 9, 0x1f, 0x54}, 0, 0, ErrKind},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kind, port, err := ParseRequest(tt.b)
			if !errors.Is(err, tt.wantErr) || port != tt.port || kind != tt.kind {
				t.Errorf("ParseRequest(%x) = %d, %d, %v; want %d, %d, %v", tt.b, kind, port, err, tt.kind, tt.port, tt.wantErr)
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
	f.Add(AppendRequest(nil, KindConnect, 8020))
	f.Add(AppendRequest(nil, KindPing, 0))
	f.Add([]byte{2, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		kind, port, err := ParseRequest(b)
		if err != nil {
			return
		}
		if k2, p2, _ := ParseRequest(AppendRequest(nil, kind, port)); k2 != kind || p2 != port {
			t.Errorf("round trip of %d/%d = %d/%d", kind, port, k2, p2)
		}
	})
}

func FuzzParseReply(f *testing.F) {
	f.Add(AppendReply(nil, StatusOK))
	f.Add(AppendReply(nil, StatusRefused))
	f.Fuzz(func(t *testing.T, b []byte) { ParseReply(b) })
}
