package quicmux

import (
	"encoding/binary"
	"errors"
	"net"
	"unsafe"

	"golang.org/x/sys/unix"
)

// writeGSO sends segs (of one size, the last perhaps shorter) to `to` on
// c in one send with UDP generic segmentation offload, joined in buf: the
// kernel routes, filters and NATs them once, as quic-go's own sends. It
// reports false when the socket cannot (no UDP GSO here), having sent
// nothing.
func writeGSO(c *net.UDPConn, buf, oob []byte, segs [][]byte, to *net.UDPAddr) (bool, error) {
	buf = buf[:0]
	for _, s := range segs {
		buf = append(buf, s...)
	}
	oob = oob[:unix.CmsgSpace(2)]
	clear(oob)
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	h.Level, h.Type = unix.SOL_UDP, unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(oob[unix.CmsgLen(0):], uint16(len(segs[0])))
	_, _, err := c.WriteMsgUDP(buf, oob, to)
	for _, no := range []error{unix.EIO, unix.EINVAL, unix.ENOPROTOOPT, unix.EOPNOTSUPP, unix.EMSGSIZE} {
		if errors.Is(err, no) {
			return false, nil
		}
	}
	return true, err
}
