package frame

import (
	"bytes"
	"errors"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	for _, f := range []Frame{
		{Kind: KindTo, Assoc: 1, Port: 9000, Data: []byte("hello")},
		{Kind: KindBack, Assoc: 1<<64 - 1, Port: 65535, Data: []byte{}},
		{Kind: KindRefused, Assoc: 7, Port: 1, Data: []byte{RefusedNotAllowed}},
	} {
		b := Append(nil, f)
		got, err := Parse(b)
		if err != nil || got.Kind != f.Kind || got.Assoc != f.Assoc || got.Port != f.Port || !bytes.Equal(got.Data, f.Data) {
			t.Errorf("Parse(Append(%+v)) = %+v, %v", f, got, err)
		}
	}
}

func TestParseRefuses(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    []byte
		want error
	}{
		{"short", []byte{KindTo, 0, 0}, ErrShort},
		{"kind", Append(nil, Frame{Kind: 0x03, Assoc: 1, Port: 1}), ErrKind},
		{"port 0", Append(nil, Frame{Kind: KindTo, Assoc: 1}), ErrPort},
		{"refusal without reason", Append(nil, Frame{Kind: KindRefused, Assoc: 1, Port: 1}), ErrShort},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Parse(tc.b); !errors.Is(err, tc.want) {
				t.Errorf("Parse(%x) = %v; want %v", tc.b, err, tc.want)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	f.Add(Append(nil, Frame{Kind: KindTo, Assoc: 3, Port: 53, Data: []byte("q")}))
	f.Add(Append(nil, Frame{Kind: KindRefused, Assoc: 3, Port: 53, Data: []byte{RefusedOverBudget}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, err := Parse(b)
		if err != nil {
			return
		}
		if again := Append(nil, fr); !bytes.Equal(again, b) {
			t.Fatalf("Append(Parse(%x)) = %x", b, again)
		}
	})
}
