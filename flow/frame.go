package flow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// The frames a flow's stream carries, each way:
//
//	data:  0x01 | length (4 bytes, big endian, 1 to MaxData) | bytes
//	ack:   0x02 | bytes received from the peer so far, its end counting one (8 bytes)
//	fin:   0x03                         (no more data from this side)
//	reset: 0x04                         (the flow is reset: the peer resets its side)
const (
	frameData  = 0x01
	frameAck   = 0x02
	frameFin   = 0x03
	frameReset = 0x04

	// MaxData is the largest data frame.
	MaxData = 256 << 10
)

// ErrFrame is wrapped by every malformed frame.
var ErrFrame = errors.New("bad flow frame")

// frame is one decoded frame header: a data frame's bytes follow it.
type frame struct {
	typ byte
	n   uint32 // data: length
	ack uint64 // ack: offset
}

// appendData appends a data frame's header for n bytes.
func appendData(b []byte, n int) []byte {
	return binary.BigEndian.AppendUint32(append(b, frameData), uint32(n))
}

func appendAck(b []byte, off uint64) []byte {
	return binary.BigEndian.AppendUint64(append(b, frameAck), off)
}

// readFrame reads one frame header from r (a data frame's bytes are left
// to read).
func readFrame(r io.Reader, scratch *[9]byte) (frame, error) {
	if _, err := io.ReadFull(r, scratch[:1]); err != nil {
		return frame{}, err
	}
	f := frame{typ: scratch[0]}
	switch f.typ {
	case frameData:
		if _, err := io.ReadFull(r, scratch[1:5]); err != nil {
			return frame{}, noEOF(err)
		}
		f.n = binary.BigEndian.Uint32(scratch[1:5])
		if f.n == 0 || f.n > MaxData {
			return frame{}, fmt.Errorf("%w: data length %d", ErrFrame, f.n)
		}
	case frameAck:
		if _, err := io.ReadFull(r, scratch[1:9]); err != nil {
			return frame{}, noEOF(err)
		}
		f.ack = binary.BigEndian.Uint64(scratch[1:9])
	case frameFin, frameReset:
	default:
		return frame{}, fmt.Errorf("%w: type %#x", ErrFrame, f.typ)
	}
	return f, nil
}

// noEOF turns an end of stream inside a frame into ErrUnexpectedEOF.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
