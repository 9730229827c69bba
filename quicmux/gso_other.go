//go:build !linux

package quicmux

import "net"

// writeGSO is UDP generic segmentation offload, which only Linux has.
func writeGSO(*net.UDPConn, []byte, []byte, [][]byte, *net.UDPAddr) (bool, error) { return false, nil }
