package header

import (
	"errors"
	"io"
	"testing"
)

func TestRequestHeader(t *testing.T) {
	tests := []struct {
		name    string
		b       []byte
		want    Request
		wantErr error
	}{
		{"connect 8020", Request{Kind: KindConnect, Port: 8020, Flow: 0xdeadbeef}.Append(nil), Request{Kind: KindConnect, Port: 8020, Flow: 0xdeadbeef}, nil},
		{"resume", Request{Kind: KindResume, Port: 65535, Flow: 7, Rcvd: 1 << 40}.Append(nil), Request{Kind: KindResume, Port: 65535, Flow: 7, Rcvd: 1 << 40}, nil},
		{"ping", Request{Kind: KindPing}.Append(nil), Request{Kind: KindPing}, nil},
		{"short", []byte{2, 0, 0}, Request{}, io.ErrUnexpectedEOF},
		{"old version", []byte{1, 0, 0x1f, 0x54}, Request{}, ErrVersion},
		{"future version", append([]byte{3}, make([]byte, 19)...), Request{}, ErrVersion},
		{"unknown kind", append([]byte{2, 9}, make([]byte, 18)...), Request{}, ErrKind},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseRequest(tt.b)
			if !errors.Is(err, tt.wantErr) || got != tt.want {
				t.Errorf("ParseRequest(%x) = %+v, %v; want %+v, %v", tt.b, got, err, tt.want, tt.wantErr)
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
			r, err := ParseReply(Reply{Status: tt.s, Rcvd: 42}.Append(nil))
			if err != nil || r.Rcvd != 42 || !errors.Is(r.Err(), tt.want) {
				t.Errorf("ParseReply(%v) = %+v, %v; want error %v", tt.s, r, err, tt.want)
			}
		})
	}
	if r, _ := ParseReply(Reply{Status: 99}.Append(nil)); r.Err() == nil {
		t.Error("unknown status: Err() = nil; want error")
	}
	if _, err := ParseReply([]byte{7, 0}); !errors.Is(err, ErrVersion) {
		t.Errorf("ParseReply(version 7) = %v; want ErrVersion", err)
	}
}

func FuzzParseRequest(f *testing.F) {
	f.Add(Request{Kind: KindConnect, Port: 8020, Flow: 1}.Append(nil))
	f.Add(Request{Kind: KindResume, Flow: 1, Rcvd: 99}.Append(nil))
	f.Add([]byte{2, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRequest(b)
		if err != nil {
			return
		}
		if r2, err := ParseRequest(r.Append(nil)); err != nil || r2 != r {
			t.Errorf("round trip of %+v = %+v, %v", r, r2, err)
		}
	})
}

func FuzzParseReply(f *testing.F) {
	f.Add(Reply{Status: StatusOK}.Append(nil))
	f.Add(Reply{Status: StatusRefused, Rcvd: 5}.Append(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		if r, err := ParseReply(b); err == nil {
			_ = r.Err()
		}
	})
}

func FuzzParseRoute(f *testing.F) {
	f.Add(Route{Next: 2, Origin: 0}.Append(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRoute(b)
		if err != nil {
			return
		}
		if r2, err := ParseRoute(r.Append(nil)); err != nil || r2 != r {
			t.Errorf("round trip of %+v = %+v, %v", r, r2, err)
		}
	})
}
